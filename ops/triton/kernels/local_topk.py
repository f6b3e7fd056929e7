"""Exact top-k of each row of fp32 scores, ties to the lower column: the kernels (host wrapper and design:
``ops/triton/local_topk.py``). Two kernels, the passes of one radix select over the uint32 key of the score
(``radix_select.float_key``); both run on a grid (row, chunk of the row):

- ``local_topk_histogram_kernel`` (LEVEL = 0..3, one launch each): replay the levels before LEVEL from the
  row's total histograms, histogram digit LEVEL of this chunk's elements that match that prefix, add it to
  the row's totals (atomics). The last level also stores, per chunk, the suffix sums of its histogram with
  the count of its elements above the 24-bit prefix folded in, so that the compaction can count every
  earlier chunk's selected elements from two numbers each.
- ``local_topk_compact_kernel``: the full 32-bit threshold and how many ties at it to take; each chunk writes
  its selected elements (above the threshold, and the ties whose rank among all the row's ties is within the
  quota) at their rank in column order.

GATED (the candidate scheme's fallback): a program returns at once unless its row's flag in FALLBACK (set by
``local_topk_candidates.local_topk_refine_kernel``: the row's threshold bin overflowed the candidate buffer) is
set; those rows are then selected here, split over chunks, and the compaction rewrites all k outputs.
"""
import triton
import triton.language as tl

from .radix_select import RADIX, float_key, pick_bin, threshold_prefix

LEVELS = tl.constexpr(4)  # 32-bit key, 8-bit digits


@triton.jit
def local_topk_histogram_kernel(
    SCORES, HIST, CHUNK_SUFFIX, FALLBACK,
    L, take, stride_t, chunk_len, num_chunks,     # take = min(k, L): the real columns to select
    LEVEL: tl.constexpr, BLOCK: tl.constexpr, GATED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if GATED:
        if tl.load(FALLBACK + t) == 0:
            return
    row = SCORES + t * stride_t
    hist_row = HIST + t * (LEVELS * RADIX)
    prefix, _ = threshold_prefix(hist_row, take, LEVEL)
    SHIFT: tl.constexpr = 24 - 8 * LEVEL

    hist = tl.zeros([RADIX], tl.int32)
    above = tl.zeros([], tl.int32)  # last level: elements whose top 24 bits are above the prefix
    start = chunk * chunk_len
    for off in range(0, chunk_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        inside = cols < L
        key = float_key(tl.load(row + cols, mask=inside, other=0.0))
        digit = ((key >> SHIFT) & 255).to(tl.int32)
        if LEVEL == 0:
            match = inside
        else:
            match = inside & ((key >> (SHIFT + 8)) == prefix)
        hist += tl.histogram(digit, RADIX, mask=match)
        if LEVEL == LEVELS - 1:
            above += tl.sum((inside & ((key >> 8) > prefix)).to(tl.int32), 0)

    bins = tl.arange(0, RADIX)
    tl.atomic_add(hist_row + LEVEL * RADIX + bins, hist, mask=hist > 0, sem="relaxed")
    if LEVEL == LEVELS - 1:
        # suffix[d] = elements of this chunk above the 24-bit prefix + those at it with last digit >= d;
        # suffix[RADIX] = the first term alone. Then for the final digit d*: above the threshold =
        # suffix[d* + 1], at or above = suffix[d*].
        suffix = above + tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        base = CHUNK_SUFFIX + (t * num_chunks + chunk) * (RADIX + 1)
        tl.store(base + bins, suffix)
        tl.store(base + RADIX, above)


@triton.jit
def local_topk_compact_kernel(
    SCORES, HIST, CHUNK_SUFFIX, FALLBACK, VALUES, IDX,
    L, k, take, stride_t, stride_vt, stride_it, chunk_len, num_chunks,
    BLOCK: tl.constexpr, CHUNK_BLOCK: tl.constexpr, GATED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    if GATED:
        if tl.load(FALLBACK + t) == 0:
            return
    row = SCORES + t * stride_t
    threshold, ties_to_take = threshold_prefix(HIST + t * (LEVELS * RADIX), take, LEVELS)
    last_digit = (threshold & 255).to(tl.int32)

    # Selected elements of the earlier chunks: all of their elements above the threshold, and of their
    # ties at it as many as the quota leaves (ties go to the lower column, so earlier chunks first).
    earlier = tl.arange(0, CHUNK_BLOCK)
    is_earlier = earlier < chunk
    suffix = CHUNK_SUFFIX + (t * num_chunks + earlier) * (RADIX + 1)
    at_or_above = tl.load(suffix + last_digit, mask=is_earlier, other=0)
    strictly_above = tl.load(suffix + last_digit + 1, mask=is_earlier, other=0)
    ties_before = tl.sum(at_or_above - strictly_above, 0)
    written = tl.sum(strictly_above, 0) + tl.minimum(ties_before, ties_to_take)

    start = chunk * chunk_len
    for off in range(0, chunk_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        inside = cols < L
        x = tl.load(row + cols, mask=inside, other=0.0)
        key = float_key(x)
        tie = inside & (key == threshold)
        tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), 0)  # 1-based among the row's ties
        chosen = (inside & (key > threshold)) | (tie & (tie_rank <= ties_to_take))
        dst = written + tl.cumsum(chosen.to(tl.int32), 0) - 1  # column order
        tl.store(VALUES + t * stride_vt + dst, x, mask=chosen)
        tl.store(IDX + t * stride_it + dst, cols.to(tl.int64), mask=chosen)
        written += tl.sum(chosen.to(tl.int32), 0)
        ties_before += tl.sum(tie.to(tl.int32), 0)

    if chunk == 0:
        # L < k: every real column is in (at outputs 0 .. L-1), then padding columns L .. k-1 (-inf), as a
        # sort of the row padded with k -inf columns would give.
        for pad_start in range(L, k, BLOCK):
            j = pad_start + tl.arange(0, BLOCK)
            is_pad = j < k
            tl.store(VALUES + t * stride_vt + j, tl.full([BLOCK], float("-inf"), tl.float32), mask=is_pad)
            tl.store(IDX + t * stride_it + j, j.to(tl.int64), mask=is_pad)
