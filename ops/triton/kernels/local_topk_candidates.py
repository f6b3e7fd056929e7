"""Exact top-k of each row of fp32 scores, ties to the lower column, reading the row twice: the kernels of the
candidate scheme (host wrapper and design: ``ops/triton/local_topk.py``). Three launches:

- ``local_topk_coarse_kernel`` (grid row x chunk): the histogram of each element's coarse digit
  (``radix_select.coarse_digit``: 8 bits, a quarter octave per bin), added to the row's totals (atomics);
  each chunk also stores the suffix sums of its own histogram, so that a chunk of the next pass counts every
  earlier chunk's elements above / in a bin from two numbers each (no scan kernel).
- ``local_topk_split_kernel`` (grid row x chunk): the bin d0 that holds the k-th element (from the totals);
  elements above d0 are in for sure: written to the output at their rank in column order; the elements of
  bin d0 (the candidates) to the row's candidate buffer (capacity ``cap``), also in column order, unless they
  do not fit (overflow: the row is then selected by the five-pass kernels of ``local_topk.py``, launched
  gated after these) or d0 is the -inf bin (ties only: no buffer needed).
- ``local_topk_refine_kernel`` (grid row): the radix select of the full 32-bit key over the candidates
  (4 levels of 8 bits, in one program, no atomics), then the chosen candidates (ties to the lower column)
  after the sure ones, in column order; the -inf padding columns L .. k-1 when L < k. An overflowing row
  returns at once (the gated five-pass kernels select it, split over chunks); a row whose threshold is
  -inf takes its lowest -inf columns from a scan of the row's start.
"""
import triton
import triton.language as tl

from .radix_select import NEG_INF_BIN, NEG_INF_KEY, RADIX, coarse_digit, float_key, pick_bin, threshold_bin

KEY_LEVELS = tl.constexpr(4)  # the refinement's radix levels: 32-bit key, 8-bit digits


