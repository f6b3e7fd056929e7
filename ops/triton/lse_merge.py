"""Merge partial attention results by log-sum-exp (Triton).

Given P partial results of the same softmax attention over disjoint key sets, ``o_p`` (each normalised
over its own keys) and ``lse_p`` (natural log, ``-inf`` for an empty part):

    lse = log Σ_p exp(lse_p);   o = Σ_p exp(lse_p - lse) · o_p

An empty part has weight exactly 0 (its ``o_p`` is never multiplied in when lse_p = -inf, so a NaN there
cannot leak); if every part is empty, ``o = 0`` and ``lse = -inf``.

Used for the split-K combine of :mod:`sparse_mla_attn` and for the DCP cross-rank merge (DCP.md §4 step 6).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _lse_merge_kernel(
    O_PART, LSE_PART, OUT, LSE_OUT,
    T, H, NPART,
    stride_op, stride_ot, stride_oh,      # O_PART [P, T, H, V] by strides; last dim contiguous
    stride_lp, stride_lt, stride_lh,      # LSE_PART [P, T, H]
    stride_out_t, stride_out_h,           # OUT [T, H, V]
    stride_lse_t, stride_lse_h,           # LSE_OUT [T, H]
    V_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    t = (pid // n_hb).to(tl.int64)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_DIM

    # pass 1: running max of the parts' lse
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for p in range(0, NPART):
        lse_p = tl.load(LSE_PART + p * stride_lp + t * stride_lt + offs_h * stride_lh,
                        mask=mask_h, other=float("-inf"))
        m = tl.maximum(m, lse_p)
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    # pass 2: weighted sum; a part with lse = -inf gets weight 0 and its rows are not read
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    den = tl.zeros([BLOCK_H], tl.float32)
    for p in range(0, NPART):
        lse_p = tl.load(LSE_PART + p * stride_lp + t * stride_lt + offs_h * stride_lh,
                        mask=mask_h, other=float("-inf"))
        live = lse_p > float("-inf")
        w = tl.where(live, tl.exp(lse_p - m_safe), 0.0)
        o_p = tl.load(O_PART + p * stride_op + t * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :],
                      mask=(mask_h & live)[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        acc += w[:, None] * o_p
        den += w

    nonempty = den > 0
    den_safe = tl.where(nonempty, den, 1.0)
    out = acc / den_safe[:, None]
    tl.store(OUT + t * stride_out_t + offs_h[:, None] * stride_out_h + offs_v[None, :],
             out.to(OUT.dtype.element_ty), mask=mask_h[:, None] & mask_v[None, :])
    if pid_v == 0:
        lse = tl.where(nonempty, m_safe + tl.log(den_safe), float("-inf"))
        tl.store(LSE_OUT + t * stride_lse_t + offs_h * stride_lse_h, lse, mask=mask_h)


def _empty(shape, dtype, device):
    """Allocation hook (tests replace it with a NaN-filling one to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def lse_merge_into(o_part, lse_part, out, lse_out):
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
    _lse_merge_kernel[grid](
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


def lse_merge(o_parts, lse_parts):
    """o_parts [P, T, H, V] (float dtype), lse_parts [P, T, H] fp32 (natural log, -inf = empty part)
    -> (out [T, H, V] in o_parts' dtype, lse [T, H] fp32). An empty part never contributes (no 0·NaN)."""
    P, T, H, V = o_parts.shape
    if o_parts.stride(-1) != 1:
        o_parts = o_parts.contiguous()
    lse_parts = lse_parts.float()
    out = _empty((T, H, V), o_parts.dtype, o_parts.device)
    lse = _empty((T, H), torch.float32, o_parts.device)
    return lse_merge_into(o_parts, lse_parts, out, lse)
