"""``dcp_compile.apply(model, mesh)``: the pipeline — probe → group → capture → match → shard heads → rewrite
→ install — then the runtime (``model.dcp``) and HF's generate hooked to use the sharded paged cache.

Layers with the same signature (``capture.layer_signature``) form a group: one of them is traced, matched,
sharded and rewritten, and every layer of the group gets a copy of the rewritten graph, which reads that
layer's own parameters by name. A real model (DeepSeek-V3.2: 61 layers) thus costs a few traces, not two per
layer. Each stage logs one line on rank 0 (logger ``dcp_compile``, INFO).

Everything that can reject the request (mesh shape, dcp_size, dtype, a layer that is not MLA sparse
attention, heads not divisible by the mesh, attention weights HF sharded otherwise than by head) is checked
before the first collective of apply (creating the DCP process groups), so a bad call fails the same way on
every rank and never hangs. (A model loaded with HF tensor parallelism runs HF's collectives in the probe
forwards, on every rank alike.)
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from .agreement import RankGroup, weight_fingerprint
from .attention import AttentionConfig
from .cache import CacheFormat
from .capture import CapturedLayer, LayerCall, capture_layer, layer_signature, per_layer_config, probe_layers
from .fp8 import check_fp8_layer, dequantize_kv_expansion, hf_fp8_parameters
from .hf_integration import install_hooks
from .hf_parallel import tensor_parallel_mesh, tp_wrapped_submodules
from .install import DCPLayerForward, install
from .layout import DCPLayout
from .match import MatchError, MLASparseAttentionMatch, match_layer  # noqa: F401  (MatchError: re-export)
from .passes import dcp_passes
from .runtime import DCPRuntime
from .shard import check_head_shards, head_shard_plan, shard_heads
from .support import UnsupportedModelError, check_layers, check_model  # noqa: F401  (UnsupportedModelError: re-export)

logger = logging.getLogger("dcp_compile")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention_config(match: MLASparseAttentionMatch, layout: DCPLayout, rank: int, group_name: str) -> AttentionConfig:
    """The static description of one rewritten layer, read off its match."""
    indexer = match.indexer
    return AttentionConfig(
        heads=match.heads, nope_dim=match.kv_expansion.nope_dim, rope_dim=match.rope_dim,
        latent_dim=match.latent_dim, v_dim=match.kv_expansion.v_dim, topk=indexer.topk if indexer else None,
        attn_scale=match.attention.scale, index_scale=indexer.scale if indexer else None, layout=layout,
        rank=rank, group_name=group_name, selection=match.selection,
        exports_selection=match.selection_output is not None,
    )


def capture_and_match(layer: LayerCall, past_len: int | None = None):
    """Capture one layer and match it: (CapturedLayer, MLASparseAttentionMatch)."""
    captured = capture_layer(layer) if past_len is None else capture_layer(layer, past_len)
    return captured, match_layer(captured, layer.name)


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
    fp8 = hf_fp8_parameters(model)  # a block-FP8 checkpoint's weights and scales, in HF's FP8 modules (fp8.py)
    bad = {p.dtype for p in model.parameters()
           if p.dtype not in SUPPORTED_DTYPES and p.is_floating_point() and id(p) not in fp8}
    if bad or not any(True for _ in model.parameters()):
        raise TypeError(f"unsupported parameter dtype(s) {sorted(map(str, bad))}; supported: {[str(d) for d in SUPPORTED_DTYPES]}"
                        f" (and float8 weights in transformers' fine-grained FP8 modules)")
    return dcp_size


def _find_layers(model: nn.Module) -> list[LayerCall]:
    layers = probe_layers(model)
    check_layers(model, layers)  # UnsupportedModelError naming the layer and the piece dcp_compile cannot rewrite
    for layer in layers:  # HF tensor parallelism's forward wrappers, which the trace runs around
        layer.wrapped = tp_wrapped_submodules(model, layer.name, layer.module)
    return layers


@dataclass
class LayerGroup:
    """Layers with the same signature (``capture.layer_signature``): one trace, match and rewrite serve them."""

    layers: list[LayerCall]
    captured: CapturedLayer | None = None
    match: MLASparseAttentionMatch | None = None

    @property
    def first(self) -> LayerCall:
        return self.layers[0]

    def describe(self) -> str:
        more = len(self.layers) - 1
        return self.first.name + (f" (and {more} layer{'s' * (more > 1)} like it)" if more else "")


def _capture_groups(layers: list[LayerCall], stats: dict) -> list[LayerGroup]:
    """Capture and match one layer per distinct signature. A layer whose per-layer config entries among those
    its group's trace read (``capture.per_layer_config``) differ from its group's starts a group of its own."""
    groups: dict[tuple, LayerGroup] = {}
    for layer in layers:
        groups.setdefault(layer_signature(layer), LayerGroup([])).layers.append(layer)
    todo, done, past_len = list(groups.values()), [], None
    while todo:
        group = todo.pop(0)
        group.captured, group.match = capture_and_match(group.first, past_len)  # from the length that worked last
        past_len = group.captured.past_len
        stats["traces"] += group.captured.traces
        reads = group.captured.config_reads
        mine = per_layer_config(group.first, reads)
        same = [layer for layer in group.layers if per_layer_config(layer, reads) == mine]
        others = [layer for layer in group.layers if per_layer_config(layer, reads) != mine]
        group.layers = same
        if others:
            todo.insert(0, LayerGroup(others))
        done.append(group)
    order = {id(layer): i for i, layer in enumerate(layers)}
    return sorted(done, key=lambda g: order[id(g.first)])


class _Progress:
    """One log line per stage of apply on global rank 0 (logger ``dcp_compile``, level INFO)."""

    def __init__(self, stats: dict):
        self.stats, self.start = stats, time.perf_counter()
        self.last = self.start
        self.loud = not dist.is_initialized() or dist.get_rank() == 0

    def __call__(self, stage: str, message: str) -> None:
        now = time.perf_counter()
        self.stats["seconds"][stage] = round(now - self.last, 3)
        self.last = now
        if self.loud:
            logger.info("dcp_compile.apply: %s (%.1f s, %.1f s in all)", message, self.stats["seconds"][stage], now - self.start)


def _dcp_group(mesh, tp_rank: int, tp_size: int, dcp_size: int) -> tuple[str | None, str | None]:
    """(TP group name, this rank's DCP group name); None for a group of one. Collective: every rank creates
    every DCP subgroup (contiguous blocks of the mesh)."""
    group = mesh.get_group() if tp_size > 1 else None
    tp_name = group.group_name if group is not None else None
    if dcp_size == 1:
        return tp_name, None
    if dcp_size == tp_size:
        return tp_name, group.group_name
    ranks, mine = mesh.mesh.flatten().tolist(), None
    for g in range(tp_size // dcp_size):
        pg = dist.new_group(ranks[g * dcp_size : (g + 1) * dcp_size])
        if tp_rank // dcp_size == g:
            mine = pg.group_name
    return tp_name, mine


def apply(model: nn.Module, mesh=None, dcp_size: int | None = None, page_size: int = 64, interleave: int = 1,
          cache_budget_tokens: int | None = None, verify_ranks: bool = True) -> nn.Module:
    """Rewrite every MLA sparse-attention layer of ``model`` for decode context parallelism over ``mesh``.

    mesh: 1-D DeviceMesh over the attention tensor-parallel group (every rank runs the same script). None: the
        tensor-parallel mesh of a model loaded with Hugging Face tensor parallelism
        (``from_pretrained(distributed_config=DistributedConfig(tp_plan="auto"))``; ``tensor_parallel_mesh``).
    dcp_size: ranks sharing one KV cache (divides mesh.size(); default all of them; 1 = plain TP with a
        replicated cache). Groups are contiguous: DCP rank = TP rank mod dcp_size.
    page_size: physical rows per cache page on each rank. interleave: consecutive tokens kept on one rank.
    cache_budget_tokens: if set, each rank's cache pool is fixed at this many token rows per layer, and a
        request that does not fit raises CachePoolExhausted (the model stays usable); otherwise the pool is
        sized from each generate() request.
    verify_ranks: at the start of every generate (and plain forward) the ranks check with one small
        collective that they run the same inputs, settings and weights (README, 'Rules'); False skips it.
    Returns the same model, patched in place. Layers with the same shape are traced once (``capture.layer_signature``);
    progress is logged on rank 0 (logger ``dcp_compile``, INFO) and kept in ``model.dcp.apply_stats``.
    """
    if isinstance(getattr(model, "dcp", None), DCPRuntime):
        raise RuntimeError(f"dcp_compile.apply was already applied to this {type(model).__name__}; apply it once")
    check_model(model)  # e.g. DTensors not placed by HF tensor parallelism: rejected before any probe
    if mesh is None:
        mesh = tensor_parallel_mesh(model)
        if mesh is None:
            raise ValueError(
                "apply needs a mesh: a 1-D DeviceMesh over the tensor-parallel ranks (only a model loaded with Hugging "
                "Face tensor parallelism brings its own)"
            )
    dcp_size = _validate(model, mesh, dcp_size, page_size, interleave)
    tp_size, tp_rank = mesh.size(), mesh.get_local_rank()
    stats = {"layers": 0, "distinct_layers": 0, "traces": 0, "seconds": {}}
    progress = _Progress(stats)
    was_training = model.training
    model.eval()

    # Find, capture and match every distinct layer; all of it local, so a rejection is the same on every rank
    # (the probe forwards of a model loaded with HF tensor parallelism run its collectives, on every rank alike).
    layers = _find_layers(model)
    stats["layers"] = len(layers)
    progress("probe", f"found {len(layers)} attention layers")
    groups = _capture_groups(layers, stats)
    stats["distinct_layers"] = len(groups)
    progress("capture", f"traced and matched {len(groups)} distinct layer shape(s) ({stats['traces']} traces)")
    for group in groups:
        if group.match.heads % tp_size:
            raise ValueError(f"layer {group.describe()}: {group.match.heads} attention heads are not divisible by "
                             f"the mesh size {tp_size}")
        for layer in group.layers:  # HF tensor parallelism's head shards, if any, are the ones apply would cut
            check_head_shards(layer.module, replace(group.match, layer=layer.name), mesh)
            check_fp8_layer(layer.module, replace(group.match, layer=layer.name), head_shard_plan(group.match),
                            tp_size)  # FP8 linears: whole scale blocks per rank, HF's scale shards those of its weights
    fingerprint = weight_fingerprint(model)  # before apply shards heads: replicated weights are whole everywhere
    progress("fingerprint", "fingerprinted the weights")

    # From here on, collectives (process groups).
    tp_group, dcp_group = _dcp_group(mesh, tp_rank, tp_size, dcp_size)
    layout = DCPLayout(dcp_size, interleave, page_size)
    for group in groups:
        captured, match = group.captured, group.match
        dequantized = False
        for layer in group.layers:
            dequantized |= dequantize_kv_expansion(layer.module, match)  # FP8 kv_b_proj -> compute dtype (fp8.py)
            shard_heads(layer.module, match, tp_rank, tp_size)
        if tp_size > 1 or dequantized:  # the weights changed shape or kind: trace the group's layer again
            captured, match = capture_and_match(group.first, captured.past_len)
            stats["traces"] += captured.traces
        rewrite = dcp_passes(match, attention_config(match, layout, tp_rank % dcp_size, dcp_group), tp_group)
        rewrite(captured.graph_module)
        for i, layer in enumerate(group.layers):  # the graph reads each layer's own parameters by name
            mine = captured if i == 0 else replace(captured, graph_module=_copy_graph_module(captured.graph_module))
            install(layer.module, DCPLayerForward(layer.module, mine, layer.layer_idx, layer.arg_names))
    progress("rewrite", f"sharded heads over {tp_size} rank(s), rewrote and installed {len(layers)} layers "
                        f"({stats['traces']} traces in all)")

    model.dcp = DCPRuntime(
        layout, tp_rank % dcp_size, tp_rank, tp_size, CacheFormat.of(layers), layers[0].key_rows.device,
        RankGroup(mesh.get_group() if tp_size > 1 else None, tp_rank, tp_size), fingerprint,
        _a_parameter(layers[0].module), cache_budget_tokens, verify_ranks, stats,
        index_topk=max((g.match.indexer.topk for g in groups if g.match.indexer), default=None),
    )
    install_hooks(model)
    model.train(was_training)
    stats["seconds"]["total"] = round(time.perf_counter() - progress.start, 3)
    return model


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule of its own for another layer: a copy of the graph (node metadata, read-only, is shared) with
    copies of its submodules (the DCP attention)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = copy.copy(gm.graph._codegen)  # the flat calling convention of capture._flat_codegen
    root = nn.Module()
    for name, sub in gm.named_children():
        root.add_module(name, copy.deepcopy(sub))
    return torch.fx.GraphModule(root, graph)


def _a_parameter(module: nn.Module):
    """(module, name, dtype, device) of one parameter of a rewritten layer, to notice a later .to()."""
    name, param = next(iter(module.named_parameters()))
    return module, name, param.dtype, param.device
