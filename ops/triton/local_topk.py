"""Exact top-k of each row, ties to the lower column: a radix select (Triton host wrapper; kernels in
``kernels/local_topk.py``). Replaces the full stable sort (``ops/distributed.py: local_topk_sorted``) on CUDA.

Meaning (the same as ``local_topk_sorted`` of the row padded with k -inf columns): for scores [T, L] fp32
(-inf = not a candidate, no NaN) and k >= 1, the k columns of each row with the highest scores, equal scores
to the lower column; L may be < k, then every column is chosen and then padding columns L .. k-1 with score
-inf (the caller maps their positions to a sentinel). -0.0 and +0.0 are equal scores. Output order: column
order (the sort gives score order); the set is exactly the sort's. Downstream (``dcp::topk_select``)
re-selects by (score, position), so the order does not matter there.

Algorithm: the threshold (the k-th largest score) is found digit by digit over the order-preserving uint32
image of the score, 8 bits per level, by 4 histogram passes over the row; a 5th pass writes everything above
the threshold plus the lowest-column ties at it (how many: known from the histograms), at their rank in
column order. No host sync and no data-dependent shape: 6 launches (one memset of the histograms).

Parallelism: a row is split over several programs (chunks of whole BLOCK tiles), so that 64 rows (or even
one) fill an H200's 132 SMs; the per-level histograms of a row are summed with atomics, and each chunk of
the compaction finds where its output starts from the per-chunk suffix sums that the last histogram pass
leaves (two int32 loads per earlier chunk, no scan kernel).

Floor: every pass reads the row, 4·T·L bytes; at T = 64, L = 128K that is 33.5 MB, 7.0 µs at 4.8 TB/s (H200)
per pass, 5 passes = 35 µs from HBM, less where a pass finds the row in L2 (50 MB). Fixed config, no
autotuning: BLOCK = 4096 elements (16 per thread at 8 warps: the histogram and the cumsum stay in
registers); chunks per row = enough programs for ~4 per SM (``TARGET_PROGRAMS``) but no chunk smaller
than one tile. Those are bandwidth-bound passes with one tunable that matters (programs in flight), so a
run-time autotune would buy little and would cost a first-call stall inside a decode graph.
"""
from __future__ import annotations

import torch
import triton

from . import common
from .kernels.local_topk import local_topk_compact_kernel, local_topk_histogram_kernel
from .kernels.radix_select import RADIX as _RADIX

RADIX = _RADIX.value  # bins per level

LEVELS = 4
BLOCK = 4096
TARGET_PROGRAMS = 4 * 132  # ~4 programs per SM of an H100 / H200
NUM_WARPS = 8
INTERPRET_BLOCK = 64  # small tiles under the interpreter: tests then cover several tiles and chunks


def plan(T: int, L: int, block: int, chunks: int | None = None) -> tuple[int, int]:
    """(chunk_len, num_chunks) of a row: whole tiles per chunk; ``chunks`` (tests) asks for that many."""
    tiles = max(1, triton.cdiv(L, block))
    want = chunks if chunks is not None else max(1, triton.cdiv(TARGET_PROGRAMS, max(T, 1)))
    tiles_per_chunk = triton.cdiv(tiles, max(1, min(want, tiles)))
    return tiles_per_chunk * block, triton.cdiv(tiles, tiles_per_chunk)


def local_topk(scores: torch.Tensor, k: int, *, block: int | None = None, chunks: int | None = None):
    """scores [T, L] (fp32; fp16/bf16 are widened exactly) -> (values [T, k] in scores' dtype, columns [T, k]
    int64), see the module docstring. ``block`` / ``chunks`` (tests) fix the tile and the split of a row."""
    if scores.dim() != 2:
        raise ValueError(f"local_topk: scores must be [T, L], got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"local_topk: k must be >= 1, got {k}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"local_topk: scores must be fp32/fp16/bf16 (float64 uses the stable sort), got {scores.dtype}")
    T, L = scores.shape
    device = scores.device
    values = common.empty((T, k), torch.float32, device)
    idx = common.empty((T, k), torch.int64, device)
    if T == 0:
        return values.to(scores.dtype), idx
    if L >= 2**31 - 1:
        raise ValueError(f"local_topk: row length {L} must be < 2**31 - 1 (int32 counts)")
    x = common.unit_stride(scores.float())
    if block is None:
        block = INTERPRET_BLOCK if common.fixed_launch(device) else BLOCK
    chunk_len, num_chunks = plan(T, L, block, chunks)
    hist = torch.zeros((T, LEVELS, RADIX), dtype=torch.int32, device=device)  # atomics add into it
    chunk_suffix = common.empty((T, num_chunks, RADIX + 1), torch.int32, device)  # every entry written
    grid = (T, num_chunks)
    num_warps = 4 if common.fixed_launch(device) else NUM_WARPS
    for level in range(LEVELS):
        common.launch(local_topk_histogram_kernel)[grid](
            x, hist, chunk_suffix, L, min(k, L), x.stride(0), chunk_len, num_chunks,
            LEVEL=level, BLOCK=block, num_warps=num_warps,
        )
    common.launch(local_topk_compact_kernel)[grid](
        x, hist, chunk_suffix, values, idx, L, k, min(k, L), x.stride(0), values.stride(0), idx.stride(0),
        chunk_len, num_chunks,
        BLOCK=block, CHUNK_BLOCK=triton.next_power_of_2(num_chunks), num_warps=num_warps,
    )
    return values.to(scores.dtype), idx
