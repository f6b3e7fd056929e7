"""Sparse MLA attention over compacted gathered latent rows (Triton).

One KV head (MQA after weight absorption, DCP.md §2): every head of query t attends to the same gathered
rows ``kv[slots[t, j]]`` (``c ‖ k_rope``), j < counts[t]. A program owns one query, a block of BLOCK_H heads,
one split of the query's selected rows and one of V_SPLIT slices of the value/output columns (BLOCK_V
wide); it loads each gathered row once (BLOCK_N rows a step), uses the whole row for the scores of all its
heads (``q_c·c + q_r·k_rope``) and its own column slice of ``c`` as V for the output (``p·c``). The loop
bound is the query's count, so a DCP rank that owns 1/N of the rows does 1/N of the work. Heads are blocked,
never padded to 64: BLOCK_H = the head count rounded up to a power of two, at least 16 (``tl.dot``'s
minimum), at most 32 (see choose_block_h). When T × head-blocks × V_SPLIT cannot fill the GPU, the rows are
split over NSPLIT programs and the partial results merged by their log-sum-exp (:mod:`lse_merge`).

The value split (V_SPLIT = 2: two programs per head block, each 256 of the 512 output columns, both
recomputing the 576-wide score dot; adjacent in launch order, slice index fastest, so the second's gathers
hit L2) halves the fp32 accumulator so 64/128-head tiles compile to wgmma without spilling. It is an
option (``v_split=2``), off by default: on H100 it was slower at every shape than 32-head tiles at 4 warps
(choose_v_split, benchmarks/RESULTS.md runs 4–5).

Block shapes / warps / stages come from a fixed table (``choose_config``: deterministic results, no
autotuning at run time); ``config=`` overrides it, ``legacy=True`` gives the pre-table path (the same kernel
without value split, autotuned over BLOCK_N / warps / stages with the v3 pruning) for benchmarks.
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
    BLOCK_H: tl.constexpr,
    BLOCK_V: tl.constexpr,         # output columns per program (a power of two); V_SPLIT·BLOCK_V ≥ V_DIM
    V_SPLIT: tl.constexpr,         # 1 or 2 column slices
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    TUNE_BUCKET: tl.constexpr,     # autotune key only (legacy path)
):
    pid = tl.program_id(0)
    # program order: column slice fastest, then head block, then row split, then query — the programs that
    # gather the same rows run next to each other
    vs = pid % V_SPLIT
    rest = pid // V_SPLIT
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = rest % n_hb
    rest = rest // n_hb
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
    # own column slice (scores and output); with V_SPLIT = 2 also the other slice (scores only)
    cols0 = vs * BLOCK_V + offs_v
    mask_v0 = cols0 < V_DIM
    q_base = Q + t * stride_qt + offs_h[:, None] * stride_qh
    q_c0 = tl.load(q_base + cols0[None, :], mask=mask_h[:, None] & mask_v0[None, :], other=0.0)
    if V_SPLIT == 2:
        cols1 = (1 - vs) * BLOCK_V + offs_v
        mask_v1 = cols1 < V_DIM
        q_c1 = tl.load(q_base + cols1[None, :], mask=mask_h[:, None] & mask_v1[None, :], other=0.0)
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
        kc = tl.load(row_ptr[:, None] + cols0[None, :], mask=mask_n[:, None] & mask_v0[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q_c0, tl.trans(kc), input_precision="ieee")
        else:
            s = tl.dot(q_c0, tl.trans(kc))
        if V_SPLIT == 2:
            kc1 = tl.load(row_ptr[:, None] + cols1[None, :], mask=mask_n[:, None] & mask_v1[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q_c1, tl.trans(kc1), acc=s, input_precision="ieee")
            else:
                s = tl.dot(q_c1, tl.trans(kc1), acc=s)
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
    o_ptr = O + t * stride_ot + split * stride_os + offs_h[:, None] * stride_oh + cols0[None, :]
    # an empty split (lse = -inf) need not write its partial: the merge never reads it
    n_rows = tl.zeros([BLOCK_H], tl.int32) + (hi - lo)   # (vector: the interpreter rejects scalar-bool masks)
    write_o = (n_rows > 0) | (tl.full([BLOCK_H], NSPLIT, tl.int32) == 1)
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(mask_h & write_o)[:, None] & mask_v0[None, :])
    # every column slice computes the same lse (up to summation order); slice 0 writes it
    write_l = (tl.zeros([BLOCK_H], tl.int32) + vs) == 0
    tl.store(LSE + t * stride_lt + split * stride_ls + offs_h * stride_lh, lse, mask=mask_h & write_l)


# ------------------------------------------------------------------------------------ legacy autotune

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
    bh, bv, br, vsp = args["BLOCK_H"], args["BLOCK_V"], args["BLOCK_R"], args["V_SPLIT"]
    row_bytes = (vsp * bv + br) * 2
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


_sparse_mla_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["V_DIM", "R_DIM", "BLOCK_H", "V_SPLIT", "IEEE", "TUNE_BUCKET"],
    prune_configs_by={"early_config_prune": _prune},
)(_sparse_mla_fwd_kernel)


# ------------------------------------------------------------------------------------------- host side

def _empty(shape, dtype, device):
    """Allocation hook (tests replace it with a NaN-filling one to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _legacy_block_h(H: int) -> int:
    return min(32, max(16, triton.next_power_of_2(H)))


def choose_block_h(H: int, T: int = 1, device=None) -> int:
    """Head tile: H rounded up to a power of two, ≥ 16 (tl.dot minimum), ≤ 32.
    Measured on H100 (2026-11-27, Triton 3.6, RESULTS.md runs 4–5): 32-head tiles on mma.sync at 4 warps
    (2 CTAs/SM) beat every 64- and 128-head wgmma variant, with or without the value split: decode
    T=64/H=128 187 µs vs 198–300 µs, prefill T=4096/H=128 10.5 ms vs 13.7–29 ms."""
    return min(32, max(16, triton.next_power_of_2(H)))


def choose_v_split(H: int, T: int, v_dim: int, device=None) -> int:
    """Column slices of the output: 1 by default. The value split (2) is kept as an option: measured on
    H100 it lost at every H ≥ 32 shape against the 32-head, 4-warp, unsplit kernel (e.g. T=64/H=64
    126 µs vs 120 µs, T=64/H=128 233 µs vs 187 µs, prefill 13.8 ms vs 10.5 ms, RESULTS.md run 5): it adds
    53 % tensor work (the score dot runs in both halves) and does not cut the L2 re-reads of the rows."""
    return 1


def choose_config(block_h: int, v_split: int, block_v: int, block_r: int, elt_bytes: int):
    """(BLOCK_N, num_warps, num_stages) for a variant: a fixed table (deterministic results, no run-time
    tuning), then shrunk until q tile + pipelined row tiles fit in ~200 KB of shared memory.
    Measured (H100, run 5): 32-head tiles want 4 warps (255 regs, ~30 B spill, 2 CTAs/SM: the two CTAs'
    barrier/gather stalls interleave — IPC 1.23 vs 0.92 for one 8-warp CTA) — 187 vs 264 µs at T=64/H=128;
    16-head tiles 8 warps (64/8/2 and 64/4/2 equal within noise; 32-row or 3-stage tiles lose 20–40 %)."""
    if v_split == 1:
        if block_h <= 16:
            bn, warps, stages = (64, 8, 2)
        elif block_h == 32:
            bn, warps, stages = (64, 4, 2)
        else:
            bn, warps, stages = (16, 8, 2)
    elif block_h >= 128:
        bn, warps, stages = (32, 8, 2)
    elif block_h == 64:
        bn, warps, stages = (16, 4, 3)
    else:
        bn, warps, stages = (32, 4, 3)
    row = (v_split * block_v + block_r) * elt_bytes
    while block_h * row + stages * bn * row > 200 * 1024 and (stages > 1 or bn > 16):
        if stages > 2 or bn == 16:
            stages -= 1
        else:
            bn //= 2
    return bn, warps, stages


def choose_num_splits(T: int, n_programs_per_query: int, K: int, device) -> int:
    """Split the selected rows when T × (head-blocks × column slices) programs cannot fill the GPU: about 2
    programs per SM (rounded down: on H100, T=64/H=16 ran at 62.7 µs with 4 splits = 256 programs, 79 µs
    with 5 and 74 µs with 8); each split keeps ≥ 128 of the K selectable rows so a program's fixed cost
    stays amortised."""
    if device.type != "cuda":
        return 1
    programs = T * n_programs_per_query
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs * 2 > target:
        return 1
    return max(1, min(target // programs, K // 128))


def plan(T: int, H: int, K: int, v_dim: int, device, *, block_h=None, v_split=None, num_splits=None,
         legacy=False, elt_bytes: int = 2):
    """(BLOCK_H, V_SPLIT, NSPLIT) the wrapper will use (also for the benchmark's table)."""
    if legacy:
        bh = block_h or _legacy_block_h(H)
        vsp = 1
    else:
        bh = block_h or choose_block_h(H, T, device)
        if elt_bytes > 2 and block_h is None:
            bh = min(bh, 16)    # fp32 (FMA dots): larger tiles spill (3.7 KB at 64 heads, ptxas sm_90)
        vsp = v_split or choose_v_split(H, T, v_dim, device)
    n_hb = triton.cdiv(H, bh)
    ns = num_splits or choose_num_splits(T, n_hb * vsp, K, device)
    ns = max(1, min(ns, max(K, 1)))
    return bh, vsp, ns


def sparse_mla_attn(q, kv, slots, counts, scale: float, v_dim: int, *, num_splits: int | None = None,
                    block_h: int | None = None, v_split: int | None = None, config=None, legacy: bool = False):
    """q [T, H, Dk] (bf16/fp16/fp32), kv pool [S, Dk] same dtype (row = latent c (first v_dim cols) ‖ k_rope),
    slots [T, K] int32 local row indices into kv, valid ones compacted to the front, counts [T] int32 (0..K).
    For query t, head h: over j < counts[t], s_j = scale * (q[t,h,:] · kv[slots[t,j], :]);
    p = softmax_j(s); out[t,h,:] = Σ_j p_j kv[slots[t,j], :v_dim]; lse[t,h] = logsumexp_j(s_j) (natural log).
    Returns out [T, H, v_dim] in q's dtype, lse [T, H] fp32; where counts[t]==0: out exactly 0, lse = -inf.
    Entries j >= counts[t] are never read. S may be 0 (every count is then 0).

    Keyword-only overrides (tests, benchmarks): ``num_splits``, ``block_h``, ``v_split`` (1 or 2),
    ``config`` = (BLOCK_N, num_warps, num_stages), ``legacy`` = the pre-split path (autotuned)."""
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
    if v_split not in (None, 1, 2):
        raise ValueError(f"v_split must be 1 or 2, got {v_split}")
    K = slots.shape[1]
    device = q.device
    out = _empty((T, H, v_dim), q.dtype, device)
    lse = _empty((T, H), torch.float32, device)
    if T == 0 or H == 0:
        return out, lse
    if S == 0:  # an empty pool (a rank that owns no token yet): every count is 0; nothing to launch
        return out.zero_(), lse.fill_(float("-inf"))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    if slots.dtype != torch.int32 or slots.stride(-1) != 1:
        slots = slots.to(torch.int32).contiguous()
    if counts.dtype != torch.int32 or not counts.is_contiguous():
        counts = counts.to(torch.int32).contiguous()

    R = Dk - v_dim
    BLOCK_H, V_SPLIT, nsplit = plan(T, H, K, v_dim, device, block_h=block_h, v_split=v_split,
                                    num_splits=num_splits, legacy=legacy, elt_bytes=q.element_size())
    BLOCK_V = max(16, triton.next_power_of_2(triton.cdiv(v_dim, V_SPLIT)))
    BLOCK_R = max(16, triton.next_power_of_2(R)) if R > 0 else 16
    n_hb = triton.cdiv(H, BLOCK_H)
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

    grid = (T * nsplit * n_hb * V_SPLIT,)
    args = (q, kv, slots, counts, o_dst, l_dst, qk_scale, H, nsplit,
            q.stride(0), q.stride(1), kv.stride(0), slots.stride(0), *so, *sl)
    meta = dict(V_DIM=v_dim, R_DIM=R, BLOCK_H=BLOCK_H, BLOCK_V=BLOCK_V, V_SPLIT=V_SPLIT, BLOCK_R=BLOCK_R,
                IEEE=ieee)
    if _INTERPRET or device.type != "cuda":
        _sparse_mla_fwd_kernel[grid](*args, **meta, BLOCK_N=16, TUNE_BUCKET=0)
    elif legacy and config is None:
        # bucket: few programs (latency/split-K decode) vs many (batch decode / prefill)
        bucket = 0 if T * n_hb * nsplit < 4 * _num_sms(device.index or 0) else 1
        _sparse_mla_fwd_tuned[grid](*args, **meta, TUNE_BUCKET=bucket)
    else:
        bn, warps, stages = config or choose_config(BLOCK_H, V_SPLIT, BLOCK_V, BLOCK_R, q.element_size())
        _sparse_mla_fwd_kernel[grid](*args, **meta, BLOCK_N=bn, TUNE_BUCKET=0, num_warps=warps,
                                     num_stages=stages)

    if nsplit > 1:
        # partials as [split, T, H, V] views
        lse_merge_into(o_dst.transpose(0, 1), l_dst.transpose(0, 1), out, lse)
    return out, lse
