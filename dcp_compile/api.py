"""``dcp_compile.apply(model, mesh)``: the pipeline — probe → capture → match → shard heads → rewrite →
install — then the runtime (``model.dcp``) and HF's generate hooked to use the sharded paged cache.

Everything that can reject the request (mesh shape, dcp_size, dtype, a layer that is not MLA sparse
attention, heads not divisible by the mesh) is checked before the first collective (creating the DCP
process groups), so a bad call fails the same way on every rank and never hangs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .agreement import RankGroup, weight_fingerprint
from .attention import AttentionConfig
from .cache import CacheFormat
from .capture import LayerCall, capture_layer, probe_layers
from .hf_integration import install_hooks
from .install import DCPLayerForward, install
from .layout import DCPLayout
from .match import MatchError, MLASparseAttentionMatch, match_layer
from .passes import dcp_passes
from .runtime import DCPRuntime
from .shard import shard_heads
from .support import UnsupportedModelError, check_layers, check_model  # noqa: F401  (UnsupportedModelError: re-export)

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
    bad = {p.dtype for p in model.parameters() if p.dtype not in SUPPORTED_DTYPES and p.is_floating_point()}
    if bad or not any(True for _ in model.parameters()):
        raise TypeError(f"unsupported parameter dtype(s) {sorted(map(str, bad))}; supported: {[str(d) for d in SUPPORTED_DTYPES]}")
    return dcp_size


def _find_layers(model: nn.Module) -> list[LayerCall]:
    layers = probe_layers(model)
    check_layers(model, layers)  # UnsupportedModelError naming the layer and the piece dcp_compile cannot rewrite
    return layers


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
    check_model(model)  # e.g. loaded with HF tensor parallelism: rejected before any probe
    dcp_size = _validate(model, mesh, dcp_size, page_size, interleave)
    tp_size, tp_rank = mesh.size(), mesh.get_local_rank()
    was_training = model.training
    model.eval()

    # Find, capture and match every layer; all of it local, so a rejection is the same on every rank.
    layers = _find_layers(model)
    matched, past_len = [], None
    for layer in layers:  # each trace starts at the past length that worked for the layer before
        matched.append(capture_and_match(layer, past_len))
        past_len = matched[-1][0].past_len
    for layer, (_, match) in zip(layers, matched):
        if match.heads % tp_size:
            raise ValueError(f"layer {layer.name}: {match.heads} attention heads are not divisible by the mesh size {tp_size}")
    fingerprint = weight_fingerprint(model)  # before head sharding: every rank still holds the whole model

    # From here on, collectives (process groups).
    tp_group, dcp_group = _dcp_group(mesh, tp_rank, tp_size, dcp_size)
    layout = DCPLayout(dcp_size, interleave, page_size)
    for layer, (captured, match) in zip(layers, matched):
        if tp_size > 1:  # shard the heads; the weights change shape, so trace the layer again
            shard_heads(layer.module, match, tp_rank, tp_size)
            captured, match = capture_and_match(layer, captured.past_len)
        rewrite = dcp_passes(match, attention_config(match, layout, tp_rank % dcp_size, dcp_group), tp_group)
        rewrite(captured.graph_module)
        install(layer.module, DCPLayerForward(layer.module, captured, layer.layer_idx, layer.arg_names))

    model.dcp = DCPRuntime(
        layout, tp_rank % dcp_size, tp_rank, tp_size, CacheFormat.of(layers), layers[0].key_rows.device,
        RankGroup(mesh.get_group() if tp_size > 1 else None, tp_rank, tp_size), fingerprint,
        _a_parameter(layers[0].module), cache_budget_tokens, verify_ranks,
    )
    install_hooks(model)
    model.train(was_training)
    return model


def _a_parameter(module: nn.Module):
    """(module, name, dtype, device) of one parameter of a rewritten layer, to notice a later .to()."""
    name, param = next(iter(module.named_parameters()))
    return module, name, param.dtype, param.device
