"""Block-FP8 checkpoints (DeepSeek-V3.2's released weights): Hugging Face's fine-grained FP8 linears under ``apply``.

transformers loads such a checkpoint (``quantization_config``: quant_method "fp8", ``weight_block_size``
[128, 128]) with every linear an ``FP8Linear``: a float8_e4m3fn ``weight`` [N, K] and ``weight_scale_inv``
[ceil(N/bn), ceil(K/bk)], one scale per bn × bk block (the weight's value is ``weight × scale`` of its block).
Its forward is ``fp8_linear`` (DeepGEMM or HF's Triton kernel on CUDA: the activations are quantized per
1 × bk block on the fly, then an FP8 matmul). What ``apply`` does with them:

* **Capture.** While a layer is traced, each ``FP8Linear`` of it runs ``dcp_fp8::linear`` instead, a custom op
  whose arguments begin like ``aten.linear``'s — (input, weight, bias, weight_scale_inv, block_size,
  activation_scale, allow_deepgemm) — and whose implementation is HF's ``fp8_linear`` itself. So the captured
  graph shows the projection as one node the matcher reads like a linear (``LINEARS``), and the installed graph
  runs exactly HF's FP8 computation (its kernels, its activation quantization) for every projection it keeps.
* **kv_b_proj is dequantized at apply time.** The DCP attention absorbs ``W_UK`` into the query and applies
  ``W_UV`` to the attended latent (docs/design.md), which needs the per-head expansion weight in high precision.
  ``dequantize_kv_expansion`` replaces the layer's ``kv_b_proj`` ``FP8Linear`` by a plain ``nn.Linear``
  holding ``weight × block scales`` in the compute dtype (the dtype of the latent it expands): the rewritten
  graph reads it every step with no dequantization in the decode step. Memory: only ``kv_b_proj`` grows, from
  1 byte per weight (plus scales) to 2 bytes in bf16 — DeepSeek-V3.2: 61 × 16.8 M weights = 1.02 GB more over
  the whole model, 1/TP of it per rank.
* **Head sharding slices the block scales with the weight** (``shard.shard_heads``): a colwise projection
  (``q_b_proj``) keeps its head rows of the weight and the matching rows of scales, a rowwise one (``o_proj``)
  its columns and the matching columns of scales. That needs each rank's heads to cover whole blocks:
  heads_per_rank × per-head width must be a multiple of the block (``check_fp8_layer``, before any collective).
  With whole blocks, the row-parallel ``o_proj`` also quantizes its activations in the same 1 × bk blocks as the
  unsharded one, so the all-reduced partial products are the unsharded product up to summation order.

* **Hugging Face tensor parallelism** (``from_pretrained(..., tp_plan="auto")`` on the FP8 checkpoint, FP8Linear
  kept). HF's FP8 quantizer gives each ``weight_scale_inv`` its linear's style, so ``q_b_proj`` / ``kv_b_proj``
  hold ``Shard(0)`` DTensors of weight and scales, ``o_proj`` ``Shard(1)`` of both (torch's even chunks, rank
  ``t`` holding chunk ``t``). ``apply`` adopts them as it adopts bf16 head shards (``shard.check_head_shards``,
  ``shard.shard_heads``): each rank keeps its local weight and its local scales, which describe the same rows /
  columns only when each rank's share of the weight is whole blocks — ``check_fp8_shards`` checks that for every
  HF-sharded FP8 linear from the global shapes before the first forward (the same verdict on every rank), naming
  the numbers otherwise.
  ``kv_b_proj``'s local shard is dequantized with its local scales (``dequantize_kv_expansion``; it stays a
  ``Shard(0)`` DTensor until ``shard_heads`` adopts it); ``o_proj``'s rowwise reduction is apply's all-reduce, as
  for bf16. HF's forward wrappers (those of the sharded linears, and ``kv_a_proj_with_mqa``'s, which only adds a
  backward all-reduce) are bypassed by the trace and not run by the installed graph.
* **Partial edge blocks** (the release's ``kv_a_proj_with_mqa``: 576 rows, scale grid [5, 56]): ``FP8Linear`` holds a
  ceil-sized scale grid and HF's kernels, ``dequantize`` and ``dequantizing_fp8_linear`` read it; only transformers'
  dequantizing *load* (``FineGrainedFP8Config(dequantize=True)``, which derives the block from the grid) rejects it.
  Load the checkpoint with its FP8 linears kept (no ``dequantize=True``).

Not supported (``UnsupportedModelError`` from ``check_fp8_layer``): FP8 modules in an attention layer other than
``FP8Linear`` (e.g. ``FP8GroupedLinear``), and head shards (apply's or HF's) that do not cover whole scale blocks.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # what dequantize reads (not FP4 packed in int8)


def _hf():
    from transformers.integrations import finegrained_fp8

    return finegrained_fp8


def is_fp8_linear(module: nn.Module) -> bool:
    """Exactly HF's ``FP8Linear`` (not a subclass with another forward) holding a float8 weight."""
    return type(module) is _hf().FP8Linear and module.weight.dtype in FP8_WEIGHT_DTYPES


