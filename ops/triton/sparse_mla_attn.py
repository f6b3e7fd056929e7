"""Sparse MLA attention over compacted gathered latent rows (Triton).

One KV head (MQA after weight absorption, DCP.md §2): every head of query t attends to the same gathered
rows ``kv[slots[t, j]]`` (``c ‖ k_rope``), j < counts[t]. A program owns one query, a block of BLOCK_H heads
and one split of the query's selected rows; it loads each gathered row once (BLOCK_N rows a step), uses it
for the scores of all its heads (``q_c·c + q_r·k_rope``) and, as V, for the output (``p·c``). The loop bound
is the query's count, so a DCP rank that owns 1/N of the rows does 1/N of the work. Heads are blocked, never
padded to 64: BLOCK_H = the head count rounded up to a power of two, at least 16 (``tl.dot``'s minimum), at
most 32 (measured faster than 64 on H100, see choose_block_h). When T × head-blocks cannot fill the GPU,
the rows are split over NSPLIT programs and the partial results merged by their log-sum-exp (:mod:`lse_merge`).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .lse_merge import lse_merge_into

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


def _configs():
    cfgs = []
    for bn, warps, stages in [
        (16, 4, 3), (32, 4, 2), (32, 4, 3), (64, 4, 2),
        (16, 8, 3), (32, 8, 2), (32, 8, 3), (64, 8, 2),
    ]:
        cfgs.append(triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    bh, bv, br = args["BLOCK_H"], args["BLOCK_V"], args["BLOCK_R"]
    row_bytes = (bv + br) * 2
    kept = []
    for c in configs:
        bn, w, st = c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        # fp32 accumulator [BLOCK_H, BLOCK_V] per thread: under 128 registers (at 128 ptxas spilled)
        if bh * bv * 4 / (w * 32 * 4) >= 128:
            continue
        # shared memory: q tile + pipelined kv tiles (≤ ~200 KB of the 227 KB)
        if bh * row_bytes + st * bn * row_bytes > 200 * 1024:
            continue
        kept.append(c)
    return kept or [configs[0]]


@triton.jit
def _sparse_mla_fwd_kernel(
    Q, KV, SLOTS, COUNTS, O, LSE,
    qk_scale,                      # scale * log2(e)
    H, NSPLIT,
    stride_qt, stride_qh,          # q [T, H, Dk], last dim contiguous
    stride_kv,                     # kv [S, Dk], last dim contiguous
    stride_st,                     # slots [T, K], last dim contiguous
    stride_ot, stride_os, stride_oh,   # out [T, (split,) H, V]
    stride_lt, stride_ls, stride_lh,   # lse [T, (split,) H]
    V_DIM: tl.constexpr, R_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    TUNE_BUCKET: tl.constexpr,     # autotune key only
):
    pid = tl.program_id(0)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    rest = pid // n_hb
    split = rest % NSPLIT
    t = (rest // NSPLIT).to(tl.int64)

    # this program's share of the query's compacted rows: [lo, hi), BLOCK_N-aligned chunks
    count = tl.load(COUNTS + t)
    chunk = tl.cdiv(tl.cdiv(count, NSPLIT), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, count)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_DIM
    q_base = Q + t * stride_qt + offs_h[:, None] * stride_qh
    q_c = tl.load(q_base + offs_v[None, :], mask=mask_h[:, None] & mask_v[None, :], other=0.0)
    if R_DIM > 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R_DIM
        q_r = tl.load(q_base + V_DIM + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    slot_base = SLOTS + t * stride_st
    # every step holds at least one valid row (start < hi), so m_i turns finite on the first step
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = tl.load(slot_base + offs_n, mask=mask_n, other=0).to(tl.int64)
        row_ptr = KV + rows * stride_kv
        kc = tl.load(row_ptr[:, None] + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q_c, tl.trans(kc), input_precision="ieee")
        else:
            s = tl.dot(q_c, tl.trans(kc))
        if R_DIM > 0:
            kr = tl.load(row_ptr[:, None] + V_DIM + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                         other=0.0)
            if IEEE:
                s = tl.dot(q_r, tl.trans(kr), acc=s, input_precision="ieee")
            else:
                s = tl.dot(q_r, tl.trans(kr), acc=s)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = tl.dot(p.to(kc.dtype), kc, acc=acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(kc.dtype), kc, acc=acc * alpha[:, None])
        m_i = m_new

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptr = O + t * stride_ot + split * stride_os + offs_h[:, None] * stride_oh + offs_v[None, :]
    # an empty split (lse = -inf) need not write its partial: the merge never reads it
    n_rows = tl.zeros([BLOCK_H], tl.int32) + (hi - lo)   # (vector: the interpreter rejects scalar-bool masks)
    write_o = (n_rows > 0) | (tl.full([BLOCK_H], NSPLIT, tl.int32) == 1)
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(mask_h & write_o)[:, None] & mask_v[None, :])
    tl.store(LSE + t * stride_lt + split * stride_ls + offs_h * stride_lh, lse, mask=mask_h)


_sparse_mla_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["V_DIM", "R_DIM", "BLOCK_H", "IEEE", "TUNE_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
)(_sparse_mla_fwd_kernel)


def _empty(shape, dtype, device):
    """Allocation hook (tests replace it with a NaN-filling one to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_block_h(H: int, T: int = 1, device=None) -> int:
    """Head tile: H rounded up to a power of two, ≥ 16 (tl.dot minimum), ≤ 32.
    Measured on H100 (2026-11-27, Triton 3.6): 64-head tiles compile to wgmma but at 1 CTA/SM (≈250 regs)
    ran slower than 32-head tiles on mma.sync (8 warps, ≈190 regs, no spills): decode T=64/H=128
    185 µs vs 236 µs, prefill T=4096/H=128 10.6 ms vs 12.6 ms."""
    return min(32, max(16, triton.next_power_of_2(H)))


def choose_num_splits(T: int, n_hb: int, K: int, device) -> int:
    """Split the selected rows when T × head-blocks programs cannot fill the GPU: about 2 programs per SM
    (rounded down: on H100, T=64/H=16 ran at 62.7 µs with 4 splits = 256 programs, 79 µs with 5 and 74 µs
    with 8); each split keeps ≥ 128 of the K selectable rows so a program's fixed cost stays amortised."""
    if device.type != "cuda":
        return 1
    programs = T * n_hb
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs * 2 > target:
        return 1
    return max(1, min(target // programs, K // 128))


def sparse_mla_attn(q, kv, slots, counts, scale: float, v_dim: int, *, num_splits: int | None = None,
                    block_h: int | None = None):
    """q [T, H, Dk] (bf16/fp16/fp32), kv pool [S, Dk] same dtype (row = latent c (first v_dim cols) ‖ k_rope),
    slots [T, K] int32 local row indices into kv, valid ones compacted to the front, counts [T] int32 (0..K).
    For query t, head h: over j < counts[t], s_j = scale * (q[t,h,:] · kv[slots[t,j], :]);
    p = softmax_j(s); out[t,h,:] = Σ_j p_j kv[slots[t,j], :v_dim]; lse[t,h] = logsumexp_j(s_j) (natural log).
    Returns out [T, H, v_dim] in q's dtype, lse [T, H] fp32; where counts[t]==0: out exactly 0, lse = -inf.
    Entries j >= counts[t] are never read.

    ``num_splits`` / ``block_h`` override the heuristics (tests, benchmarks)."""
    T, H, Dk = q.shape
    S, Dk2 = kv.shape
    if Dk2 != Dk:
        raise ValueError(f"q width {Dk} != kv width {Dk2}")
    if not 0 < v_dim <= Dk:
        raise ValueError(f"v_dim {v_dim} out of range for width {Dk}")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv dtype {kv.dtype} != q dtype {q.dtype}")
    if slots.dim() != 2 or slots.shape[0] != T or counts.shape != (T,):
        raise ValueError("slots must be [T, K] and counts [T]")
    K = slots.shape[1]
    device = q.device
    out = _empty((T, H, v_dim), q.dtype, device)
    lse = _empty((T, H), torch.float32, device)
    if T == 0 or H == 0:
        return out, lse
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    if slots.dtype != torch.int32 or slots.stride(-1) != 1:
        slots = slots.to(torch.int32).contiguous()
    if counts.dtype != torch.int32 or not counts.is_contiguous():
        counts = counts.to(torch.int32).contiguous()

    R = Dk - v_dim
    BLOCK_H = block_h or choose_block_h(H, T, device)
    BLOCK_V = max(16, triton.next_power_of_2(v_dim))
    BLOCK_R = max(16, triton.next_power_of_2(R)) if R > 0 else 16
    n_hb = triton.cdiv(H, BLOCK_H)
    nsplit = num_splits or choose_num_splits(T, n_hb, K, device)
    nsplit = max(1, min(nsplit, max(K, 1)))
    ieee = q.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E

    if nsplit == 1:
        o_dst, l_dst = out, lse
        so = (out.stride(0), 0, out.stride(1))
        sl = (lse.stride(0), 0, lse.stride(1))
    else:
        o_dst = _empty((T, nsplit, H, v_dim), torch.float32, device)
        l_dst = _empty((T, nsplit, H), torch.float32, device)
        so = (o_dst.stride(0), o_dst.stride(1), o_dst.stride(2))
        sl = (l_dst.stride(0), l_dst.stride(1), l_dst.stride(2))

    grid = (T * n_hb * nsplit,)
    args = (q, kv, slots, counts, o_dst, l_dst, qk_scale, H, nsplit,
            q.stride(0), q.stride(1), kv.stride(0), slots.stride(0), *so, *sl)
    meta = dict(V_DIM=v_dim, R_DIM=R, BLOCK_H=BLOCK_H, BLOCK_V=BLOCK_V, BLOCK_R=BLOCK_R, IEEE=ieee)
    if _INTERPRET or device.type != "cuda":
        _sparse_mla_fwd_kernel[grid](*args, **meta, BLOCK_N=16, TUNE_BUCKET=0)
    else:
        # bucket: few programs (latency/split-K decode) vs many (batch decode / prefill)
        bucket = 0 if T * n_hb * nsplit < 4 * _num_sms(device.index or 0) else 1
        _sparse_mla_fwd_tuned[grid](*args, **meta, TUNE_BUCKET=bucket)

    if nsplit > 1:
        # partials as [split, T, H, V] views
        lse_merge_into(o_dst.transpose(0, 1), l_dst.transpose(0, 1), out, lse)
    return out, lse
