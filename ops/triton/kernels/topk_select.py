"""Global top-k of gathered (score, position) candidates and this rank's share of it as compacted local
slots: the kernel of ``dcp::topk_select`` (host wrapper: ``ops/triton/topk_select.py``).

One program per query row. The order (score desc, position asc) is the unsigned order of the 64-bit key
``float_key(score) << 32 | (2**31 - 1 - position)``, unique per live candidate (positions are unique in a
row except the padding sentinel, whose score is -inf). A radix select finds the top-k of the live
(score > -inf) candidates, 8 bits per level, stopping as soon as the threshold bin is taken whole (with
distinct scores, after the 4 score levels at the latest; exact ties continue into the position levels).
Then one pass keeps the selected candidates this rank owns, in candidate order, as physical slots.
"""
import triton
import triton.language as tl

from .radix_select import RADIX, float_key, pick_bin


@triton.jit
def _candidate_key(score, pos, inside):
    """The 64-bit order key of candidates already loaded (score fp32, pos int64; ``inside`` = a real column).
    The kernel does the loads itself, not this helper: torch's analysis of which tensors a user kernel writes
    (Inductor's mutation analysis) follows every argument of a call whose result reaches a store's address,
    so a helper given the input pointers would make SCORES and POS look written (and Inductor then copies
    them back after the launch, and fails on a bit-viewed input)."""
    live = inside & (score > float("-inf"))
    # positions of live candidates are in [0, 2**31 - 1): the low word is their reverse order
    pos_key = (2147483647 - tl.where(live, pos, 0)).to(tl.uint64)
    key = (float_key(score).to(tl.uint64) << 32) | pos_key
    return key, live


@triton.jit
def topk_select_kernel(
    SCORES, POS, SEQ_INDEX, BLOCK_TABLE, SLOTS, COUNTS,
    C, k, rank, world, interleave, page_size,
    stride_st, stride_pt, stride_bt, stride_ot,
    BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,  # C <= BLOCK: the row is loaded once and every pass reads it from registers
):
    t = tl.program_id(0).to(tl.int64)
    scores_row = SCORES + t * stride_st
    pos_row = POS + t * stride_pt
    # One tile (decode: world·k <= 8192 candidates): load and key the row once. Every pass below then runs on
    # registers; several tiles reload theirs (from L2) in each pass.
    row_cols = tl.arange(0, BLOCK)
    row_inside = row_cols < C
    if ONE_TILE:
        row_pos = tl.load(pos_row + row_cols, mask=row_inside, other=0).to(tl.int64)
        row_key, row_live = _candidate_key(
            tl.load(scores_row + row_cols, mask=row_inside, other=float("-inf")), row_pos, row_inside)
    else:
        row_pos = tl.zeros([BLOCK], tl.int64)
        row_key, row_live = tl.zeros([BLOCK], tl.uint64), row_inside

    # level 0 (top 8 bits of the score key) over every live candidate; its total is the live count
    hist = tl.zeros([RADIX], tl.int32)
    for start in range(0, C, BLOCK):
        if ONE_TILE:
            pos, key, live = row_pos, row_key, row_live
        else:
            cols = start + tl.arange(0, BLOCK)
            inside = cols < C
            pos = tl.load(pos_row + cols, mask=inside, other=0).to(tl.int64)
            score = tl.load(scores_row + cols, mask=inside, other=float("-inf"))
            key, live = _candidate_key(score, pos, inside)
        hist += tl.histogram((key >> 56).to(tl.int32), RADIX, mask=live)
    rem = tl.minimum(tl.sum(hist, 0), k)
    d, rem, in_bin = pick_bin(hist, rem)
    prefix = d.to(tl.uint64)
    stop_shift = tl.full([], 56, tl.uint64)
    done = (in_bin == rem).to(tl.int32)

    for level in tl.static_range(1, 8):
        shift = 56 - 8 * level  # a constexpr (level is): one unrolled copy per level
        if done == 0:
            hist = tl.zeros([RADIX], tl.int32)
            for start in range(0, C, BLOCK):
                if ONE_TILE:
                    pos, key, live = row_pos, row_key, row_live
                else:
                    cols = start + tl.arange(0, BLOCK)
                    inside = cols < C
                    pos = tl.load(pos_row + cols, mask=inside, other=0).to(tl.int64)
                    score = tl.load(scores_row + cols, mask=inside, other=float("-inf"))
                    key, live = _candidate_key(score, pos, inside)
                match = live & ((key >> (shift + 8)) == prefix)
                hist += tl.histogram(((key >> shift) & 255).to(tl.int32), RADIX, mask=match)
            d, rem, in_bin = pick_bin(hist, rem)
            prefix = (prefix << 8) | d.to(tl.uint64)
            stop_shift = tl.full([], shift, tl.uint64)
            done = (in_bin == rem).to(tl.int32)

    # selected: live, and the key's bits above stop_shift at or above the prefix (the prefix's bin is
    # taken whole). Keep the ones this rank owns, in candidate order.
    table_row = BLOCK_TABLE + tl.load(SEQ_INDEX + t).to(tl.int64) * stride_bt
    count = tl.zeros([], tl.int32)
    for start in range(0, C, BLOCK):
        if ONE_TILE:
            pos, key, live = row_pos, row_key, row_live
        else:
            cols = start + tl.arange(0, BLOCK)
            inside = cols < C
            pos = tl.load(pos_row + cols, mask=inside, other=0).to(tl.int64)
            score = tl.load(scores_row + cols, mask=inside, other=float("-inf"))
            key, live = _candidate_key(score, pos, inside)
        owner = (pos // interleave) % world
        mine = live & ((key >> stop_shift) >= prefix) & (owner == rank)
        local = (pos // (world * interleave)) * interleave + pos % interleave
        page = tl.load(table_row + local // page_size, mask=mine, other=0).to(tl.int64)
        slot = page * page_size + local % page_size
        dst = count + tl.cumsum(mine.to(tl.int32), 0) - 1
        tl.store(SLOTS + t * stride_ot + dst, slot.to(tl.int32), mask=mine)
        count += tl.sum(mine.to(tl.int32), 0)
    tl.store(COUNTS + t, count)
    for start in range(0, k, BLOCK):
        j = start + tl.arange(0, BLOCK)
        tl.store(SLOTS + t * stride_ot + j, tl.full([BLOCK], -1, tl.int32), mask=(j >= count) & (j < k))
