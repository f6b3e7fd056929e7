"""Sparse MLA attention over compacted gathered latent rows (Triton host wrapper; kernel and its design in
``kernels/sparse_mla_attn.py``).

Tiles: heads are blocked, never padded to 64: BLOCK_H = the head count rounded up to a power of two, at
least 16 (``tl.dot``'s minimum), at most 32 (``choose_block_h``). When T × head blocks cannot fill the GPU,
the rows of each query are split over NSPLIT programs (``choose_num_splits``) and the partial results
combined by their log-sum-exp (:mod:`merge_partials`). Block shapes / warps / stages come from a fixed table
(``choose_config``: deterministic results, no autotuning at run time, nothing to tune in a new process);
``config=`` overrides it. Every choice depends on shapes, dtype and device only, so torch.compile traces this
wrapper into the graph (``dcp::sparse_mla_attn`` is a ``triton_op``).
The measurements behind these choices: benchmarks/RESULTS.md (runs 4–6 and "Notes moved from kernel
docstrings").
"""
from __future__ import annotations

import functools

import torch
import triton

from . import common
from .kernels.sparse_mla_attn import sparse_mla_fwd_kernel
from .merge_partials import merge_partials_into

_LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_block_h(H: int) -> int:
    """Head tile: H rounded up to a power of two, ≥ 16 (tl.dot minimum), ≤ 32 (32-head tiles at 4 warps beat
    every 64- and 128-head variant on H100: benchmarks/RESULTS.md)."""
    return min(32, max(16, triton.next_power_of_2(H)))


def choose_config(block_h: int, block_v: int, block_r: int, elt_bytes: int):
    """(BLOCK_N, num_warps, num_stages) for a head tile: a fixed table (deterministic results, no run-time
    tuning; measured on H100, benchmarks/RESULTS.md), then shrunk until the q tile + pipelined row tiles fit
    in ~200 KB of shared memory."""
    if block_h <= 16:
        bn, warps, stages = (64, 8, 2)
    elif block_h == 32:
        bn, warps, stages = (64, 4, 2)
    else:  # only through a block_h override
        bn, warps, stages = (16, 8, 2)
    row = (block_v + block_r) * elt_bytes
    while block_h * row + stages * bn * row > 200 * 1024 and (stages > 1 or bn > 16):
        if stages > 2 or bn == 16:
            stages -= 1
        else:
            bn //= 2
    return bn, warps, stages


def choose_num_splits(T: int, head_blocks: int, K: int, device) -> int:
    """Split the selected rows when T × head blocks programs cannot fill the GPU: about 2 programs per SM
    (rounded down), each split keeping ≥ 128 of the K selectable rows so a program's fixed cost stays
    amortised."""
    if device.type != "cuda":
        return 1
    programs = T * head_blocks
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs * 2 > target:
        return 1
    return max(1, min(target // programs, K // 128))


def plan(T: int, H: int, K: int, device, *, block_h=None, num_splits=None, elt_bytes: int = 2):
    """(BLOCK_H, NSPLIT) the wrapper will use (also for the benchmark's table)."""
    bh = block_h or choose_block_h(H)
    if elt_bytes > 2 and block_h is None:
        bh = min(bh, 16)    # fp32 (FMA dots): larger tiles spill
    ns = num_splits or choose_num_splits(T, triton.cdiv(H, bh), K, device)
    ns = max(1, min(ns, max(K, 1)))
    return bh, ns


def _check(q, kv, slots, counts, v_dim):
    T, H, Dk = q.shape
    if kv.dim() != 2 or kv.shape[1] != Dk:
        raise ValueError(f"kv must be [S, {Dk}] (q's width), got {tuple(kv.shape)}")
    if not 0 < v_dim <= Dk:
        raise ValueError(f"v_dim {v_dim} out of range for width {Dk}")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv dtype {kv.dtype} != q dtype {q.dtype}")
    if slots.dim() != 2 or slots.shape[0] != T or counts.shape != (T,):
        raise ValueError("slots must be [T, K] and counts [T]")


def sparse_mla_attn(q, kv, slots, counts, scale: float, v_dim: int, *, num_splits: int | None = None,
                    block_h: int | None = None, config=None):
    """q [T, H, Dk] (bf16/fp16/fp32), kv pool [S, Dk] same dtype (row = latent c (first v_dim cols) ‖ k_rope),
    slots [T, K] int32 local row indices into kv, valid ones compacted to the front, counts [T] int32 (0..K).
    For query t, head h: over j < counts[t], s_j = scale * (q[t,h,:] · kv[slots[t,j], :]);
    p = softmax_j(s); out[t,h,:] = Σ_j p_j kv[slots[t,j], :v_dim]; lse[t,h] = logsumexp_j(s_j) (natural log).
    Returns out [T, H, v_dim] in q's dtype, lse [T, H] fp32; where counts[t]==0: out exactly 0, lse = -inf.
    Entries j >= counts[t] are never read. S may be 0 (every count is then 0).

    Keyword-only overrides (tests, benchmarks): ``num_splits``, ``block_h``,
    ``config`` = (BLOCK_N, num_warps, num_stages)."""
    _check(q, kv, slots, counts, v_dim)
    T, H, Dk = q.shape
    K = slots.shape[1]
    device = q.device
    out = common.empty((T, H, v_dim), q.dtype, device)
    lse = common.empty((T, H), torch.float32, device)
    if T == 0 or H == 0:
        return out, lse
    if kv.shape[0] == 0:  # an empty pool (a rank that owns no token yet): every count is 0; nothing to launch
        return out.zero_(), lse.fill_(float("-inf"))
    q, kv = common.unit_stride(q), common.unit_stride(kv)
    slots, counts = common.int32_rows(slots), common.int32_rows(counts)

    R = Dk - v_dim
    BLOCK_H, nsplit = plan(T, H, K, device, block_h=block_h, num_splits=num_splits, elt_bytes=q.element_size())
    BLOCK_V = max(16, triton.next_power_of_2(v_dim))
    BLOCK_R = max(16, triton.next_power_of_2(R)) if R > 0 else 16

    if nsplit == 1:
        o_dst, l_dst = out, lse
        so = (out.stride(0), 0, out.stride(1))
        sl = (lse.stride(0), 0, lse.stride(1))
    else:
        o_dst = common.empty((T, nsplit, H, v_dim), torch.float32, device)
        l_dst = common.empty((T, nsplit, H), torch.float32, device)
        so = (o_dst.stride(0), o_dst.stride(1), o_dst.stride(2))
        sl = (l_dst.stride(0), l_dst.stride(1), l_dst.stride(2))

    grid = (T * nsplit * triton.cdiv(H, BLOCK_H),)
    if common.fixed_launch(device):
        launch = dict(BLOCK_N=16)
    else:
        bn, warps, stages = config or choose_config(BLOCK_H, BLOCK_V, BLOCK_R, q.element_size())
        launch = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
    common.launch(sparse_mla_fwd_kernel)[grid](
        q, kv, slots, counts, o_dst, l_dst, float(scale) * _LOG2E, H, nsplit,
        q.stride(0), q.stride(1), kv.stride(0), slots.stride(0), *so, *sl,
        V_DIM=v_dim, R_DIM=R, BLOCK_H=BLOCK_H, BLOCK_V=BLOCK_V, BLOCK_R=BLOCK_R,
        DOT_PRECISION=common.dot_precision(q.dtype), **launch,
    )
    if nsplit > 1:
        # partials as [split, T, H, V] views
        merge_partials_into(o_dst.transpose(0, 1), l_dst.transpose(0, 1), out, lse)
    return out, lse
