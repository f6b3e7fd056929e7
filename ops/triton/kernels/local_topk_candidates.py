"""Exact top-k of each row of fp32 scores, ties to the lower column, reading the row about twice: the kernels of
the candidate scheme (host wrapper and design: ``ops/triton/local_topk.py``). Four launches:

- ``local_topk_sample_kernel`` (grid row x chunk): the 256-bin histogram of the coarse digit
  (``radix_select.coarse_digit``: a quarter octave per bin) of a 1/16 sample of the row (one contiguous piece
  of every tile, at a position that rotates from tile to tile), added to the row's sample histogram (atomics).
- ``local_topk_window_kernel`` (grid row x chunk): from the sample, the row's window base
  (``radix_select.window_base``); the histogram of every element's window digit (32 bins: the quarter octaves
  around the estimated threshold, the rest clamped into the end bins), added to the row's totals (atomics);
  each chunk also stores the suffix sums of its own histogram, so that a chunk of the next pass counts every
  earlier chunk's elements above / in a bin from two numbers each (no scan kernel).
- ``local_topk_split_kernel`` (grid row x chunk): the window bin d0 that holds the k-th element (from the
  totals); elements above d0 are in for sure: written to the output at their rank in column order; the
  elements of bin d0 (the candidates) to the row's candidate buffer (capacity ``cap``), also in column
  order, unless they do not fit (overflow: the row is then selected by the five-pass kernels of
  ``local_topk.py``, launched gated after these) or d0 is the -inf bin (ties only: no buffer needed).
- ``local_topk_refine_kernel`` (grid row): the threshold key among the candidates, searched in registers
  (the buffer's first tile; longer buffers re-read the rest at each level), 4 key bits a level from the
  highest bit where candidates differ; then the chosen
  candidates (ties to the lower column) after the sure ones, in column order; the -inf padding columns
  L .. k-1 when L < k. It flags an overflowing row for the gated five-pass kernels and returns; a row whose
  threshold is -inf takes its lowest -inf columns from a scan of the row's start.

The two full-row passes may load the next tile before working on the current one (PREFETCH: a program has a few
tiles in turn; measured within 1-3 % either way on an H200). All of a row's histograms live in one tensor
(``radix_select.HISTS`` a row), handed whole to every kernel.
"""
import triton
import triton.language as tl

from .radix_select import (HISTS, NEG_INF_BIN, NEG_INF_KEY, RADIX, WINDOW, WINDOW_AT, coarse_digit, float_key,
                           pick_bin, threshold_bin, window_base, window_digit)

SEARCH_BITS = tl.constexpr(4)  # the refinement's key bits a level (16-bin histograms: ~14 instructions / 32)
SEARCH_BINS = tl.constexpr(16)


@triton.jit
def key_range(key, valid):
    """The smallest and largest uint32 key among the valid ones (an empty set: 0xFFFFFFFF, 0)."""
    return tl.min(tl.where(valid, key, 0xFFFFFFFF), 0), tl.max(tl.where(valid, key, 0), 0)


@triton.jit
def digit_histogram(key, valid, known, prefix, shift):
    """The 16-bin histogram of the 4-bit digit at ``shift`` of the valid keys whose ``known`` bits equal
    ``prefix``: one level of the refinement's search."""
    match = valid & ((key & known) == prefix)
    return tl.histogram(((key >> shift) & (SEARCH_BINS - 1)).to(tl.int32), SEARCH_BINS, mask=match)


