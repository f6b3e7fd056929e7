"""DSA lightning-indexer scores against this rank's own index-key rows (Triton host wrapper; kernel and its
design in ``kernels/indexer_scores.py``). The local top-k that follows is a stable argsort in
``ops/distributed.py`` (``local_topk_sorted``: ties to the lower position).

Precision: products and sums in fp32. bf16/fp16 operands go to the tensor cores as they are (every such
product is exact in fp32); fp32 operands (or mixed dtypes, cast to fp32) use IEEE fp32 dots, so no tf32
rounding. On CUDA the key tile (BLOCK_L) / warps / stages are autotuned, separately for decode (one query
per sequence) and prefill.
"""
from __future__ import annotations

import torch
import triton

from . import common
from .kernels.indexer_scores import indexer_scores_kernel


def _configs():
    return [
        triton.Config({"BLOCK_L": bl}, num_warps=w, num_stages=s)
        for bl, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4), (128, 4, 4)]
    ]


indexer_scores_tuned = triton.autotune(
    configs=_configs(),
    key=["D", "BLOCK_HI", "BLOCK_S", "CAST_F32", "DOT_PRECISION", "TUNE_BUCKET"],
)(indexer_scores_kernel)


def _check(q, w, k_pool, key_slots, allowed):
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    if k_pool.shape[1] != Di:
        raise ValueError(f"k_pool width {k_pool.shape[1]} != q width {Di}")
    if w.shape != (B, S, Hi) or key_slots.shape[0] != B or allowed.shape != (B, S, L):
        raise ValueError("shapes: w [B,S,Hi], key_slots [B,L], allowed [B,S,L]")


def indexer_scores(q, w, k_pool, key_slots, allowed, scale: float, *, block_l: int | None = None):
    """DSA lightning-indexer scores of queries against this rank's own index-key rows.
    q [B, S, Hi, Di] (any float dtype), w [B, S, Hi] fp32 (per-head weights, may be negative), k_pool [P, Di],
    key_slots [B, L] int32 (row of k_pool for local key l of sequence b; -1 = no key), allowed [B, S, L] bool.
    out[b,s,l] = Σ_h w[b,s,h] * relu(scale * (q[b,s,h,:]·k_pool[key_slots[b,l],:])) computed in fp32,
    and -inf where not allowed[b,s,l] or key_slots[b,l] < 0. Returns [B, S, L] fp32. P may be 0 (every slot
    is then -1). ``block_l`` (tests, benchmarks) fixes the key tile instead of autotuning it."""
    _check(q, w, k_pool, key_slots, allowed)
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    device = q.device
    out = common.empty((B, S, L), torch.float32, device)
    if out.numel() == 0:
        return out
    if k_pool.shape[0] == 0:  # an empty pool (a rank that owns no token yet): every slot is -1
        return out.fill_(float("-inf"))
    q, k_pool = common.unit_stride(q), common.unit_stride(k_pool)
    w = common.unit_stride(w.to(torch.float32))
    key_slots = common.int32_rows(key_slots)
    allowed_u8 = common.unit_stride(allowed.to(torch.bool)).view(torch.uint8)

    cast_f32 = q.dtype != k_pool.dtype
    BLOCK_HI = max(16, triton.next_power_of_2(Hi))
    BLOCK_D = max(16, triton.next_power_of_2(Di))
    # M side of the dot = BLOCK_S × BLOCK_HI; ≤ 128 rows (registers), ≥ 1 query
    BLOCK_S = max(1, min(triton.next_power_of_2(S), 128 // BLOCK_HI))
    n_sb = triton.cdiv(S, BLOCK_S)
    args = (q, w, k_pool, key_slots, allowed_u8, out, float(scale), S, L, Hi, n_sb,
            q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k_pool.stride(0),
            key_slots.stride(0), allowed_u8.stride(0), allowed_u8.stride(1), out.stride(0), out.stride(1))
    meta = dict(D=Di, BLOCK_D=BLOCK_D, BLOCK_HI=BLOCK_HI, BLOCK_S=BLOCK_S, CAST_F32=cast_f32,
                DOT_PRECISION=common.dot_precision(torch.float32 if cast_f32 else q.dtype))
    if common.fixed_launch(device) or block_l is not None:
        bl = block_l or 16
        indexer_scores_kernel[(B * n_sb * triton.cdiv(L, bl),)](*args, **meta, BLOCK_L=bl, TUNE_BUCKET=0)
    else:
        grid = lambda META: (B * n_sb * triton.cdiv(L, META["BLOCK_L"]),)  # noqa: E731
        indexer_scores_tuned[grid](*args, **meta, TUNE_BUCKET=0 if S == 1 else 1)
    return out