def _runs_unquantized(module: nn.Module) -> bool:
    """An ``FP8Linear`` whose weight was left in high precision: its forward is a plain ``F.linear``."""
    return type(module) is _hf().FP8Linear and module.weight.element_size() > 1


def hf_fp8_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """HF's fine-grained FP8 modules of ``model`` (linears, experts, embeddings), with their names."""
    hf = _hf()
    kinds = tuple(getattr(hf, n) for n in ("FP8Linear", "FP8Experts", "FP8Embedding") if hasattr(hf, n))
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def hf_fp8_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that HF's FP8 modules own (FP8 weights, their scales): the float8 tensors ``apply``
    accepts; a float8 parameter anywhere else is rejected (``api._validate``)."""
    return {id(p) for _, m in hf_fp8_modules(model) for p in m.parameters(recurse=False)}


# --- the projection in captured graphs ----------------------------------------------------------------------------------
@torch.library.custom_op("dcp_fp8::linear", mutates_args=())
def fp8_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scale_inv: torch.Tensor,
               block_size: list[int] | None, activation_scale: torch.Tensor | None, allow_deepgemm: bool) -> torch.Tensor:
    """HF's ``FP8Linear`` forward (``transformers.integrations.finegrained_fp8.fp8_linear``, looked up at each call),
    as one op: (input, weight, bias) first, like ``aten.linear``."""
    return _hf().fp8_linear(input, weight, weight_scale_inv, block_size, bias, activation_scale, allow_deepgemm)


@fp8_linear.register_fake
def _(input, weight, bias, weight_scale_inv, block_size, activation_scale, allow_deepgemm):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


FP8_LINEAR = torch.ops.dcp_fp8.linear.default


def _traced_forward(self, input: torch.Tensor) -> torch.Tensor:
    return torch.ops.dcp_fp8.linear(input, self.weight, self.bias, self.weight_scale_inv,
                                    list(self.block_size) if self.block_size is not None else None,
                                    self.activation_scale, not self._deepgemm_disabled)


@contextmanager
def traced_fp8_linears(module: nn.Module):
    """While open, every ``FP8Linear`` under ``module`` runs ``dcp_fp8::linear`` (what the trace records)."""
    patched = [sub for sub in module.modules() if is_fp8_linear(sub) and "forward" not in vars(sub)]
    try:
        for sub in patched:
            sub.forward = _traced_forward.__get__(sub)
        yield
    finally:
        for sub in patched:
            del sub.forward


# --- dequantization ----------------------------------------------------------------------------------------------------
def dequantize(weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size, dtype: torch.dtype) -> torch.Tensor:
    """``weight × scale`` of its block, in ``dtype`` (computed in float32, or float64 for a float64 ``dtype``).
    ``block_size`` None: one scale for the whole tensor. Edge blocks may be partial (ceil-sized scale grid)."""
    work = torch.promote_types(dtype, torch.float32)
    w, s = weight.to(work), weight_scale_inv.to(work)
    if block_size is None or s.dim() == 0:
        return (w * s).to(dtype)
    rows, cols = w.shape[-2:]
    bn, bk = block_size
    if s.shape[-2:] != (-(-rows // bn), -(-cols // bk)):
        raise ValueError(f"weight_scale_inv of shape {tuple(s.shape)} does not fit a [{rows}, {cols}] weight in "
                         f"{bn} x {bk} blocks")
    s = s.repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)[..., :cols]
    return (w * s).to(dtype)


def quantize(weight: torch.Tensor, block_size, dtype: torch.dtype = torch.float8_e4m3fn):
    """(FP8 weight, ``weight_scale_inv``) of a [N, K] weight in ``block_size`` blocks (the inverse of ``dequantize``
    up to FP8 rounding): each block scaled so its largest magnitude is the FP8 maximum, as HF's ``Fp8Quantize``
    does; edge blocks may be partial. For building test checkpoints."""
    rows, cols = weight.shape
    bn, bk = block_size
    grid = (-(-rows // bn), -(-cols // bk))
    padded = weight.new_zeros(grid[0] * bn, grid[1] * bk, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    amax = padded.reshape(grid[0], bn, grid[1], bk).abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    full = scale_inv.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:rows, :cols]
    return (weight.float() / full).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype), scale_inv


def dequantizing_fp8_linear(input, weight, weight_scale_inv, block_size=None, bias=None, activation_scale=None,
                            allow_deepgemm=True):
    """A stand-in for HF's ``fp8_linear`` (same signature) that multiplies by the dequantized weight: what HF
    computes with ``FineGrainedFP8Config(dequantize=True)``, minus the activation quantization of its kernels. For
    machines without those kernels (CPU tests; ``use_dequantizing_fp8_linear``)."""
    return F.linear(input, dequantize(weight, weight_scale_inv, block_size, input.dtype), bias)


@contextmanager
def use_dequantizing_fp8_linear():
    """Run HF's ``FP8Linear`` (and ``dcp_fp8::linear``) with ``dequantizing_fp8_linear`` while open."""
    hf = _hf()
    saved = hf.fp8_linear
    hf.fp8_linear = dequantizing_fp8_linear
    try:
        yield
    finally:
        hf.fp8_linear = saved


