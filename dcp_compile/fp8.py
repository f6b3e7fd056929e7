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

Not supported (``UnsupportedModelError`` from ``check_fp8_layer``): FP8 modules in an attention layer other than
``FP8Linear`` (e.g. ``FP8GroupedLinear``), and FP8 attention linears sharded or wrapped by HF tensor
parallelism (load the attention replicated: not yet adopted for FP8).
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
    weight = dequantize(linear.weight.detach(), linear.weight_scale_inv.detach(), linear.block_size, dtype)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        plain.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    module.set_submodule(name, plain)
    return True


# --- what apply checks before any collective -------------------------------------------------------------------------
def check_fp8_layer(module: nn.Module, match, plan, tp_size: int, wrapped: tuple[str, ...] = ()) -> None:
    """Raise ``UnsupportedModelError`` (naming the layer, module and numbers) for FP8 in an attention layer that
    ``apply`` cannot run: an FP8 module other than ``FP8Linear``, an FP8 linear that HF tensor parallelism wraps
    or shards, or a head-sharded FP8 linear whose per-rank rows (colwise) / columns (rowwise) are not whole
    blocks. ``plan``: ``shard.head_shard_plan(match)``."""
    from .hf_parallel import is_dtensor
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
        if name in wrapped or any(is_dtensor(p) for p in sub.parameters(recurse=False)):
            raise UnsupportedModelError(
                f"layer {layer}: the FP8 linear `{name}` is sharded by Hugging Face tensor parallelism; dcp_compile does "
                f"not adopt HF's shards of FP8 attention weights yet: load the model whole on every rank (apply shards "
                f"the heads and their block scales itself)")
    if tp_size <= 1:
        return
    from .contract import graph_input
    from .match import source

    heads, expansion = match.heads, graph_input(source(match.kv_expansion.weight)).what  # kv_b: dequantized whole
    for linear in plan:
        owner, sub = _owner(module, linear.weight)
        if linear.weight == expansion or not is_fp8_linear(sub) or sub.block_size is None or linear.per_head == 1:
            continue
        block = sub.block_size[linear.dim]
        width = heads // tp_size * linear.per_head
        if width % block:
            what = "rows" if linear.dim == 0 else "columns"
            raise UnsupportedModelError(
                f"layer {layer}: `{owner}` is an FP8 linear with {sub.block_size[0]} x {sub.block_size[1]} scale blocks, "
                f"sharded {linear.style} by head over {tp_size} ranks: each rank's {heads // tp_size} heads x "
                f"{linear.per_head} {what} = {width} {what} are not a multiple of the block's {block}, so the block "
                f"scales cannot be split with them; use a tensor-parallel size for which "
                f"heads/TP x {linear.per_head} is a multiple of {block}")


def shard_fp8_scales(module: nn.Module, weight_name: str, dim: int, lo: int, hi: int) -> None:
    """After ``shard.shard_heads`` kept rows (dim 0) or columns (dim 1) ``[lo, hi)`` of an FP8 linear's weight:
    keep the block scales of those rows / columns and set the linear's features to its new shape. Per-tensor
    scales (no blocks) stay whole. ``check_fp8_layer`` made sure ``lo`` and ``hi`` are block boundaries."""
    _, sub = _owner(module, weight_name)
    if not is_fp8_linear(sub):
        return
    if sub.block_size is not None and sub.weight_scale_inv.dim() == 2:
        block = sub.block_size[dim]
        keep = slice(lo // block, -(-hi // block))
        scales = sub.weight_scale_inv.detach()
        sub.weight_scale_inv = nn.Parameter((scales[keep] if dim == 0 else scales[:, keep]).contiguous().clone(),
                                            requires_grad=False)
    sub.out_features, sub.in_features = sub.weight.shape