@triton.jit
def local_topk_sample_kernel(
    SCORES, HIST,
    L, stride_t, chunk_len,
    BLOCK: tl.constexpr, SAMPLE: tl.constexpr, SAMPLE_BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = SCORES + t * stride_t
    tiles = chunk_len // BLOCK
    first_tile = chunk * tiles
    PIECES: tl.constexpr = BLOCK // SAMPLE
    e = tl.arange(0, SAMPLE_BLOCK)
    hist = tl.zeros([RADIX], tl.int32)
    for g in range(0, tiles, SAMPLE_BLOCK // SAMPLE):  # SAMPLE_BLOCK // SAMPLE tiles' pieces a load
        j = g + e // SAMPLE
        tile = first_tile + j
        # the piece's place rotates (7 is odd: every place in turn), so a run of high scores that fills part
        # of every tile is neither always in nor always out of the sample
        cols = tile * BLOCK + ((tile * 7) % PIECES) * SAMPLE + e % SAMPLE
        inside = (j < tiles) & (cols < L)
        digit = coarse_digit(float_key(tl.load(row + cols, mask=inside, other=0.0)))
        hist += tl.histogram(digit, RADIX, mask=inside)
    bins = tl.arange(0, RADIX)
    tl.atomic_add(HIST + t * HISTS + bins, hist, mask=hist > 0, sem="relaxed")  # the sample's bins


@triton.jit
def local_topk_window_kernel(
    SCORES, HIST, BASE, CHUNK_SUFFIX,
    L, take, stride_t, chunk_len, num_chunks,
    BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = SCORES + t * stride_t
    base = window_base(HIST + t * HISTS, take, L)
    if chunk == 0:
        tl.store(BASE + t, base)  # the split kernel's
    hist = tl.zeros([WINDOW], tl.int32)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)  # this chunk's columns: start .. end - 1
    cols = start + tl.arange(0, BLOCK)
    x = tl.load(row + cols, mask=cols < end, other=0.0)
    for off in range(0, chunk_len, BLOCK):
        next_cols = cols + BLOCK
        if PREFETCH:
            x_next = tl.load(row + next_cols, mask=next_cols < end, other=0.0)
        hist += tl.histogram(window_digit(x, base), WINDOW, mask=cols < end)
        if PREFETCH:
            x = x_next
        else:
            x = tl.load(row + next_cols, mask=next_cols < end, other=0.0)
        cols = next_cols
    bins = tl.arange(0, WINDOW)
    tl.atomic_add(HIST + t * HISTS + WINDOW_AT + bins, hist, mask=hist > 0, sem="relaxed")
    # suffix[d] = this chunk's elements with digit >= d, suffix[WINDOW] = 0: then above bin d = suffix[d + 1],
    # in it = suffix[d] - suffix[d + 1]
    suffix = CHUNK_SUFFIX + (t * num_chunks + chunk) * (WINDOW + 1)
    tl.store(suffix + bins, tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist)
    tl.store(suffix + WINDOW, 0)


@triton.jit
def local_topk_split_kernel(
    SCORES, BASE, HIST, CHUNK_SUFFIX, VALUES, IDX, CAND_VALUES, CAND_COLS,
    L, take, cap, stride_t, stride_vt, stride_it, chunk_len, num_chunks,
    BLOCK: tl.constexpr, CHUNK_BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = SCORES + t * stride_t
    base = tl.load(BASE + t)
    d0, _, _, buffered = threshold_bin(HIST + t * HISTS + WINDOW_AT, take, cap)
    cand_bin = tl.where(buffered, d0, -1)  # no digit is -1: no candidate is written unless buffered

    # where this chunk's sure elements and candidates start: the earlier chunks' counts
    earlier = tl.arange(0, CHUNK_BLOCK)
    is_earlier = earlier < chunk
    suffix = CHUNK_SUFFIX + (t * num_chunks + earlier) * (WINDOW + 1)
    at_or_above = tl.load(suffix + d0, mask=is_earlier, other=0)
    above = tl.load(suffix + d0 + 1, mask=is_earlier, other=0)
    sure_before = tl.sum(above, 0)
    cand_before = tl.sum(at_or_above - above, 0)

    values_row = VALUES + t * stride_vt
    idx_row = IDX + t * stride_it
    cand_values = CAND_VALUES + t * cap
    cand_cols = CAND_COLS + t * cap
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)  # this chunk's columns: start .. end - 1
    cols = start + tl.arange(0, BLOCK)
    x = tl.load(row + cols, mask=cols < end, other=0.0)
    for off in range(0, chunk_len, BLOCK):
        inside = cols < end
        next_cols = cols + BLOCK
        if PREFETCH:
            x_next = tl.load(row + next_cols, mask=next_cols < end, other=0.0)
        digit = window_digit(x, base)
        sure = inside & (digit > d0)
        cand = inside & (digit == cand_bin)
        # one scan for both ranks: a tile has < 2^16 elements, so the candidate count fits the high half
        packed = sure.to(tl.int32) + (cand.to(tl.int32) << 16)
        total = tl.sum(packed, 0)
        if total > 0:  # most tiles of a -inf tail (and of long rows with many chunks) have none: no scan
            rank = tl.cumsum(packed, 0)  # inclusive
            sure_dst = sure_before + (rank & 0xFFFF) - 1
            cand_dst = cand_before + (rank >> 16) - 1
            tl.store(values_row + sure_dst, x, mask=sure)
            tl.store(idx_row + sure_dst, cols.to(tl.int64), mask=sure)
            tl.store(cand_values + cand_dst, x, mask=cand)
            tl.store(cand_cols + cand_dst, cols, mask=cand)
        sure_before += total & 0xFFFF
        cand_before += total >> 16
        if PREFETCH:
            x = x_next
        else:
            x = tl.load(row + next_cols, mask=next_cols < end, other=0.0)
        cols = next_cols


@triton.jit
def local_topk_refine_kernel(
    SCORES, HIST, CAND_VALUES, CAND_COLS, VALUES, IDX, FALLBACK,
    L, k, take, cap, stride_t, stride_vt, stride_it,
    SEARCH_TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    row = SCORES + t * stride_t
    cand_values = CAND_VALUES + t * cap
    cand_cols = CAND_COLS + t * cap
    d0, rem0, in_bin, buffered = threshold_bin(HIST + t * HISTS + WINDOW_AT, take, cap)
    overflow = (not buffered) & (d0 != NEG_INF_BIN)
    tl.store(FALLBACK + t, overflow.to(tl.int32))  # read by the gated five-pass kernels, launched after this
    if overflow:
        return
    sure_total = take - rem0  # written by the split kernel, at outputs 0 .. sure_total - 1
    # Here the row is buffered, or its threshold is the -inf bin (never buffered). A tile's candidates, in column
    # order: the buffer's first in_bin entries, or the row's -inf elements (two predicated loads, one of them
    # empty, rather than a branch; the loads are written out, not in a helper: Inductor's access analysis would
    # take a helper's pointer arguments as written).
    source_len = tl.where(buffered, in_bin, L)
    buffer_len = tl.where(buffered, in_bin, 0)
    row_len = tl.where(buffered, 0, L)

    # The rem0-th largest key among the buffered candidates. The buffer's first SEARCH_TILE entries (most rows'
    # all) stay in registers for the whole search; a row with more re-reads the rest at each level. Candidates
    # agree on every key bit above the highest bit where the smallest and the largest differ (one window bin is
    # usually one quarter octave: the top 11 bits), so the search starts at that bit's 4-bit digit. The -inf
    # bin holds one value: its chosen ones are its lowest columns, no search (buffer_len = 0: no level runs).
    slot = tl.arange(0, SEARCH_TILE)
    in_search = slot < buffer_len
    cand_key = float_key(tl.load(cand_values + slot, mask=in_search, other=0.0))
    lo, hi = key_range(cand_key, in_search)
    for more in range(SEARCH_TILE, buffer_len, SEARCH_TILE):  # rows with more candidates than one tile
        more_in = more + slot < buffer_len
        more_lo, more_hi = key_range(float_key(tl.load(cand_values + more + slot, mask=more_in, other=0.0)), more_in)
        lo = tl.minimum(lo, more_lo)
        hi = tl.maximum(hi, more_hi)
    differ = lo ^ hi
    shift = tl.zeros([], tl.int32) + (32 - SEARCH_BITS)
    while (shift > 0) & ((differ >> shift) == 0):
        shift -= SEARCH_BITS
    # the bits above the first digit searched, known: every candidate has lo's (int64: a shift by 32 is none)
    known = ((tl.full([], 0xFFFFFFFF, tl.int64) << (shift + SEARCH_BITS)) & 0xFFFFFFFF).to(tl.uint32)
    prefix = lo & known
    rem = rem0
    while (shift >= 0) & (buffer_len > 0):
        hist = digit_histogram(cand_key, in_search, known, prefix, shift)
        for more in range(SEARCH_TILE, buffer_len, SEARCH_TILE):
            more_in = more + slot < buffer_len
            more_key = float_key(tl.load(cand_values + more + slot, mask=more_in, other=0.0))
            hist += digit_histogram(more_key, more_in, known, prefix, shift)
        d, rem, _ = pick_bin(hist, rem)
        prefix = prefix | (d.to(tl.uint32) << shift)
        known = known | (tl.full([], SEARCH_BINS - 1, tl.uint32) << shift)
        shift -= SEARCH_BITS
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
        valid = in_buffer | (in_row & (key == NEG_INF_KEY))
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
