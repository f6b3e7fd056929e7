"""``dcp_compile.apply(model, mesh)``: capture → match → shard heads → rewrite → install, then hook the
model's cache creation so ``generate`` uses the sharded paged cache.

Everything that can reject the request (mesh shape, dcp_size, dtype, a layer that is not MLA sparse
attention, heads not divisible by the mesh) is checked before the first collective (creating the DCP
process groups), so a bad call fails the same way on every rank and never hangs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .attention import DCPAttentionSpec
from .cache import CacheSpec, ShardedPagedCache
from .capture import STEP, TOTAL, CapturedLayer, LayerCall, TensorSpec, _CacheSlot, probe_layers, trace_layer
from .agreement import FailureRecords, RankGroup, weight_fingerprint
from .hf_integration import install_hooks
from .install import DCPLayerForward, install
from .layout import DCPLayout
from .match import MatchError, MLASparseAttentionMatch, match_layer, source
from .passes import dcp_passes, flat_codegen
from .support import UnsupportedModelError, check_layers, check_model  # noqa: F401  (UnsupportedModelError: re-export)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention_spec(match: MLASparseAttentionMatch, layout: DCPLayout, rank: int, group_name: str) -> DCPAttentionSpec:
    """The static description of one rewritten layer, read off its match."""
    return DCPAttentionSpec(
        heads=match.heads, nope_dim=match.kv_expansion.nope_dim, rope_dim=match.rope_dim,
        latent_dim=match.latent_dim, v_dim=match.kv_expansion.v_dim, topk=match.indexer.topk,
        attn_scale=match.attention.scale, index_scale=match.indexer.scale, layout=layout,
        rank=rank, group_name=group_name,
    )


def capture_and_match(layer: LayerCall, past_len: int = 61) -> tuple[CapturedLayer, MLASparseAttentionMatch]:
    """Trace ``layer`` and match it; the trace's past length must exceed the indexer's top-k (or HF's
    ``min(topk, length)`` picks the length), so it grows until the top-k size is a constant."""
    while True:
        captured = trace_layer(layer, past_len)
        gm = captured.graph_module
        topk_sizes = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.topk.default]
        if all(isinstance(k, int) for k in topk_sizes) or past_len > (1 << 22):
            break
        past_len = past_len * 4 + 3
    flat_codegen(gm)
    _label_placeholders(layer, captured)
    mask = _mask_placeholder(layer, captured)
    return captured, match_layer(gm, captured.extra["num_params"], mask, layer.name)


def _label_placeholders(layer: LayerCall, captured: CapturedLayer) -> None:
    placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    n_params = captured.extra["num_params"]
    n_buffers = len(list(layer.module.named_buffers()))
    labels = [("param", n) for n in captured.param_names[: n_params - n_buffers]]
    labels += [("buffer", n) for n in captured.param_names[n_params - n_buffers :]]
    labels += [("input", p) for p in captured.input_paths]
    labels += [("past", i) for i in range(len(placeholders) - len(labels))]
    for node, label in zip(placeholders, labels):
        node.meta["dcp_input"] = label


def _tensor_specs(layer: LayerCall) -> list[TensorSpec]:
    from torch.utils import _pytree as pytree

    return [v for v in pytree.tree_leaves(layer.call, is_leaf=lambda v: isinstance(v, (TensorSpec, _CacheSlot)))
            if isinstance(v, TensorSpec)]


def _mask_placeholder(layer: LayerCall, captured: CapturedLayer):
    """The layer input with a total-length dimension is the attention mask."""
    specs = _tensor_specs(layer)
    inputs = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder" and n.meta["dcp_input"][0] == "input"]
    masks = [node for node, spec in zip(inputs, specs) if TOTAL in spec.roles]
    return masks[0] if len(masks) == 1 else None


def _cache_and_step_paths(layer: LayerCall, captured: CapturedLayer):
    from torch.utils import _pytree as pytree
    from .capture import _key_path

    leaves, _ = pytree.tree_flatten_with_path(layer.call, is_leaf=lambda v: isinstance(v, (TensorSpec, _CacheSlot)))
    cache_path = next(_key_path(p) for p, v in leaves if isinstance(v, _CacheSlot))
    for p, v in leaves:
        if isinstance(v, TensorSpec) and STEP in v.roles:
            return cache_path, _key_path(p), v.roles.index(STEP)
    raise MatchError(f"layer {layer.name}: no input has a query-token dimension")


def _set_param(module: nn.Module, fqn: str, value: torch.Tensor) -> None:
    owner_name, _, attr = fqn.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, nn.Parameter(value.contiguous().clone(), requires_grad=False))


def shard_heads(module: nn.Module, match: MLASparseAttentionMatch, tp_rank: int, tp_size: int) -> None:
    """Keep this rank's heads: rows of the query and kv-expansion projections, columns of the output one."""
    if tp_size == 1:
        return
    heads = match.heads
    lo, hi = tp_rank * heads // tp_size, (tp_rank + 1) * heads // tp_size

    def fqn(node):
        return source(node).meta["dcp_input"][1]

    q = match.query_projection
    q_w = module.get_parameter(fqn(q.weight))
    if q_w.shape[0] != heads * q.head_dim:
        raise MatchError(f"layer {match.layer}: query projection has {q_w.shape[0]} rows, not {heads}·{q.head_dim}")
    _set_param(module, fqn(q.weight), q_w[lo * q.head_dim : hi * q.head_dim])
    if len(q.linear.args) > 2 and q.linear.args[2] is not None:
        b = module.get_parameter(fqn(q.linear.args[2]))
        _set_param(module, fqn(q.linear.args[2]), b[lo * q.head_dim : hi * q.head_dim])
    kv = match.kv_expansion
    width = kv.nope_dim + kv.v_dim
    _set_param(module, fqn(kv.weight), module.get_parameter(fqn(kv.weight))[lo * width : hi * width])
    o_w = fqn(match.attention.out_proj.args[1])
    _set_param(module, o_w, module.get_parameter(o_w)[:, lo * kv.v_dim : hi * kv.v_dim])


