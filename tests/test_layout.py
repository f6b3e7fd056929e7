"""Ownership math of docs/design.md §3 (ops/layout.py), checked exhaustively for small groups and lengths.

For every N ∈ {1,2,3,4,8}, I ∈ {1,2,P}, P ∈ {1,4,16} and every length 0..200:
  * every position is owned by exactly one rank, and the ranks' local copies together are exactly 0..L-1;
  * each rank's local indices are exactly 0..L_r-1 (L_r = local_count), in position order;
  * global_position inverts local_index;
  * slots built from a block table of distinct random page ids are unique and land on the right page/row;
  * pages per rank = ceil(L_r / P);
  * local_bound >= local_count on every rank and equals rank 0's count rounded up to a multiple of I.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_compile.layout import DCPLayout

MAX_LEN = 200
WORLDS = (1, 2, 3, 4, 8)
PAGES = (1, 4, 16)


def _configs():
    seen = set()
    for n, p in itertools.product(WORLDS, PAGES):
        for i in (1, 2, p):
            if (n, i, p) not in seen:
                seen.add((n, i, p))
                yield n, i, p


CONFIGS = list(_configs())


def _ids(cfg):
    return "N{}-I{}-P{}".format(*cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_ownership_exhaustive(cfg):
    n, i, p = cfg
    layout = DCPLayout(world=n, interleave=i, page_size=p)
    pos = torch.arange(MAX_LEN)
    owner = layout.owner(pos)
    local = layout.local_index(pos)

    # Owner is a rank, and global_position(local_index(p), owner(p)) == p for every position.
    assert owner.min().item() >= 0 and owner.max().item() < n
    back = torch.empty_like(pos)
    for r in range(n):
        on_r = owner == r
        back[on_r] = layout.global_position(local[on_r], r)
    assert torch.equal(back, pos)

    # Counts per (length, rank): prefix sums of ownership, vs local_count on Python ints.
    onehot = torch.nn.functional.one_hot(owner, n)  # [MAX_LEN, n]
    counts = torch.cat([torch.zeros(1, n, dtype=torch.long), onehot.cumsum(0)], 0)  # [MAX_LEN+1, n]
    expected = torch.tensor([[layout.local_count(length, r) for r in range(n)] for length in range(MAX_LEN + 1)])
    assert torch.equal(counts, expected)
    assert torch.equal(expected.sum(1), torch.arange(MAX_LEN + 1))

    # Each rank's local indices, in position order, are exactly 0..L_r-1 (so every prefix length is too, since a
    # rank's positions below a length are a prefix of its positions).
    for r in range(n):
        mine = local[owner == r]
        assert torch.equal(mine, torch.arange(mine.numel())), f"rank {r}: local indices {mine.tolist()}"

    for length in range(MAX_LEN + 1):
        # Union over ranks of the positions of local rows 0..L_r-1: exactly 0..length-1, each once.
        gathered = torch.cat([layout.global_position(torch.arange(layout.local_count(length, r)), r) for r in range(n)])
        assert gathered.numel() == length
        assert torch.equal(gathered.sort().values, torch.arange(length)), f"length {length}"

        counts_l = [layout.local_count(length, r) for r in range(n)]
        # Rank 0 owns the most; local_bound is a common upper bound = rank 0's count rounded up to a multiple of I.
        bound = layout.local_bound(length)
        assert max(counts_l) == counts_l[0]
        assert all(bound >= c for c in counts_l)
        assert bound == math.ceil(counts_l[0] / i) * i
        assert bound == math.ceil(length / (n * i)) * i
        for r in range(n):
            assert layout.pages(length, r) == math.ceil(counts_l[r] / p)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_slots_unique(cfg):
    n, i, p = cfg
    layout = DCPLayout(world=n, interleave=i, page_size=p)
    gen = torch.Generator().manual_seed(hash(cfg) % 2**31)
    batch = 3
    for r in range(n):
        max_pages = layout.pages(MAX_LEN, r)
        # Distinct random page ids (out of a larger pool), in random order.
        pool_pages = batch * max_pages + 7
        table = torch.randperm(pool_pages, generator=gen)[: batch * max_pages].view(batch, max_pages).to(torch.int32)
        for length in (0, 1, p, p + 1, 37, 113, MAX_LEN):
            count = layout.local_count(length, r)
            local = torch.arange(count).expand(batch, count)
            slots = layout.slot(table, local)
            assert slots.shape == (batch, count)
            flat = slots.flatten()
            assert flat.unique().numel() == flat.numel(), f"rank {r} length {length}: duplicate slots"
            assert flat.numel() == 0 or (flat.min() >= 0 and flat.max() < pool_pages * p)
            # The row is on the page the table names, at offset local % P.
            assert torch.equal(slots // p, table.long().gather(1, local // p))
            assert torch.equal(slots % p, local % p)
            # Exactly ceil(L_r / P) pages per sequence are touched.
            for b in range(batch):
                assert (slots[b] // p).unique().numel() == layout.pages(length, r) == math.ceil(count / p)


def test_local_count_on_integer_tensors():
    """layout.py promises every function works on integer tensors too: local_count / local_bound / pages on a
    vector of lengths must agree with the Python-int results."""
    layout = DCPLayout(world=3, interleave=2, page_size=4)
    lengths = torch.arange(MAX_LEN + 1)
    for r in range(3):
        got = layout.local_count(lengths, r)
        assert torch.equal(torch.as_tensor(got), torch.tensor([layout.local_count(x, r) for x in range(MAX_LEN + 1)]))
    got_bound = layout.local_bound(lengths)
    assert torch.equal(got_bound, torch.tensor([layout.local_bound(x) for x in range(MAX_LEN + 1)]))


def test_invalid_layout():
    for kwargs in ({"world": 0}, {"world": 2, "interleave": 0}, {"world": 2, "page_size": 0}):
        with pytest.raises(ValueError):
            DCPLayout(**kwargs)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 16),
    i=st.integers(1, 32),
    p=st.integers(1, 64),
    length=st.integers(0, 5000),
)
def test_ownership_property(n, i, p, length):
    layout = DCPLayout(world=n, interleave=i, page_size=p)
    pos = torch.arange(length)
    owner, local = layout.owner(pos), layout.local_index(pos)
    counts = [layout.local_count(length, r) for r in range(n)]
    assert sum(counts) == length
    assert torch.equal(torch.bincount(owner, minlength=n), torch.tensor(counts))
    bound = layout.local_bound(length)
    assert bound == math.ceil(counts[0] / i) * i and all(bound >= c for c in counts)
    for r in range(n):
        mine = local[owner == r]
        assert torch.equal(mine, torch.arange(counts[r]))
        assert torch.equal(layout.global_position(mine, r), pos[owner == r])
        assert layout.pages(length, r) == math.ceil(counts[r] / p)
