"""DSA lightning-indexer scores against this rank's own index-key rows (Triton), fused in one kernel:
gather of the key rows through ``key_slots`` + dot with every index head + relu + weighted head sum + mask.

A program owns one sequence b, BLOCK_S queries and BLOCK_L local keys. The queries' heads are flattened
into the M side of one ``tl.dot`` (M = BLOCK_S × BLOCK_HI), so each gathered key row is read once per
program and scored against all heads of all its queries; the per-head scores never reach memory.
A key tile with no allowed (query, key) pair is skipped (causal prefill skips about half). The local top-k
that follows is ``torch.topk`` on the result.

Precision: products and sums in fp32. bf16/fp16 operands go to the tensor cores as they are (every such
product is exact in fp32); fp32 operands use IEEE fp32 dots, so no tf32 rounding.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    return [
        triton.Config({"BLOCK_L": bl}, num_warps=w, num_stages=s)
        for bl, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4), (128, 4, 4)]
    ]


@triton.jit
def _indexer_scores_kernel(
    Q, W, KP, KS, ALLOWED, OUT,
    scale,
    S, L, HI, n_sb,
    stride_qb, stride_qs, stride_qh,   # q [B, S, Hi, Di], last dim contiguous
    stride_wb, stride_ws,              # w [B, S, Hi], last dim contiguous
    stride_kp,                         # k_pool [P, Di], last dim contiguous
    stride_ksb,                        # key_slots [B, L], last dim contiguous
    stride_ab, stride_as,              # allowed [B, S, L] (uint8 view), last dim contiguous
    stride_ob, stride_os,              # out [B, S, L], last dim contiguous
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr,
    TUNE_BUCKET: tl.constexpr,         # autotune key only
):
    pid = tl.program_id(0)
    n_lb = tl.cdiv(L, BLOCK_L)
    lb = pid % n_lb
    rest = pid // n_lb
    sb = rest % n_sb
    b = (rest // n_sb).to(tl.int64)

    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    slot = tl.load(KS + b * stride_ksb + offs_l, mask=mask_l, other=-1)
    has_key = slot >= 0
    allowed = tl.load(ALLOWED + b * stride_ab + offs_s[:, None] * stride_as + offs_l[None, :],
                      mask=mask_s[:, None] & mask_l[None, :], other=0)
    ok = (allowed != 0) & has_key[None, :]

    res = tl.full([BLOCK_S, BLOCK_L], float("-inf"), tl.float32)
    if tl.max(ok.to(tl.int32)) > 0:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        offs_h = tl.arange(0, BLOCK_HI)
        mask_h = offs_h < HI
        k = tl.load(KP + slot.to(tl.int64)[:, None] * stride_kp + offs_d[None, :],
                    mask=has_key[:, None] & mask_d[None, :], other=0.0)
        q = tl.load(Q + b * stride_qb + offs_s[:, None, None] * stride_qs + offs_h[None, :, None] * stride_qh
                    + offs_d[None, None, :],
                    mask=mask_s[:, None, None] & mask_h[None, :, None] & mask_d[None, None, :], other=0.0)
        q = tl.reshape(q, (BLOCK_S * BLOCK_HI, BLOCK_D))
        if CAST_F32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = tl.maximum(sc * scale, 0.0)
        w = tl.load(W + b * stride_wb + offs_s[:, None] * stride_ws + offs_h[None, :],
                    mask=mask_s[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        sc = sc * tl.reshape(w, (BLOCK_S * BLOCK_HI,))[:, None]
        tot = tl.sum(tl.reshape(sc, (BLOCK_S, BLOCK_HI, BLOCK_L)), 1)
        res = tl.where(ok, tot, float("-inf"))
    tl.store(OUT + b * stride_ob + offs_s[:, None] * stride_os + offs_l[None, :], res,
             mask=mask_s[:, None] & mask_l[None, :])


_indexer_scores_tuned = triton.autotune(
    configs=_configs(),
    key=["D", "BLOCK_HI", "BLOCK_S", "CAST_F32", "IEEE", "TUNE_BUCKET"],
)(_indexer_scores_kernel)


def _empty(shape, dtype, device):
    """Allocation hook (tests replace it with a NaN-filling one to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def indexer_scores(q, w, k_pool, key_slots, allowed, scale: float, *, block_l: int | None = None):
    """DSA lightning-indexer scores of queries against this rank's own index-key rows.
    q [B, S, Hi, Di] (any float dtype), w [B, S, Hi] fp32 (per-head weights, may be negative), k_pool [P, Di],
    key_slots [B, L] int32 (row of k_pool for local key l of sequence b; -1 = no key), allowed [B, S, L] bool.
    out[b,s,l] = Σ_h w[b,s,h] * relu(scale * (q[b,s,h,:]·k_pool[key_slots[b,l],:])) computed in fp32,
    and -inf where not allowed[b,s,l] or key_slots[b,l] < 0. Returns [B, S, L] fp32."""
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    if k_pool.shape[1] != Di:
        raise ValueError(f"k_pool width {k_pool.shape[1]} != q width {Di}")
    if w.shape != (B, S, Hi) or key_slots.shape[0] != B or allowed.shape != (B, S, L):
        raise ValueError("shapes: w [B,S,Hi], key_slots [B,L], allowed [B,S,L]")
    device = q.device
    out = _empty((B, S, L), torch.float32, device)
    if out.numel() == 0:
        return out
    if k_pool.shape[0] == 0:  # an empty pool (a rank that owns no token yet): every slot is -1
        return out.fill_(float("-inf"))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_pool.stride(-1) != 1:
        k_pool = k_pool.contiguous()
    w = w.to(torch.float32)
    if w.stride(-1) != 1:
        w = w.contiguous()
    if key_slots.dtype != torch.int32 or key_slots.stride(-1) != 1:
        key_slots = key_slots.to(torch.int32).contiguous()
    allowed = allowed.to(torch.bool)
    if allowed.stride(-1) != 1:
        allowed = allowed.contiguous()
    allowed_u8 = allowed.view(torch.uint8)

    same = q.dtype == k_pool.dtype
    cast_f32 = not same
    ieee = cast_f32 or q.dtype == torch.float32
    BLOCK_HI = max(16, triton.next_power_of_2(Hi))
    BLOCK_D = max(16, triton.next_power_of_2(Di))
    # M side of the dot = BLOCK_S × BLOCK_HI; ≤ 128 rows (registers), ≥ 1 query
    BLOCK_S = max(1, min(triton.next_power_of_2(S), 128 // BLOCK_HI))
    n_sb = triton.cdiv(S, BLOCK_S)
    args = (q, w, k_pool, key_slots, allowed_u8, out, float(scale), S, L, Hi, n_sb)
    strides = (q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k_pool.stride(0),
               key_slots.stride(0), allowed_u8.stride(0), allowed_u8.stride(1), out.stride(0), out.stride(1))
    meta = dict(D=Di, BLOCK_D=BLOCK_D, BLOCK_HI=BLOCK_HI, BLOCK_S=BLOCK_S, CAST_F32=cast_f32, IEEE=ieee)
    if _INTERPRET or device.type != "cuda" or block_l is not None:
        bl = block_l or 16
        _indexer_scores_kernel[(B * n_sb * triton.cdiv(L, bl),)](*args, *strides, **meta, BLOCK_L=bl,
                                                                 TUNE_BUCKET=0)
    else:
        bucket = 0 if S == 1 else 1
        grid = lambda META: (B * n_sb * triton.cdiv(L, META["BLOCK_L"]),)  # noqa: E731
        _indexer_scores_tuned[grid](*args, *strides, **meta, TUNE_BUCKET=bucket)
    return out
