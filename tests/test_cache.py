"""ShardedPagedCache / PageAllocator (dcp_compile/cache.py): per-rank storage, allocation, exhaustion, the
transformers Cache surface."""
from __future__ import annotations

import itertools
import re

import pytest
import torch
from transformers.cache_utils import Cache

from dcp_compile.cache import CachePoolExhausted, CacheFormat, PageAllocator, ShardedPagedCache
from dcp_compile.layout import DCPLayout

LATENT, INDEX = 12, 8


def make_spec(layers=(0,), dtype=torch.bfloat16, index_dtype=torch.float32):
    return CacheFormat(tuple(layers), LATENT, INDEX, dtype, index_dtype)


def make_cache(world=2, interleave=1, page_size=4, rank=0, num_pages=16, batch=2, layers=(0,), **kw):
    layout = DCPLayout(world, interleave, page_size)
    return ShardedPagedCache(make_spec(layers, **kw), layout, rank, num_pages=num_pages, batch_size=batch)


def owned_slots(cache, num_tokens):
    """[B, L_r] physical rows of this rank's local indices 0..L_r-1 for every sequence."""
    count = cache.layout.local_count(num_tokens, cache.rank)
    local = torch.arange(count).expand(cache.block_table.shape[0], count)
    return cache.layout.slot(cache.block_table, local)


def test_is_a_transformers_cache():
    cache = make_cache()
    assert isinstance(cache, Cache)
    assert cache.is_compileable is False
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError):
        make_cache(world=2, rank=2)
    with pytest.raises(NotImplementedError):
        cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(1)
    with pytest.raises(NotImplementedError):
        cache.batch_repeat_interleave(2)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_storage_per_rank_bound(world):
    """Pool sized for the request: bytes per rank <= single-device bytes / N + one page per sequence per pool."""
    layers = (0, 3)
    e_lat, e_idx = torch.bfloat16.itemsize, torch.float32.itemsize
    for page_size, batch, length in itertools.product((4, 16), (1, 3), (1, 7, 100, 333)):
        for interleave in sorted({1, 2, page_size}):
            layout = DCPLayout(world, interleave, page_size)
            num_pages = batch * layout.pages(length, 0)  # rank 0 owns the most: every rank gets this pool
            single = batch * length * (LATENT * e_lat + INDEX * e_idx) * len(layers)
            slack = batch * page_size * (LATENT * e_lat + INDEX * e_idx) * len(layers)
            stored_rows = 0
            for rank in range(world):
                cache = ShardedPagedCache(make_spec(layers), layout, rank, num_pages=num_pages, batch_size=batch)
                cache.start_request(batch, length)
                what = f"N={world} I={interleave} P={page_size} B={batch} L={length} rank={rank}"
                pool_bytes = num_pages * page_size * (LATENT * e_lat + INDEX * e_idx) * len(layers)
                assert cache.storage_bytes() == pool_bytes, what
                assert cache.storage_bytes() <= single / world + slack, (
                    f"{what}: {cache.storage_bytes()} bytes > {single}/{world} + {slack}"
                )
                assert cache.used_pages() == batch * layout.pages(length, rank), what
                used_bytes = cache.used_pages() * page_size * (LATENT * e_lat + INDEX * e_idx) * len(layers)
                assert used_bytes <= single / world + slack, what
                for pool in (*cache.latent.values(), *cache.index_keys.values()):
                    assert pool.shape[0] == num_pages * page_size
                stored_rows += layout.local_count(length, rank)
            assert stored_rows == length  # every token stored exactly once over the group


def test_pool_shapes_and_dtypes():
    cache = make_cache(layers=(1, 4), num_pages=5, page_size=4)
    assert set(cache.latent) == {1, 4} and set(cache.index_keys) == {1, 4}
    for pool in cache.latent.values():
        assert pool.shape == (20, LATENT) and pool.dtype == torch.bfloat16
    for pool in cache.index_keys.values():
        assert pool.shape == (20, INDEX) and pool.dtype == torch.float32