def _owner(module: nn.Module, param: str) -> tuple[str, nn.Module]:
    owner = param.rpartition(".")[0]
    return owner, (module.get_submodule(owner) if owner else module)


def dequantize_kv_expansion(module: nn.Module, match) -> bool:
    """If the layer's per-head expansion (``kv_b_proj``) is an ``FP8Linear``, replace it by an ``nn.Linear`` holding
    the dequantized weight in the dtype of the latent it expands; True if it did."""
    from .contract import graph_input
    from .match import source

    kv = match.kv_expansion
    if kv.linear.target is not FP8_LINEAR:
        return False
    name, linear = _owner(module, graph_input(source(kv.weight)).what)
    dtype = match.latent_cache.latent_all.meta["val"].dtype
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    weight, scales = linear.weight.detach(), linear.weight_scale_inv.detach()
    if _hf_sharded(weight):
        # HF tensor parallelism's shard of this rank: its local rows with its local scales (check_fp8_layer: the
        # same rows, whole blocks), kept a DTensor of the same placement so shard_heads adopts it as any HF shard.
        from torch.distributed.tensor import DTensor

        local = dequantize(weight.to_local(), scales.to_local(), linear.block_size, dtype)
        weight = DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                    shape=weight.shape, stride=weight.stride())
    else:
        weight = dequantize(_whole(weight), _whole(scales), linear.block_size, dtype)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        bias = linear.bias.detach()
        plain.bias = nn.Parameter(bias.to(dtype), requires_grad=False)  # a DTensor stays one (shard_heads adopts it)
    module.set_submodule(name, plain)
    return True


