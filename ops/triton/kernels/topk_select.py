"""This rank's share of the exact global top-k, from every rank's sorted candidate keys: the kernel of
``dcp::topk_select`` (host wrapper: ``ops/triton/topk_select.py``).

Input: [world, T, k] int64 order keys; for query t, block r = rank r's local top-k, sorted best first
(``candidate_keys``). Live keys are distinct, so a key's place in the merged order is the number of keys
above it: its index in its own block plus, for every other block, how many of that block's keys are larger,
a binary search of the sorted block. A key is in the global top-k iff that count is < k. Only this rank's
block is ranked (its keys are the positions this rank owns), and since the block is sorted the selected
keys are a prefix of it: each program writes the slots of its share in place (best first, -1 after), with
no compaction pass, and the one program holding the end of the prefix writes the count.

Grid (row, share): a share is BLOCK - 1 keys, plus, in lane 0, the key just before the share, whose
selection says whether the prefix reaches into this share. Every other block is searched at once (a
[BLOCK, WORLD] tile): ceil(log2(k + 1)) dependent loads per program, not one per block.
"""
import triton
import triton.language as tl

from .order_key import key_live, key_position


@triton.jit
def topk_select_kernel(
    KEYS, SEQ_INDEX, BLOCK_TABLE, SLOTS, COUNTS,
    k, rank, world, interleave, page_size, search_steps,
    stride_kw, stride_kt, stride_bt, stride_ot,
    BLOCK: tl.constexpr,  # lanes a program: lane 0 = the key before the share, lanes 1.. = the share
    WORLD: tl.constexpr,  # next power of two >= world
):
    t = tl.program_id(0).to(tl.int64)
    share = tl.program_id(1)
    row = KEYS + t * stride_kt
    lane = tl.arange(0, BLOCK)
    idx = share * (BLOCK - 1) - 1 + lane  # index in this rank's block
    inside = (idx >= 0) & (idx < k)
    x = tl.load(row + rank * stride_kw + idx, mask=inside, other=0)
    live = inside & key_live(x)

    # larger keys in every other block: per (key, block) the first index whose key is not larger
    blocks = tl.arange(0, WORLD)
    other = (blocks < world) & (blocks != rank)
    block_start = row + blocks.to(tl.int64) * stride_kw
    lo = tl.zeros([BLOCK, WORLD], tl.int32)
    hi = lo + tl.where(other, k, 0)[None, :]
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        larger = tl.load(block_start[None, :] + mid, mask=active, other=0) > x[:, None]
        lo = tl.where(active & larger, mid + 1, lo)
        hi = tl.where(active & (larger == 0), mid, hi)
    above = idx + tl.sum(lo, axis=1)  # own block: sorted and distinct, exactly idx keys above
    selected = live & (above < k)

    # slots of this share (lanes 1..), best first; -1 where not selected
    mine = selected & (lane >= 1)
    pos = key_position(x)
    local = (pos // (world * interleave)) * interleave + pos % interleave
    table_row = BLOCK_TABLE + tl.load(SEQ_INDEX + t).to(tl.int64) * stride_bt
    page = tl.load(table_row + local // page_size, mask=mine, other=0).to(tl.int64)
    slot = tl.where(mine, page * page_size + local % page_size, -1)
    writes = inside & (lane >= 1)
    tl.store(SLOTS + t * stride_ot + idx, slot.to(tl.int32), mask=writes)

    # The selection is a prefix of the block: the share that holds its end (the key before the share is
    # selected, and some key of the share is not, or the share is the last) writes its length.
    before = (share == 0) | (tl.sum((selected & (lane == 0)).to(tl.int32), 0) > 0)
    taken = tl.sum(mine.to(tl.int32), 0)
    last = (share + 1) * (BLOCK - 1) >= k
    if before & ((taken < tl.sum(writes.to(tl.int32), 0)) | last):
        tl.store(COUNTS + t, share * (BLOCK - 1) + taken)