@pytest.mark.parametrize("world,interleave,page_size,rank", [(1, 1, 4, 0), (2, 1, 4, 1), (3, 2, 4, 2), (4, 4, 4, 0)])
def test_block_tables_distinct_pages_and_growth(world, interleave, page_size, rank):
    batch = 3
    num_pages = batch * DCPLayout(world, interleave, page_size).pages(90, 0)
    cache = make_cache(world, interleave, page_size, rank, num_pages=num_pages, batch=batch)
    layout = cache.layout
    cache.start_request(batch, 30)
    first = cache.block_table.clone()
    slots1 = owned_slots(cache, 30)
    for grow_to in (31, 45, 90):
        cache.reserve(grow_to)
        n = layout.pages(grow_to, rank)
        pages = cache.block_table[:, :n]
        assert (pages >= 0).all() and (cache.block_table[:, n:] == -1).all()
        assert pages.unique().numel() == pages.numel(), "a page is shared"
        # Growing keeps the pages already handed out (rows written so far stay where they are).
        n1 = layout.pages(30, rank)
        assert torch.equal(cache.block_table[:, :n1], first[:, :n1])
        slots = owned_slots(cache, grow_to)
        assert slots.flatten().unique().numel() == slots.numel()
        assert torch.equal(slots[:, : slots1.shape[1]], slots1)
        assert cache.used_pages() == batch * n
    cache.reserve(10)  # smaller than the capacity: nothing changes
    assert cache.capacity == 90 and cache.used_pages() == batch * layout.pages(90, rank)


def test_exhausted_pool_raises_and_stays_consistent():
    # N=2, P=4, rank 0; 6 pages of 4 rows = 24 token rows.
    cache = make_cache(world=2, page_size=4, rank=0, num_pages=6, batch=2)
    P = 4
    # 2 sequences of 40 tokens: rank 0 owns 20 each = 5 pages each = 10 pages = 40 rows > 24.
    with pytest.raises(CachePoolExhausted) as info:
        cache.start_request(2, 40)
    msg = str(info.value)
    need_rows, avail_rows = 2 * 5 * P, 6 * P
    assert re.search(rf"\b{need_rows}\b", msg) and re.search(rf"\b{avail_rows}\b", msg), msg
    assert "token" in msg, msg
    assert isinstance(info.value, RuntimeError)
    # Nothing allocated: the cache is empty and usable.
    assert cache.allocator.free_pages == 6 and cache.used_pages() == 0
    assert (cache.block_table == -1).all()
    assert cache.capacity == 0 and cache.get_seq_length() == 0
    # A following smaller request works: 2 sequences of 24 tokens = 3 pages each.
    cache.start_request(2, 24)
    assert cache.used_pages() == 6 and cache.capacity == 24
    cache.begin_step(24)
    state = cache.layer_state(0)
    assert state.query_positions.tolist() == list(range(24)) and state.block_table is cache.block_table


def test_exhausted_growth_leaves_cache_unchanged():
    cache = make_cache(world=2, page_size=4, rank=0, num_pages=6, batch=2)
    cache.start_request(2, 8)  # 1 page per sequence
    free_before, table_before, cap_before = cache.allocator.free_pages, cache.block_table.clone(), cache.capacity
    cache.latent[0][: 8].fill_(1.5)
    cache.seq_length = 5
    with pytest.raises(CachePoolExhausted) as info:
        cache.reserve(40)  # 5 pages per sequence: 10 > 6
    assert "token" in str(info.value)
    assert cache.allocator.free_pages == free_before
    assert torch.equal(cache.block_table, table_before)
    assert cache.capacity == cap_before and cache.get_seq_length() == 5
    assert (cache.latent[0][:8] == 1.5).all()
    # A smaller growth still works: 2 pages per sequence.
    cache.reserve(16)
    assert cache.capacity == 16 and cache.allocator.free_pages == 2
    assert torch.equal(cache.block_table[:, :1], table_before[:, :1])