def _hf_sharded(t) -> bool:
    """A DTensor that HF tensor parallelism shards (not replicated)."""
    from .hf_parallel import is_dtensor

    return is_dtensor(t) and not all(p.is_replicate() for p in t.placements)


def _whole(t):
    """A plain tensor, or the local (whole) copy of a replicated DTensor."""
    from .hf_parallel import is_dtensor

    return t.to_local() if is_dtensor(t) else t


def block_scales_name(module: nn.Module, weight_name: str) -> str | None:
    """The qualified name of the block scales (``weight_scale_inv``, 2-D) of the FP8 linear owning ``weight_name``
    in ``module``, or None (not an FP8 linear, or per-tensor scales)."""
    owner, sub = _owner(module, weight_name)
    if not is_fp8_linear(sub) or sub.block_size is None or sub.weight_scale_inv.dim() != 2:
        return None
    return f"{owner}.weight_scale_inv" if owner else "weight_scale_inv"


# --- what apply checks before any collective -------------------------------------------------------------------------
def check_fp8_layer(module: nn.Module, match, plan, tp_size: int) -> None:
    """Raise ``UnsupportedModelError`` (naming the layer, module and numbers) for FP8 in an attention layer that
    ``apply`` cannot run: an FP8 module other than ``FP8Linear``, or a head-sharded FP8 linear whose per-rank rows
    (colwise) / columns (rowwise) are not whole blocks. ``plan``: ``shard.head_shard_plan(match)``. Shards that
    Hugging Face tensor parallelism made were checked already: their scales against their weights before the
    probe (``check_fp8_shards``), their placements by head (``shard.check_head_shards``)."""
    from .support import UnsupportedModelError

    layer = match.layer
    fp8 = dict(hf_fp8_modules(module))
    for name, sub in fp8.items():
        if _runs_unquantized(sub):
            continue
        if not is_fp8_linear(sub):
            raise UnsupportedModelError(
                f"layer {layer}: `{name}` is a {type(sub).__name__} holding {sub.weight.dtype} weights; dcp_compile runs "
                f"quantized attention weights only as transformers' FP8Linear with float8 weights (block-FP8 linears)")
    if tp_size <= 1:
        return
    from .contract import graph_input
    from .match import source

    heads, expansion = match.heads, graph_input(source(match.kv_expansion.weight)).what
    for linear in plan:
        owner, sub = _owner(module, linear.weight)
        if not is_fp8_linear(sub) or sub.block_size is None or linear.per_head == 1:
            continue
        hf_shards = _hf_sharded(sub.weight) or _hf_sharded(sub.weight_scale_inv)
        if linear.weight == expansion and not hf_shards:
            continue  # kv_b_proj held whole: dequantized whole, then cut like any plain weight
        block = sub.block_size[linear.dim]
        width = heads // tp_size * linear.per_head
        what = "rows" if linear.dim == 0 else "columns"
        blocks = f"{sub.block_size[0]} x {sub.block_size[1]} scale blocks"
        if width % block:  # (HF's shards of such a split were rejected before the probe: check_fp8_shards)
            raise UnsupportedModelError(
                f"layer {layer}: `{owner}` is an FP8 linear with {blocks}, sharded {linear.style} by head over "
                f"{tp_size} ranks: each rank's {heads // tp_size} heads x {linear.per_head} {what} = {width} "
                f"{what} are not a multiple of the block's {block}, so the block scales cannot be split with them; use "
                f"a tensor-parallel size for which heads/TP x {linear.per_head} is a multiple of {block}")


