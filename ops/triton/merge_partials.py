"""Split-K combine of sparse MLA attention (Triton host wrapper; kernel in ``kernels/merge_partials.py``).

Given P partial results of the same softmax attention over disjoint key sets, ``o_p`` (each normalised over
its own keys) and ``lse_p`` (natural log, ``-inf`` for an empty part):

    lse = log Σ_p exp(lse_p);   o = Σ_p exp(lse_p - lse) · o_p

An empty part has weight exactly 0 (its ``o_p`` is never loaded when lse_p = -inf, so a NaN there cannot
leak); if every part is empty, ``o = 0`` and ``lse = -inf``.

This combines the row splits of one query inside :mod:`sparse_mla_attn`. It is not the DCP cross-rank
merge: that is ``dcp::lse_combine`` + a reduce-scatter of heads (``lse_merge`` in ``ops/distributed.py``,
docs/design.md §4.6).
"""
from __future__ import annotations

import torch
import triton

from . import common
from .kernels.merge_partials import merge_partials_kernel


def merge_partials_into(o_part, lse_part, out, lse_out):
    """Merge ``o_part`` [P, T, H, V] (any float dtype, last dim contiguous; may be a strided view) and
    ``lse_part`` [P, T, H] fp32 into preallocated ``out`` [T, H, V] and ``lse_out`` [T, H] fp32."""
    P, T, H, V = o_part.shape
    if T == 0 or H == 0:
        return out, lse_out
    assert o_part.stride(-1) == 1 and out.stride(-1) == 1
    assert lse_part.dtype == torch.float32 and lse_out.dtype == torch.float32
    block_h = min(16, triton.next_power_of_2(H))
    block_v = min(128, triton.next_power_of_2(V))
    grid = (T * triton.cdiv(H, block_h), triton.cdiv(V, block_v))
    common.launch(merge_partials_kernel)[grid](
        o_part, lse_part, out, lse_out,
        T, H, P,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1),
        lse_out.stride(0), lse_out.stride(1),
        V_DIM=V, BLOCK_H=block_h, BLOCK_V=block_v,
        num_warps=4,
    )
    return out, lse_out


def merge_partials(o_parts, lse_parts):
    """o_parts [P, T, H, V] (float dtype), lse_parts [P, T, H] fp32 (natural log, -inf = empty part)
    -> (out [T, H, V] in o_parts' dtype, lse [T, H] fp32). An empty part never contributes (no 0·NaN)."""
    P, T, H, V = o_parts.shape
    o_parts = common.unit_stride(o_parts)
    lse_parts = lse_parts.float()
    out = common.empty((T, H, V), o_parts.dtype, o_parts.device)
    lse = common.empty((T, H), torch.float32, o_parts.device)
    return merge_partials_into(o_parts, lse_parts, out, lse)