def test_exhaustion_is_the_same_decision_on_every_rank():
    """Every rank has a pool of the same size; a request either fits on all ranks or raises on all of them
    (a rank raising alone would leave the others in a collective)."""
    for world, interleave, page_size in ((2, 1, 4), (3, 2, 4), (4, 4, 4), (8, 1, 1)):
        layout = DCPLayout(world, interleave, page_size)
        for num_pages, batch, length in itertools.product((1, 3, 8), (1, 2), (1, 5, 9, 17, 40)):
            raised = []
            for rank in range(world):
                cache = ShardedPagedCache(make_spec(), layout, rank, num_pages=num_pages, batch_size=batch)
                try:
                    cache.start_request(batch, length)
                    raised.append(False)
                except CachePoolExhausted:
                    raised.append(True)
                    assert cache.used_pages() == 0
            assert len(set(raised)) == 1, f"{layout} pages={num_pages} B={batch} L={length}: raised {raised}"
            assert raised[0] == (batch * layout.pages(length, 0) > num_pages)


def test_start_request_and_reset_free_pages():
    cache = make_cache(world=2, page_size=4, rank=1, num_pages=10, batch=2)
    for cycle in range(3):
        cache.start_request(2, 17)  # rank 1 owns 8 -> 2 pages each
        assert cache.used_pages() == 4
        cache.seq_length = 3
        cache.start_request(3, 9)  # frees the previous request first: 3 x 1 page
        assert cache.used_pages() == 3 and cache.get_seq_length() == 0
        assert cache.block_table.shape[0] == 3
        cache.reset()
        assert cache.used_pages() == 0 and cache.allocator.free_pages == 10
        assert (cache.block_table == -1).all() and cache.capacity == 0 and cache.get_seq_length() == 0
    # No page was lost or duplicated by the cycles.
    pages = cache.allocator.allocate(10)
    assert sorted(pages) == list(range(10))
    cache.allocator.release(pages)
    # free_sequence frees one sequence.
    cache.start_request(2, 17)
    cache.free_sequence(0)
    assert cache.used_pages() == 2 and (cache.block_table[0] == -1).all() and (cache.block_table[1, :2] >= 0).all()


def test_block_table_address_kept_across_batch_sizes():
    """A fixed pool serving alternating batch sizes gives every batch size up to the largest seen the same block
    table address (a CUDA graph recorded for one replays after requests of another), emptied of the previous
    request's pages; a larger batch gets a new table, which the smaller ones then share."""
    cache = make_cache(world=2, page_size=4, rank=0, num_pages=12, batch=1)
    cache.start_request(2, 17)
    base = cache.block_table.data_ptr()
    assert cache.block_table.shape == (2, 12) and (cache.block_table[:, :3] >= 0).all()  # 9 of 17: 3 pages
    cache.start_request(1, 9)
    assert cache.block_table.data_ptr() == base and cache.block_table.shape == (1, 12)
    assert (cache.block_table[0, :2] >= 0).all() and (cache.block_table[0, 2:] == -1).all()  # 5 of 9: 2 pages
    cache.start_request(2, 9)
    assert cache.block_table.data_ptr() == base and (cache.block_table[:, 2:] == -1).all()
    cache.start_request(3, 9)
    bigger = cache.block_table.data_ptr()
    assert bigger != base and cache.block_table.shape == (3, 12)
    cache.start_request(1, 9)
    assert cache.block_table.data_ptr() == bigger


def test_page_allocator_all_or_nothing():
    alloc = PageAllocator(5)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.free_pages == 2
    with pytest.raises(CachePoolExhausted):
        alloc.allocate(3)
    assert alloc.free_pages == 2
    b = alloc.allocate(2)
    assert set(a).isdisjoint(b) and sorted(a + b) == list(range(5))
    alloc.release(a)
    assert alloc.free_pages == 3
    assert alloc.allocate(0) == []


