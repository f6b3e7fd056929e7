"""Exact top-k of each row, ties to the lower column: a radix select, two schemes (Triton host wrapper;
kernels in ``kernels/local_topk_candidates.py`` and ``kernels/local_topk.py``). Replaces the full stable sort
(``ops/distributed.py: local_topk_sorted``) on CUDA. ``dcp::local_topk`` picks the scheme by shape
(``choose_scheme``): the candidate scheme below, which reads the row twice, on many long rows; elsewhere the
five-pass scheme (4 histogram passes of 8 key bits + a compaction, each reading the row, split over chunks).

Meaning (the same as ``local_topk_sorted`` of the row padded with k -inf columns): for scores [T, L] fp32
(-inf = not a candidate, no NaN) and k >= 1, the k columns of each row with the highest scores, equal scores
to the lower column; L may be < k, then every column is chosen and then padding columns L .. k-1 with score
-inf (the caller maps their positions to a sentinel). -0.0 and +0.0 are equal scores. The set is exactly the
sort's. Output order (deterministic, no atomics decide it): the candidate scheme writes first the columns
above the threshold bin (see below) in column order, then the chosen ones of that bin in column order, then
the padding columns; the five-pass scheme (and the candidate scheme's overflowing rows) column order; the
sort gives score order. The candidate scheme's threshold bin is a quarter octave of scores (a window bin, see
below) unless the row's threshold lies outside its window (then a clamped end bin: never for real scores).
Downstream, ``dcp::candidate_keys`` sorts the candidates itself, and the key-gather selection's positions
only set the summation order of the attention over them: deterministic is all that matters there.

The candidate scheme (candidate compaction, as production DSA top-k kernels do it). Both full-row passes are
bound by integer issue, not bytes (a 256-bin ``tl.histogram`` costs ~150 instructions per 32 elements, a
32-bin one ~27), so the full-row histogram counts only a window of 32 bins, placed from a sample:

1. ``local_topk_sample_kernel``: the 256-bin histogram of the coarse digit (``radix_select.coarse_digit``:
   sign, 5 exponent bits, 2 mantissa bits: a quarter octave per bin over magnitudes 2^-16 .. 2^16) of a 1/16
   sample of each row (a contiguous piece of every tile, its place rotating from tile to tile).
2. ``local_topk_window_kernel``: from the sample, the quarter octave of the row's estimated threshold
   (``radix_select.window_base``); the histogram of every element's window digit (``radix_select.window_digit``:
   0 = -inf alone, then the quarter octave minus the row's base, clamped to 1 .. 31: the estimate lands on
   bin 16, 15 quarter octaves either side count apart), per row (atomics) and per chunk (suffix sums).
   Any base is exact (the digit stays monotone); a bad one only puts more candidates in an end bin.
3. ``local_topk_split_kernel``: the bin d0 that holds the k-th element; elements above it are written to the
   output (positions from the earlier chunks' suffix sums: deterministic), those in it (the candidates) to
   a per-row buffer of ``cap`` entries, in column order.
4. ``local_topk_refine_kernel`` (one program per row): the threshold key among the candidates, 4 key bits a
   level from the highest bit where candidates differ (a quarter octave's share their top 11), the first
   4096 candidates held in registers; then the chosen ones after the sure ones. If d0 is the -inf bin (fewer
   than k finite scores), its chosen ones are its lowest columns: a scan of the row's start, no search.
5. Overflow: if bin d0 holds more than ``cap`` elements (exact ties in a huge bin, a narrow range of scores),
   nothing went to the buffer; the refinement flags the row and the five-pass kernels (``scheme="five_pass"``)
   select it, launched *gated*: every program of an unflagged row returns at once. Launched only where a row
   can overflow (L > cap: rows of at most CAP keys, as decode's at 32K context on 4 ranks, never do).
   Measured on an H200 at 64 x 160K narrow-range scores: a serial per-row scan of the row took 1.15 ms, 4 x
   the five-pass scheme (benchmarks/RESULTS.md).

No host sync and no data-dependent shape or grid (the fallback is a branch on a loaded flag): 5 launches
(one memset of the histograms) + 6 gated ones where L > cap; the five-pass scheme alone has 6.

Parallelism: passes 1-3 split a row over several programs (chunks of whole BLOCK tiles), so that 64 rows
(or even one) fill an H200's 132 SMs. Fixed configs, no autotuning: chunks of BLOCK = 4096-element tiles,
enough for ~4 programs per SM (``TARGET_PROGRAMS``), no chunk smaller than one tile; each kernel's own tile
and warps in ``WINDOW_PASS`` / ``SPLIT_PASS`` / ``REFINE_PASS`` (measured: ``benchmarks/tune_local_topk.py``).

Capacity: ``cap`` = min(CAP, L) candidates per row (8 bytes each: value and int32 column). A quarter-octave
bin holds ~2700 of 128K normal scores at k = 2048 (the bin of the 1.25 % quantile, [2, 2.5)), ~5-6K for a
score distribution whose mean is ~5 standard deviations off zero (a sum of positive relu terms); CAP = 16384
keeps those in the buffer (1 MiB at T = 64, read back from L2), and L <= CAP never overflows.

Floor: the row is read about twice (the sample reads 1/16), 8·T·L bytes; at T = 64, L = 128K that is 67 MB,
14 µs at 4.8 TB/s (H200), less where the second pass finds the row in L2 (50 MB).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import common
from .kernels.local_topk import local_topk_compact_kernel, local_topk_histogram_kernel
from .kernels.local_topk_candidates import (local_topk_refine_kernel, local_topk_sample_kernel,
                                            local_topk_split_kernel, local_topk_window_kernel)
from .kernels.radix_select import RADIX as _RADIX
from .kernels.radix_select import WINDOW as _WINDOW

RADIX = _RADIX.value  # bins per level (and of the coarse digit)
WINDOW = _WINDOW.value  # bins of the candidate scheme's full-row histogram

LEVELS = 4  # the five-pass scheme's histogram levels
BLOCK = 4096
MAX_BLOCK = 32768  # the split kernel packs two in-tile ranks into one int32 (16 bits each)
CAP = 16384  # candidates per row, see the module docstring
TARGET_PROGRAMS = 4 * 132  # ~4 programs per SM of an H100 / H200
NUM_WARPS = 8
SAMPLE_FRACTION = 16  # the candidate scheme's sample: one piece of BLOCK / 16 columns of every tile
SAMPLE_BLOCK = 2048  # sampled columns a load (8 tiles' pieces at BLOCK = 4096)
INTERPRET_BLOCK = 64  # small tiles under the interpreter: tests then cover several tiles and chunks
SCHEMES = ("candidates", "five_pass")


# Where the candidate scheme is faster (benchmarks/RESULTS.md, session 7, H200, CUDA-graph replays, k = 2048,
# indexer-like scores): on long rows once there are enough of them to fill the GPU. T = 64: 49.9 vs 91.9 µs
# (five-pass) at L = 40960, 89.3 vs 223.2 at 131072; T = 8: 38.2 vs 41.8 at 131072, 40.4 vs 56.0 at 163840, but
# 34.4 vs 27.3 at 40960 (its refinement is one program a row); short rows gain little (64 x 10240: 47.1 vs
# 41.0). Narrow-range scores overflow its buffer and cost ~1.2 x the five-pass scheme there.
CANDIDATES_MIN_ROWS = 8
CANDIDATES_MIN_COLUMNS = 32768
CANDIDATES_MIN_ELEMENTS = 1 << 20  # T x L


@dataclass(frozen=True)
class PassConfig:
    """One kernel's launch: its tile (elements a loop step), warps, and whether it loads the next tile before
    working on the current one (the row passes)."""
    block: int
    num_warps: int
    prefetch: bool = False


# The candidate scheme's passes on CUDA (benchmarks/tune_local_topk.py, H200, 64 indexer-like rows, µs at
# 131072 / 32768 keys; every config selects the same columns in the same order). The window pass is bound by
# integer issue: 4 warps of 16 elements a thread (21.8 / 7.8; 8 warps 24.5 / 8.3). The split pass needs ~200
# registers a thread at 16 elements (one block of 8 warps an SM): 8 elements a thread at 4 warps run 37.7 /
# 11.1 (4096 x 8 warps: 51.0 / 17.5). The refinement: a 4096 search tile at 16 warps, 15.0 / 17.2 (8192:
# 24-29). Next-tile prefetch is within 1-3 % either way. The sample kernel uses the planning tile BLOCK and
# NUM_WARPS.
WINDOW_PASS = PassConfig(4096, 4, prefetch=True)
SPLIT_PASS = PassConfig(1024, 4, prefetch=True)
REFINE_PASS = PassConfig(4096, 16)


def choose_scheme(T, L) -> str:
    """The scheme ``dcp::local_topk`` runs for a [T, L] row block: a choice on static sizes (both schemes are
    exact and select the same set; only their output order differs, and it is deterministic either way)."""
    many_long_rows = T >= CANDIDATES_MIN_ROWS and L >= CANDIDATES_MIN_COLUMNS and T * L >= CANDIDATES_MIN_ELEMENTS
    return "candidates" if many_long_rows else "five_pass"


def plan(T: int, L: int, block: int, chunks: int | None = None) -> tuple[int, int]:
    """(chunk_len, num_chunks) of a row: whole tiles per chunk; ``chunks`` (tests) asks for that many."""
    tiles = max(1, triton.cdiv(L, block))
    want = chunks if chunks is not None else max(1, triton.cdiv(TARGET_PROGRAMS, max(T, 1)))
    tiles_per_chunk = triton.cdiv(tiles, max(1, min(want, tiles)))
    return tiles_per_chunk * block, triton.cdiv(tiles, tiles_per_chunk)


def _scratch(numel, dtype, device) -> torch.Tensor:
    """A kernel-written scratch buffer, allocated 1-D: the kernels index it by computed offsets (row-major
    [T, num_chunks, bins + 1] or [T, cap]), never by strides. Not 2-D or 3-D, because under torch.compile with
    dynamic shapes num_chunks and cap are symbolic expressions that sympy cannot prove >= 1 (num_chunks is
    ``cdiv(tiles, cdiv(tiles, 1))`` where a row is one chunk): the fake tensor's contiguous stride of such a
    shape is ``257·Max(1, num_chunks)`` (the five-pass scheme's), Inductor's ``257·num_chunks``, so torch
    2.11's layout constraint on a kernel's mutated argument (``constrain_to_fake_tensors``) re-wraps the buffer
    in a new view and ``GraphLowering.propagate_mutation`` copies the buffer onto itself: a node that depends on
    itself, and
    ``KeyError: 'opN'`` in ``Scheduler.compute_ancestors`` (pytorch/pytorch#189271; the compiled prefill,
    benchmarks/NOTES.md). A 1-D buffer has one stride, 1, on both sides."""
    return common.empty((numel,), dtype, device)


def local_topk(scores: torch.Tensor, k: int, *, block: int | None = None, chunks: int | None = None,
               cap: int | None = None, scheme: str = "candidates"):
    """scores [T, L] (fp32; fp16/bf16 are widened exactly) -> (values [T, k] in scores' dtype, columns [T, k]
    int64), see the module docstring. ``block`` / ``chunks`` (tests) fix the tile and the split of a row,
    ``cap`` (tests: a small one forces the overflow path) the candidates per row; ``scheme="five_pass"`` runs
    the previous kernels (4 histogram passes + compaction, output in column order; kept for the benchmark)."""
    if scores.dim() != 2:
        raise ValueError(f"local_topk: scores must be [T, L], got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"local_topk: k must be >= 1, got {k}")
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"local_topk: scores must be fp32/fp16/bf16 (float64 uses the stable sort), got {scores.dtype}")
    if scheme not in SCHEMES:
        raise ValueError(f"local_topk: scheme must be one of {SCHEMES}, got {scheme!r}")
    if cap is not None and cap < 1:
        raise ValueError(f"local_topk: cap must be >= 1, got {cap}")
    if block is not None and not (1 <= block <= MAX_BLOCK and block & (block - 1) == 0):
        raise ValueError(f"local_topk: block must be a power of two <= {MAX_BLOCK}, got {block}")
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
    num_warps = 4 if common.fixed_launch(device) else NUM_WARPS
    if scheme == "five_pass":
        _five_pass(x, values, idx, k, block, chunk_len, num_chunks, num_warps)
        return values.to(scores.dtype), idx

    take = min(k, L)  # the real columns to select
    cap = max(1, min(CAP if cap is None else cap, L))  # a bin never holds more than L: L <= CAP fits always
    grid = (T, num_chunks)
    # one memset: per row the sample's coarse histogram, then the window histogram (atomics add into both); one
    # tensor handed whole to every kernel (a view of it that a kernel mutates would be copied by Inductor)
    hists = torch.zeros((T, RADIX + WINDOW), dtype=torch.int32, device=device)
    base = common.empty((T,), torch.int32, device)  # written by the window kernel's first chunk of each row
    fallback = common.empty((T,), torch.int32, device)  # written by the refinement for every row
    # Flat scratch (``_scratch``): [T, num_chunks, WINDOW + 1] and [T, cap], as the kernels index them.
    chunk_suffix = _scratch(T * num_chunks * (WINDOW + 1), torch.int32, device)  # every entry written
    cand_values = _scratch(T * cap, torch.float32, device)  # entries 0 .. in_bin - 1 of a row written when used
    cand_cols = _scratch(T * cap, torch.int32, device)
    sample = max(1, block // SAMPLE_FRACTION)
    sample_block = min(max(SAMPLE_BLOCK, sample), sample * triton.next_power_of_2(chunk_len // block))
    common.launch(local_topk_sample_kernel)[grid](
        x, hists, L, x.stride(0), chunk_len,
        BLOCK=block, SAMPLE=sample, SAMPLE_BLOCK=sample_block, num_warps=num_warps,
    )
    window, split, refine = WINDOW_PASS, SPLIT_PASS, REFINE_PASS
    if common.fixed_launch(device):  # the interpreter: the test's tile everywhere
        window, split, refine = (PassConfig(block, num_warps, c.prefetch) for c in (window, split, refine))
    common.launch(local_topk_window_kernel)[grid](
        x, hists, base, chunk_suffix, L, take, x.stride(0), chunk_len, num_chunks,
        BLOCK=window.block, PREFETCH=window.prefetch, num_warps=window.num_warps,
    )
    common.launch(local_topk_split_kernel)[grid](
        x, base, hists, chunk_suffix, values, idx, cand_values, cand_cols,
        L, take, cap, x.stride(0), values.stride(0), idx.stride(0), chunk_len, num_chunks,
        BLOCK=split.block, CHUNK_BLOCK=triton.next_power_of_2(num_chunks), PREFETCH=split.prefetch,
        num_warps=split.num_warps,
    )
    common.launch(local_topk_refine_kernel)[(T,)](
        x, hists, cand_values, cand_cols, values, idx, fallback,
        L, k, take, cap, x.stride(0), values.stride(0), idx.stride(0),
        SEARCH_TILE=min(refine.block, triton.next_power_of_2(cap)), BLOCK=refine.block, num_warps=refine.num_warps,
    )
    if L > cap:  # a row's threshold bin may overflow the buffer: those rows by the five-pass kernels, gated
        _five_pass(x, values, idx, k, block, chunk_len, num_chunks, num_warps, fallback=fallback)
    return values.to(scores.dtype), idx


def _five_pass(x, values, idx, k, block, chunk_len, num_chunks, num_warps, fallback=None):
    """The previous scheme: 4 histogram passes (8 key bits each) + a compaction, each reading the row. With
    ``fallback`` (the candidate scheme's per-row flags), only the rows flagged (the others' programs return at
    once): the candidate scheme's fallback, split over chunks as the other passes (a narrow range of scores
    costs ~1.1 x the five-pass scheme, not a serial scan)."""
    T, L = x.shape
    device = x.device
    gated = fallback is not None
    flags = fallback if gated else x  # ungated: never read
    hist = torch.zeros((T, LEVELS, RADIX), dtype=torch.int32, device=device)  # atomics add into it
    chunk_suffix = _scratch(T * num_chunks * (RADIX + 1), torch.int32, device)  # every entry written
    grid = (T, num_chunks)
    for level in range(LEVELS):
        common.launch(local_topk_histogram_kernel)[grid](
            x, hist, chunk_suffix, flags, L, min(k, L), x.stride(0), chunk_len, num_chunks,
            LEVEL=level, BLOCK=block, GATED=gated, num_warps=num_warps,
        )
    common.launch(local_topk_compact_kernel)[grid](
        x, hist, chunk_suffix, flags, values, idx, L, k, min(k, L), x.stride(0), values.stride(0),
        idx.stride(0), chunk_len, num_chunks,
        BLOCK=block, CHUNK_BLOCK=triton.next_power_of_2(num_chunks), GATED=gated, num_warps=num_warps,
    )