@triton.jit
def local_topk_coarse_kernel(
    SCORES, HIST, CHUNK_SUFFIX,
    L, stride_t, chunk_len, num_chunks,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = SCORES + t * stride_t
    hist = tl.zeros([RADIX], tl.int32)
    start = chunk * chunk_len
    for off in range(0, chunk_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        inside = cols < L
        digit = coarse_digit(float_key(tl.load(row + cols, mask=inside, other=0.0)))
        hist += tl.histogram(digit, RADIX, mask=inside)
    bins = tl.arange(0, RADIX)
    tl.atomic_add(HIST + t * RADIX + bins, hist, mask=hist > 0, sem="relaxed")
    # suffix[d] = this chunk's elements with digit >= d, suffix[RADIX] = 0: then above bin d = suffix[d + 1],
    # in it = suffix[d] - suffix[d + 1]
    base = CHUNK_SUFFIX + (t * num_chunks + chunk) * (RADIX + 1)
    tl.store(base + bins, tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist)
    tl.store(base + RADIX, 0)


@triton.jit
def local_topk_split_kernel(
    SCORES, HIST, CHUNK_SUFFIX, VALUES, IDX, CAND_VALUES, CAND_COLS,
    L, take, cap, stride_t, stride_vt, stride_it, chunk_len, num_chunks,
    BLOCK: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = SCORES + t * stride_t
    d0, _, _, buffered = threshold_bin(HIST + t * RADIX, take, cap)
    cand_bin = tl.where(buffered, d0, -1)  # no digit is -1: no candidate is written unless buffered

    # where this chunk's sure elements and candidates start: the earlier chunks' counts
    earlier = tl.arange(0, CHUNK_BLOCK)
    is_earlier = earlier < chunk
    suffix = CHUNK_SUFFIX + (t * num_chunks + earlier) * (RADIX + 1)
    at_or_above = tl.load(suffix + d0, mask=is_earlier, other=0)
    above = tl.load(suffix + d0 + 1, mask=is_earlier, other=0)
    sure_before = tl.sum(above, 0)
    cand_before = tl.sum(at_or_above - above, 0)

    start = chunk * chunk_len
    for off in range(0, chunk_len, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        inside = cols < L
        x = tl.load(row + cols, mask=inside, other=0.0)
        digit = coarse_digit(float_key(x))
        sure = inside & (digit > d0)
        cand = inside & (digit == cand_bin)
        # one scan for both ranks: a tile has < 2^16 elements, so the candidate count fits the high half
        packed = sure.to(tl.int32) + (cand.to(tl.int32) << 16)
        total = tl.sum(packed, 0)
        if total > 0:  # most tiles of a -inf tail (and of long rows with many chunks) have none: no scan
            rank = tl.cumsum(packed, 0)  # inclusive
            sure_dst = sure_before + (rank & 0xFFFF) - 1
            cand_dst = cand_before + (rank >> 16) - 1
            tl.store(VALUES + t * stride_vt + sure_dst, x, mask=sure)
            tl.store(IDX + t * stride_it + sure_dst, cols.to(tl.int64), mask=sure)
            tl.store(CAND_VALUES + t * cap + cand_dst, x, mask=cand)
            tl.store(CAND_COLS + t * cap + cand_dst, cols, mask=cand)
        sure_before += total & 0xFFFF
        cand_before += total >> 16


@triton.jit
def local_topk_refine_kernel(
    SCORES, HIST, CAND_VALUES, CAND_COLS, VALUES, IDX,
    L, k, take, cap, stride_t, stride_vt, stride_it,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    row = SCORES + t * stride_t
    cand_values = CAND_VALUES + t * cap
    cand_cols = CAND_COLS + t * cap
    d0, rem0, in_bin, buffered = threshold_bin(HIST + t * RADIX, take, cap)
    if (not buffered) & (d0 != NEG_INF_BIN):
        return  # overflow: the five-pass kernels, launched gated after this one, select this row
    sure_total = take - rem0  # written by the split kernel, at outputs 0 .. sure_total - 1
    # Here the row is buffered, or its threshold is the -inf bin (never buffered). A tile's candidates, in column
    # order: the buffer's first in_bin entries, or the row's -inf elements (two predicated loads, one of them
    # empty, rather than a branch; the loads are written out, not in a helper: Inductor's access analysis would
    # take a helper's pointer arguments as written).
    source_len = tl.where(buffered, in_bin, L)
    buffer_len = tl.where(buffered, in_bin, 0)
    row_len = tl.where(buffered, 0, L)

    # The rem0-th largest key among the buffered candidates, 8 bits a level (their coarse bin fixes no key
    # bits). The -inf bin holds one value: its chosen ones are its lowest columns, no search (buffer_len = 0).
    rem = rem0
    prefix = tl.zeros([], tl.uint32)
    for level in tl.static_range(KEY_LEVELS):
        shift = 24 - 8 * level  # a constexpr (level is one)
        hist = tl.zeros([RADIX], tl.int32)
        off = tl.zeros([], tl.int32)
        while off < buffer_len:
            i = off + tl.arange(0, BLOCK)
            valid = i < buffer_len
            key = float_key(tl.load(cand_values + i, mask=valid, other=0.0))
            if level > 0:
                valid = valid & ((key >> (shift + 8)) == prefix)
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), RADIX, mask=valid)
            off += BLOCK
        d, rem, _ = pick_bin(hist, rem)
        prefix = (prefix << 8) | d.to(tl.uint32)
    threshold = tl.where(d0 == NEG_INF_BIN, NEG_INF_KEY, prefix)
    ties_to_take = tl.where(d0 == NEG_INF_BIN, rem0, rem)

    # The chosen candidates (above the threshold, and the lowest-column ties at it) after the sure ones, in
    # column order; stop once all rem0 are written (the -inf ties: a short scan of the row's start).
    done = tl.zeros([], tl.int32)
    ties_before = tl.zeros([], tl.int32)
    off = tl.zeros([], tl.int32)
    while (done < rem0) & (off < source_len):
        i = off + tl.arange(0, BLOCK)
        in_buffer = i < buffer_len
        in_row = i < row_len
        x = tl.where(in_buffer, tl.load(cand_values + i, mask=in_buffer, other=0.0),
                     tl.load(row + i, mask=in_row, other=0.0))
        key = float_key(x)
        valid = in_buffer | (in_row & (coarse_digit(key) == d0))
        col = tl.where(in_buffer, tl.load(cand_cols + i, mask=in_buffer, other=0), i)
        tie = valid & (key == threshold)
        tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), 0)  # 1-based among the candidates' ties
        chosen = (valid & (key > threshold)) | (tie & (tie_rank <= ties_to_take))
        dst = sure_total + done + tl.cumsum(chosen.to(tl.int32), 0) - 1
        tl.store(VALUES + t * stride_vt + dst, x, mask=chosen)
        tl.store(IDX + t * stride_it + dst, col.to(tl.int64), mask=chosen)
        done += tl.sum(chosen.to(tl.int32), 0)
        ties_before += tl.sum(tie.to(tl.int32), 0)
        off += BLOCK

    # L < k: every real column is in (outputs 0 .. L-1), then padding columns L .. k-1 (-inf), as a sort of
    # the row padded with k -inf columns would give.
    for pad_start in range(L, k, BLOCK):
        j = pad_start + tl.arange(0, BLOCK)
        is_pad = j < k
        tl.store(VALUES + t * stride_vt + j, tl.full([BLOCK], float("-inf"), tl.float32), mask=is_pad)
        tl.store(IDX + t * stride_it + j, j.to(tl.int64), mask=is_pad)