def test_step_bracket_widths_and_capacity():
    cache = make_cache(world=2, page_size=4, rank=0, num_pages=10, batch=2, layers=(0, 2))
    cache.start_request(2, 10)
    cache.begin_step(7)
    states = [cache.layer_state(layer) for layer in (0, 2)]
    for layer, state in zip((0, 2), states):
        assert state.latent_pool is cache.latent[layer] and state.index_pool is cache.index_keys[layer]
    assert states[0].key_slots is states[1].key_slots  # the positions are computed once per step
    assert int(cache.past) == 0 and states[0].query_positions.tolist() == list(range(7))
    # A short step has the static widths: the capacity bucket (256 positions, 128 local rows on 2 ranks).
    assert cache.mask_width == 256 and states[0].key_positions.shape == (128,)
    assert states[0].key_positions[:4].tolist() == [0, 2, 4, 6]  # rank 0 of 2 owns the even positions
    slots = states[0].key_slots
    assert (slots[:, 4:] == -1).all() and (slots[:, :4] >= 0).all()  # positions 0, 2, 4, 6 < 7 are written
    assert cache.get_seq_length() == 0  # the host length moves on at the end of the step
    cache.end_step()
    assert cache.get_seq_length() == 7 and cache.step_tokens is None
    assert cache.get_mask_sizes(3) == (256, 0)  # static
    assert cache.get_mask_sizes(17) == (24, 0)  # a prefill chunk: exact
    cache.begin_step(3)
    assert int(cache.past) == 7 and cache.layer_state(0).query_positions.tolist() == [7, 8, 9]
    cache.end_step()
    with pytest.raises(CachePoolExhausted) as info:
        cache.begin_step(1)  # position 10 but only 10 reserved
    assert "reserve" in str(info.value) and cache.step_tokens is None
    with pytest.raises(RuntimeError, match="begin_step"):
        cache.layer_state(0)
    cache.reserve(11)
    cache.begin_step(1)
    assert cache.layer_state(2).query_positions.tolist() == [10]


def test_static_bucket():
    from dcp_compile.cache import static_positions

    assert static_positions(1, 1) == 256 and static_positions(256, 1) == 256 and static_positions(257, 1) == 320
    assert static_positions(300, 6) == 324  # 320 rounded up to whole rounds of 6
    assert static_positions(100_000, 4) == 114688  # 7 · 2^14
    for capacity in range(1, 5000, 7):
        bucket = static_positions(capacity, 1)
        assert capacity <= bucket <= max(256, capacity * 1.25), capacity


def test_crop():
    cache = make_cache(num_pages=10)
    cache.start_request(2, 20)
    cache.begin_step(12)
    cache.end_step()
    assert cache.get_seq_length() == 12
    cache.crop(0)
    assert cache.get_seq_length() == 12
    cache.crop(-5)
    assert cache.get_seq_length() == 7
    assert cache.get_mask_sizes(17) == (24, 0)
    cache.begin_step(1)
    assert int(cache.past) == 7 and cache.layer_state(0).query_positions.tolist() == [7]
    cache.end_step()
    cache.crop(-1)
    with pytest.raises(ValueError):
        cache.crop(3)  # transformers 5.x: only a negative number of tokens to remove
    cache.crop(-100)
    assert cache.get_seq_length() == 0
    assert cache.capacity == 20  # pages stay reserved


def test_sequence_longer_than_exact_positions_raises_and_stays_usable():
    # Positions cross the top-k exchange in the low word of an int64 order key: a sequence past 2**31 - 2
    # positions is refused by reserve (before any collective), naming the value and the limit; the cache stays
    # as it was.
    from dcp_compile.ops import reference
    from dcp_compile.ops.distributed import MAX_POSITIONS

    cache = make_cache(world=2, page_size=4, rank=0, num_pages=8, batch=1)
    cache.start_request(1, 12)
    with pytest.raises(ValueError) as info:
        cache.reserve(MAX_POSITIONS + 1)
    assert str(MAX_POSITIONS + 1) in str(info.value) and str(MAX_POSITIONS) in str(info.value)
    assert cache.capacity == 12 and cache.used_pages() == 2
    last = torch.tensor([[MAX_POSITIONS - 1, 0]])
    keys = reference.order_keys(torch.tensor([[-1e30, -1e30]]), last)
    assert torch.equal(reference.key_positions(keys), last) and keys[0, 1] > keys[0, 0]