@dataclass
class DCPRuntime:
    """What ``apply`` leaves on the model (as ``model.dcp``): the layout, the ranks, the cache factory, and
    what the ranks check against each other (``verify_ranks=False`` skips that check; see README, 'Rules')."""

    layout: DCPLayout
    dcp_rank: int
    tp_rank: int
    tp_size: int
    cache_spec: CacheSpec
    device: torch.device
    ranks: RankGroup
    fingerprint: tuple[int, int]
    captured_param: tuple[nn.Parameter, str, torch.dtype, torch.device]  # a parameter of a rewritten layer
    cache_budget_tokens: int | None = None
    verify_ranks: bool = True
    _fixed: ShardedPagedCache | None = None

    def __post_init__(self):
        group = self.ranks.group
        self.failures = FailureRecords(self.ranks, group.group_name if group is not None else "single")

    @property
    def dcp_size(self) -> int:
        return self.layout.world

    def check_parameters(self) -> None:
        """The rewritten layers and the cache are specialised to the dtype and device seen in ``apply``."""
        module, name, dtype, device = self.captured_param
        now = module.get_parameter(name)
        if now.dtype != dtype or now.device != device:
            raise RuntimeError(
                f"the model's parameters are now {now.dtype} on {now.device}, but dcp_compile.apply captured them as "
                f"{dtype} on {device}: the rewritten layers and the cache are specialised to those. Move or cast the "
                f"model (.to(...)) before apply"
            )

    def new_cache(self, batch_size: int, num_tokens: int) -> ShardedPagedCache:
        """A cache with room for ``num_tokens`` positions in each of ``batch_size`` sequences: sized to the
        request, or the one fixed pool of ``cache_budget_tokens`` rows (raises CachePoolExhausted)."""
        if self.cache_budget_tokens is not None:
            if self._fixed is None:
                pages = -(-self.cache_budget_tokens // self.layout.page_size)
                self._fixed = ShardedPagedCache(self.cache_spec, self.layout, self.dcp_rank, pages, self.device)
            self._fixed.start_request(batch_size, num_tokens)
            return self._fixed
        # Pools are the same size on every rank (rank 0 owns the most tokens): at most one page more per
        # sequence than this rank's own share.
        pages = batch_size * self.layout.pages(num_tokens, 0)
        cache = ShardedPagedCache(self.cache_spec, self.layout, self.dcp_rank, pages, self.device, batch_size)
        cache.reserve(num_tokens)
        return cache


def _validate(model: nn.Module, mesh, dcp_size: int | None, page_size: int, interleave: int) -> int:
    if getattr(mesh, "ndim", None) != 1:
        raise ValueError(
            f"mesh must be a 1-D DeviceMesh over the tensor-parallel group for attention; got a "
            f"{getattr(mesh, 'ndim', '?')}-D mesh of shape {tuple(getattr(mesh, 'shape', ()))}"
        )
    world = mesh.size()
    dcp_size = world if dcp_size is None else dcp_size
    if dcp_size < 1 or world % dcp_size:
        raise ValueError(f"dcp_size={dcp_size} must divide the mesh size {world}")
    if page_size < 1 or interleave < 1:
        raise ValueError(f"page_size ({page_size}) and interleave ({interleave}) must be >= 1")
    bad = {p.dtype for p in model.parameters() if p.dtype not in SUPPORTED_DTYPES and p.is_floating_point()}
    if bad or not any(True for _ in model.parameters()):
        raise TypeError(f"unsupported parameter dtype(s) {sorted(map(str, bad))}; supported: {[str(d) for d in SUPPORTED_DTYPES]}")
    return dcp_size


def apply(model: nn.Module, mesh, dcp_size: int | None = None, page_size: int = 64, interleave: int = 1,
          cache_budget_tokens: int | None = None, verify_ranks: bool = True) -> nn.Module:
    """Rewrite every MLA sparse-attention layer of ``model`` for decode context parallelism over ``mesh``.

    mesh: 1-D DeviceMesh over the attention tensor-parallel group (every rank runs the same script).
    dcp_size: ranks sharing one KV cache (divides mesh.size(); default all of them; 1 = plain TP with a
        replicated cache). Groups are contiguous: DCP rank = TP rank mod dcp_size.
    page_size: physical rows per cache page on each rank. interleave: consecutive tokens kept on one rank.
    cache_budget_tokens: if set, each rank's cache pool is fixed at this many token rows per layer, and a
        request that does not fit raises CachePoolExhausted (the model stays usable); otherwise the pool is
        sized from each generate() request.
    verify_ranks: at the start of every generate (and plain forward) the ranks check with one small
        collective that they run the same inputs, settings and weights (README, 'Rules'); False skips it.
    Returns the same model, patched in place.
    """
    if isinstance(getattr(model, "dcp", None), DCPRuntime):
        raise RuntimeError(f"dcp_compile.apply was already applied to this {type(model).__name__}; apply it once")
    check_model(model)
    dcp_size = _validate(model, mesh, dcp_size, page_size, interleave)
    tp_size, tp_rank = mesh.size(), mesh.get_local_rank()
    was_training = model.training
    model.eval()

    layers = probe_layers(model)
    check_layers(model, layers)
    matched, past_len = [], 61
    for layer in layers:  # start each trace at the past length that worked for the previous layer
        matched.append(capture_and_match(layer, past_len))
        past_len = matched[-1][0].past_len
    for layer, (_, match) in zip(layers, matched):
        if match.heads % tp_size:
            raise ValueError(f"layer {layer.name}: {match.heads} attention heads are not divisible by the mesh size {tp_size}")

    fingerprint = weight_fingerprint(model)  # before head sharding: every rank still holds the whole model

    # --- from here on, collectives (group creation); everything above failed the same way on every rank ---
    group = mesh.get_group() if tp_size > 1 else None
    tp_group_name = group.group_name if group is not None else None
    layout = DCPLayout(dcp_size, interleave, page_size)
    dcp_rank, dcp_group_name = tp_rank % dcp_size, ""
    if 1 < dcp_size == tp_size:
        dcp_group_name = group.group_name
    elif dcp_size > 1:
        ranks = mesh.mesh.flatten().tolist()
        for g in range(tp_size // dcp_size):
            pg = dist.new_group(ranks[g * dcp_size : (g + 1) * dcp_size])
            if tp_rank // dcp_size == g:
                dcp_group_name = pg.group_name

    for layer, (captured, match) in zip(layers, matched):
        if tp_size > 1:  # the weights change shape: trace the sharded layer again
            shard_heads(layer.module, match, tp_rank, tp_size)
            captured, match = capture_and_match(layer, captured.past_len)
        spec = attention_spec(match, layout, dcp_rank, dcp_group_name)
        gm = dcp_passes(match, spec, tp_group_name)(captured.graph_module)
        cache_path, step_path, step_dim = _cache_and_step_paths(layer, captured)
        install(layer.module, DCPLayerForward(layer.module, gm, layer.layer_idx, layer.arg_names, cache_path,
                                              step_path, step_dim, captured.out_spec))

    first = layers[0]
    cache_spec = CacheSpec(
        layer_ids=tuple(layer.layer_idx for layer in layers),
        latent_dim=first.key_spec.shape[-1] + first.value_spec.shape[-1],
        index_dim=first.index_spec.shape[-1], dtype=first.key_spec.dtype, index_dtype=first.index_spec.dtype,
    )
    param_name = next(n for n, _ in first.module.named_parameters())
    captured = first.module.get_parameter(param_name)
    model.dcp = DCPRuntime(
        layout, dcp_rank, tp_rank, tp_size, cache_spec, first.key_spec.device, RankGroup(group, tp_rank, tp_size),
        fingerprint, (first.module, param_name, captured.dtype, captured.device), cache_budget_tokens, verify_ranks,
    )
    install_hooks(model)
    model.train(was_training)
    return model