def check_fp8_shards(model: nn.Module) -> None:
    """Before any forward (``support.check_model``): every ``FP8Linear`` whose weight Hugging Face tensor
    parallelism sharded holds, on every rank, the block scales of exactly its rows / columns — else HF's own
    forward (the probe's) would scale them with another block's scales. Computed from the global shapes and
    torch's chunking (``ceil(size / ranks)`` per rank), so every rank raises the same ``UnsupportedModelError``."""
    from .support import UnsupportedModelError

    for name, sub in hf_fp8_modules(model):
        if not is_fp8_linear(sub) or not (_hf_sharded(sub.weight) or _hf_sharded(sub.weight_scale_inv)):
            continue
        weight, scales = sub.weight, sub.weight_scale_inv
        dims = _shard_dims(weight)
        if (sub.block_size is None or scales.dim() != 2 or len(dims) != 1 or dims != _shard_dims(scales)
                or weight.device_mesh != getattr(scales, "device_mesh", None)):
            raise UnsupportedModelError(
                f"`{name}` is an FP8 linear whose weight ({_placement(weight)}, shape {tuple(weight.shape)}) and block "
                f"scales ({_placement(scales)}, shape {tuple(scales.shape)}) Hugging Face tensor parallelism split "
                f"differently; dcp_compile takes an FP8 linear sharded as one dim of weight and scales alike over one "
                f"mesh (HF's plan 'auto' does), or replicated")
        dim, ranks = dims[0], weight.device_mesh.size()
        if dim is None:
            continue
        size, grid, block = weight.shape[dim], scales.shape[dim], sub.block_size[dim]
        rows, blocks = -(-size // ranks), -(-grid // ranks)  # torch's chunks: the last ranks may hold fewer
        for rank in range(ranks):
            lo, hi = min(rank * rows, size), min((rank + 1) * rows, size)
            mine = (min(rank * blocks, grid), min((rank + 1) * blocks, grid))
            if hi > lo and mine != (lo // block, -(-hi // block)) or hi == lo and mine[1] > mine[0]:
                what = "rows" if dim == 0 else "columns"
                raise UnsupportedModelError(
                    f"`{name}` is an FP8 linear with {sub.block_size[0]} x {sub.block_size[1]} scale blocks that Hugging "
                    f"Face tensor parallelism splits over {ranks} ranks into {rows} {what} per rank ({size} in all): "
                    f"rank {rank} holds {what} [{lo}, {hi}) but scale blocks [{mine[0]}, {mine[1]}) of {grid}, not "
                    f"those of its {what} ([{lo // block}, {-(-hi // block)})), so its FP8 weights would be scaled "
                    f"wrongly; use a tensor-parallel size that splits {size} {what} into whole blocks of {block}, or "
                    f"keep this module replicated (DistributedConfig(tp_plan={{...: 'replicate'}}))")


def _shard_dims(t) -> list[int | None]:
    """Per mesh dim of a DTensor: the tensor dim it shards, or None ([None] for a plain tensor)."""
    from .hf_parallel import is_dtensor

    if not is_dtensor(t):
        return [None]
    return [p.dim % t.ndim if p.is_shard() else None for p in t.placements]


def _placement(t) -> str:
    from .hf_parallel import is_dtensor

    return ", ".join(map(repr, t.placements)) if is_dtensor(t) else "a plain tensor"


def shard_fp8_scales(module: nn.Module, weight_name: str, dim: int, lo: int, hi: int) -> None:
    """After ``shard.shard_heads`` kept rows (dim 0) or columns (dim 1) ``[lo, hi)`` of an FP8 linear's weight:
    keep the block scales of those rows / columns and set the linear's features to its new shape. Scales that HF
    tensor parallelism sharded are those already (this rank's local shard, adopted); per-tensor scales (no blocks)
    stay whole. ``check_fp8_layer`` made sure ``lo`` and ``hi`` are block boundaries, and HF's local scales the
    blocks of its local weight."""
    _, sub = _owner(module, weight_name)
    if not is_fp8_linear(sub):
        return
    scales = sub.weight_scale_inv.detach()
    if _hf_sharded(scales):
        sub.weight_scale_inv = nn.Parameter(scales.to_local(), requires_grad=False)
    elif sub.block_size is not None and scales.dim() == 2:
        block = sub.block_size[dim]
        keep = slice(lo // block, -(-hi // block))
        scales = _whole(scales)
        sub.weight_scale_inv = nn.Parameter((scales[keep] if dim == 0 else scales[:, keep]).contiguous().clone(),
                                            requires_grad=False)
    sub.out_features, sub.in_features = sub.weight.shape
