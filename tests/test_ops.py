"""The local `dcp` ops (ops/__init__.py): opcheck, fake shapes/dtypes, the CPU implementations against the
independent float64 oracles of tests/op_oracles.py, empty pools, and the inference-only backward errors."""
from __future__ import annotations

import os
import re

import op_oracles as oracle
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dcp_compile.ops import DCPLayout  # registers torch.ops.dcp

dcp = torch.ops.dcp
NEG_INF = float("-inf")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- sample inputs -------------------------------------------------------------------------------------------
def attn_inputs(dtype=torch.float64, T=5, H=3, Dk=10, S=23, K=6, v_dim=7, seed=0, zero_rows=(1,)):
    g = _gen(seed)
    q = torch.randn(T, H, Dk, generator=g, dtype=torch.float64).to(dtype)
    kv = torch.randn(S, Dk, generator=g, dtype=torch.float64).to(dtype)
    counts = torch.randint(1, K + 1, (T,), generator=g)
    for t in zero_rows:
        counts[t] = 0
    counts[0] = K  # a full row
    slots = torch.full((T, K), -1, dtype=torch.int32)
    for t in range(T):
        slots[t, : counts[t]] = torch.randperm(S, generator=g)[: counts[t]].to(torch.int32)
    return q, kv, slots, counts.to(torch.int32), 0.37, v_dim


def write_inputs(dtype=torch.float64, S=17, D=6, n=9, seed=1):
    g = _gen(seed)
    pool = torch.randn(S, D, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    slots = torch.randperm(S, generator=g)[:n]
    slots[::3] = -1  # rows another rank owns
    return pool, rows, slots


def indexer_inputs(B=2, S=3, Hi=4, Di=8, L=11, Pn=29, seed=2, q_dtype=torch.float64):
    g = _gen(seed)
    q = torch.randn(B, S, Hi, Di, generator=g, dtype=torch.float64).to(q_dtype)
    w = torch.randn(B, S, Hi, generator=g, dtype=torch.float64).to(q_dtype)
    k_pool = torch.randn(Pn, Di, generator=g, dtype=torch.float64)
    key_slots = torch.randperm(Pn, generator=g)[: B * L].view(B, L).to(torch.int32)
    key_slots[:, -2:] = -1  # keys past the sequence end
    allowed = torch.rand(B, S, L, generator=g) < 0.7
    allowed[0, 0] = False  # a query with no allowed key at all
    return q, w, k_pool, key_slots, allowed, 0.125


def topk_case(T=6, k=5, rank=1, world=3, interleave=2, page_size=4, seed=3, B=2, blocks_of=None):
    """What distributed_topk hands dcp::topk_select: every rank's local top-k (k of the positions it owns, in
    position order; few distinct scores: plenty of ties; some -inf; query 0 all -inf) as order keys, best
    first, [world, T, k]. Returns (op args, (cand_scores, cand_pos) [T, world·k]: the same candidates raw,
    for the oracle). ``blocks_of`` (!= k) makes blocks of that many keys (the reference takes any)."""
    g = _gen(seed)
    layout = DCPLayout(world, interleave, page_size)
    width = blocks_of or k
    max_pos = 4 * world * interleave * max(width, 1)
    scores, positions = [], []
    for r in range(world):
        owned = torch.tensor([p for p in range(max_pos) if int(layout.owner(torch.tensor(p))) == r])
        pos = torch.stack([owned[torch.randperm(len(owned), generator=g)[:width]].sort().values for _ in range(T)])
        sc = torch.randint(0, 4, (T, width), generator=g).float()
        sc[torch.rand(T, width, generator=g) < 0.25] = NEG_INF
        sc[0] = NEG_INF  # nothing selectable
        scores.append(sc)
        positions.append(pos)
    keys = torch.stack([dcp.candidate_keys(sc, pos) for sc, pos in zip(scores, positions)])
    seq_index = torch.randint(0, B, (T,), generator=g)
    pages = layout.pages(max_pos, 0)
    block_table = torch.randperm(B * pages + 5, generator=g)[: B * pages].view(B, pages).to(torch.int32)
    args = (keys, seq_index, block_table, k, rank, world, interleave, page_size)
    return args, (torch.cat(scores, dim=1), torch.cat(positions, dim=1))


def topk_inputs(**kw):
    return topk_case(**kw)[0]


def candidate_inputs(T=5, k=7, seed=6):
    """A local top-k's (scores, positions): ties, -inf, and zeros of both signs (equal scores)."""
    g = _gen(seed)
    scores = torch.randint(-2, 3, (T, k), generator=g).float()
    scores = torch.where(scores == 0, torch.where(torch.rand(T, k, generator=g) < 0.5, -0.0, 0.0), scores)
    scores[torch.rand(T, k, generator=g) < 0.2] = NEG_INF
    positions = torch.stack([torch.randperm(100, generator=g)[:k] for _ in range(T)])
    return scores, positions


def combine_inputs(dtype=torch.float64, N=3, T=4, H=2, D=5, rank=1, seed=4):
    g = _gen(seed)
    lse_all = torch.randn(N, T, H, generator=g, dtype=torch.float32) * 3
    lse_all[rank, 0] = NEG_INF  # this rank empty for query 0
    lse_all[:, 1] = NEG_INF  # every rank empty for query 1
    lse_all[:, 2, 0] = NEG_INF
    lse_all[0, 2, 0] = 2.0  # only rank 0 has rows for query 2, head 0
    out = torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dtype)
    return out, lse_all[rank].clone(), lse_all


def empty_pool_attn_inputs(dtype=torch.float64, T=3, H=2, Dk=10, K=4, v_dim=7, device="cpu"):
    """A rank that owns no token yet: kv [0, Dk], every count 0, slots all -1."""
    q = torch.randn(T, H, Dk, generator=_gen(5), dtype=torch.float64).to(dtype=dtype, device=device)
    kv = torch.empty(0, Dk, dtype=dtype, device=device)
    slots = torch.full((T, K), -1, dtype=torch.int32, device=device)
    counts = torch.zeros(T, dtype=torch.int32, device=device)
    return q, kv, slots, counts, 0.37, v_dim


def empty_pool_indexer_inputs(device="cpu"):
    q, w, k_pool, key_slots, allowed, scale = indexer_inputs(q_dtype=torch.float32)
    k_pool = k_pool[:0].float()
    key_slots = torch.full_like(key_slots, -1)
    return tuple(x.to(device) for x in (q, w, k_pool, key_slots, allowed)) + (scale,)


# --- opcheck ---------------------------------------------------------------------------------------------------
OPCHECK_CASES = {
    "sparse_mla_attn_f64": (dcp.sparse_mla_attn, lambda: attn_inputs(torch.float64)),
    "sparse_mla_attn_f32": (dcp.sparse_mla_attn, lambda: attn_inputs(torch.float32, zero_rows=(1, 2))),
    "sparse_mla_attn_all_empty": (dcp.sparse_mla_attn, lambda: attn_inputs(torch.float32, T=2, zero_rows=(0, 1))),
    "sparse_mla_attn_empty_pool": (dcp.sparse_mla_attn, lambda: empty_pool_attn_inputs(torch.float32)),
    "indexer_scores_empty_pool": (dcp.indexer_scores, lambda: empty_pool_indexer_inputs()),
    "paged_write_f64": (dcp.paged_write, lambda: write_inputs(torch.float64)),
    "paged_write_f32_int32_slots": (
        dcp.paged_write, lambda: (lambda p, r, s: (p, r, s.to(torch.int32)))(*write_inputs(torch.float32))
    ),
    "indexer_scores_f64": (dcp.indexer_scores, lambda: indexer_inputs()),
    "indexer_scores_f32": (dcp.indexer_scores, lambda: indexer_inputs(q_dtype=torch.float32)),
    "candidate_keys": (dcp.candidate_keys, lambda: candidate_inputs()),
    "topk_select": (dcp.topk_select, lambda: topk_inputs()),
    "topk_select_world1": (dcp.topk_select, lambda: topk_inputs(rank=0, world=1, interleave=1)),
    "lse_combine_f64": (dcp.lse_combine, lambda: combine_inputs(torch.float64)),
    "lse_combine_f32": (dcp.lse_combine, lambda: combine_inputs(torch.float32)),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case):
    op, make = OPCHECK_CASES[case]
    torch.library.opcheck(op, make())


# --- fake implementations ----------------------------------------------------------------------------------------
def _to_fake(mode, args):
    return tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


def _meta(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype)
    if x is None:
        return None
    return tuple(_meta(y) for y in x)


FAKE_CASES = {
    "sparse_mla_attn_f64": (dcp.sparse_mla_attn, lambda: attn_inputs(torch.float64)),
    "sparse_mla_attn_f32": (dcp.sparse_mla_attn, lambda: attn_inputs(torch.float32)),
    "sparse_mla_attn_bf16": (dcp.sparse_mla_attn, lambda: attn_inputs(torch.bfloat16)),
    "paged_write": (dcp.paged_write, lambda: write_inputs()),
    "indexer_scores_f64": (dcp.indexer_scores, lambda: indexer_inputs()),
    "indexer_scores_bf16": (dcp.indexer_scores, lambda: indexer_inputs(q_dtype=torch.bfloat16)),
    "candidate_keys": (dcp.candidate_keys, lambda: candidate_inputs()),
    "topk_select": (dcp.topk_select, lambda: topk_inputs()),
    # Blocks shorter than k (3 < k=5): the fake says [T, k]; the real op must agree.
    "topk_select_few_candidates": (dcp.topk_select, lambda: topk_inputs(blocks_of=3, k=5)),
    "lse_combine_f64": (dcp.lse_combine, lambda: combine_inputs(torch.float64)),
    "lse_combine_f32": (dcp.lse_combine, lambda: combine_inputs(torch.float32)),
    "lse_combine_bf16": (dcp.lse_combine, lambda: combine_inputs(torch.bfloat16)),
}

def _lse_dtype(q):
    # fp32 by contract; float64 inputs may keep float64 (the 1e-10 float64 DCP parity needs a float64 lse).
    return (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)


EXPECTED_META = {
    # op -> (args -> expected (shape, dtype) tree), from the op's documented contract; a tuple of dtypes = any of them
    dcp.sparse_mla_attn: lambda q, kv, slots, counts, scale, v_dim: (
        ((q.shape[0], q.shape[1], v_dim), q.dtype), ((q.shape[0], q.shape[1]), _lse_dtype(q))
    ),
    dcp.paged_write: lambda pool, rows, slots: None,
    dcp.indexer_scores: lambda q, w, k_pool, key_slots, allowed, scale: (
        (q.shape[0], q.shape[1], key_slots.shape[1]), torch.float32
    ),
    dcp.candidate_keys: lambda scores, positions: (tuple(scores.shape), torch.int64),
    dcp.topk_select: lambda keys, si, bt, k, *rest: (((keys.shape[1], k), torch.int32), ((keys.shape[1],), torch.int32)),
    dcp.lse_combine: lambda out, lse, lse_all: (
        tuple(out.shape), torch.float64 if out.dtype == torch.float64 else torch.float32
    ),
}


def _matches(meta, expected):
    if meta is None or expected is None:
        return meta is None and expected is None
    if isinstance(meta[1], torch.dtype):  # a (shape, dtype) leaf
        shape, dtype = meta
        dtypes = expected[1] if isinstance(expected[1], tuple) else (expected[1],)
        return shape == tuple(expected[0]) and dtype in dtypes
    return len(meta) == len(expected) and all(_matches(m, e) for m, e in zip(meta, expected))


@pytest.mark.parametrize("case", sorted(FAKE_CASES))
def test_fake_shapes(case):
    op, make = FAKE_CASES[case]
    args = make()
    expected = EXPECTED_META[op](*args)
    real = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    with FakeTensorMode() as mode:
        fake = op(*_to_fake(mode, args))
    assert _matches(_meta(fake), expected), f"fake: {_meta(fake)} expected {expected}"
    assert _matches(_meta(real), expected), f"real: {_meta(real)} expected {expected}"
    assert _meta(fake) == _meta(real), f"fake {_meta(fake)} != real {_meta(real)}"


def test_fake_under_compile_no_graph_break():
    """The ops trace into one graph (fake impls are enough for Dynamo/AOT) and match eager."""
    args = attn_inputs(torch.float64)

    def f(q, kv, slots, counts):
        out, lse = dcp.sparse_mla_attn(q, kv, slots, counts, 0.37, 7)
        return out * 2, lse

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*args[:4])
    ref = f(*args[:4])
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


# --- CPU implementations vs the float64 oracles -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_mla_attn_vs_reference(dtype):
    q, kv, slots, counts, scale, v_dim = attn_inputs(dtype, T=7, zero_rows=(1, 4))
    # Garbage (but valid) row ids after counts: they must be ignored.
    for t in range(slots.shape[0]):
        slots[t, counts[t]:] = torch.arange(slots.shape[1] - counts[t]).to(torch.int32) % kv.shape[0]
    out, lse = dcp.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    ref_out, ref_lse = oracle.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    assert out.dtype == dtype and lse.dtype in ((torch.float32, torch.float64) if dtype == torch.float64 else (torch.float32,))
    assert not out.isnan().any() and not lse.isnan().any()
    empty = counts == 0
    assert (out[empty] == 0).all(), "count 0 must give out exactly 0"
    assert (lse[empty] == NEG_INF).all(), "count 0 must give lse = -inf"
    assert torch.isfinite(lse[~empty]).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)  # at least fp32 accuracy


def test_sparse_mla_attn_float64_lse_is_exact():
    """float64 inputs: the lse must carry float64 accuracy. The LSE merge weights exp(lse_r - lse) of a partial
    result inherit the lse's relative error, so an fp32-rounded lse caps DCP parity at ~1e-7, not the 1e-10 that
    the float64 pipeline requires (see test_dcp_pipeline)."""
    q, kv, slots, counts, scale, v_dim = attn_inputs(torch.float64, T=6, zero_rows=(3,))
    out, lse = dcp.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    _, ref_lse = oracle.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    finite = counts > 0
    err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
    assert err <= 1e-12, f"float64 sparse_mla_attn: lse ({lse.dtype}) is off by {err:.2e} from the float64 value"
    assert (lse[~finite] == NEG_INF).all()


def test_sparse_mla_attn_ignores_rows_past_counts():
    """Rows a query does not select are never read into the result: non-finite garbage in the pool (e.g. an
    uninitialised page, or row 0) must not leak NaN into out, also for count-0 queries (out exactly 0)."""
    q, kv, slots, counts, scale, v_dim = attn_inputs(torch.float64, T=5, zero_rows=(1, 3))
    # Shift the real rows up by one and put NaN rows at 0 and between: only selected rows are finite.
    poisoned = torch.full((2 * kv.shape[0] + 1, kv.shape[1]), float("nan"), dtype=kv.dtype)
    poisoned[1::2] = kv
    slots = torch.where(slots >= 0, 2 * slots + 1, slots).to(torch.int32)
    out, lse = dcp.sparse_mla_attn(q, poisoned, slots, counts, scale, v_dim)
    ref_out, _ = oracle.sparse_mla_attn(q, poisoned, slots, counts, scale, v_dim)
    assert not out.isnan().any(), (
        f"NaN in out for queries {sorted(set(out.isnan().nonzero()[:, 0].tolist()))} (counts {counts.tolist()}): "
        "rows past counts[t] were read"
    )
    assert (out[counts == 0] == 0).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)


def test_sparse_mla_attn_large_logits_no_overflow():
    q, kv, slots, counts, scale, v_dim = attn_inputs(torch.float64, T=3, zero_rows=(2,))
    q = q * 300.0  # logits in the thousands: a naive exp would overflow
    out, lse = dcp.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    ref_out, ref_lse = oracle.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-3)


def test_paged_write_skips_negative_slots():
    for slot_dtype in (torch.int64, torch.int32):
        pool, rows, slots = write_inputs()
        slots = slots.to(slot_dtype)
        expected = pool.clone()
        for i in range(rows.shape[0]):
            if int(slots[i]) >= 0:
                expected[int(slots[i])] = rows[i]
        before_ptr = pool.data_ptr()
        result = dcp.paged_write(pool, rows, slots)
        assert result is None
        assert pool.data_ptr() == before_ptr  # in place
        assert torch.equal(pool, expected)
    # Casting rows to the pool's dtype.
    pool = torch.zeros(4, 3, dtype=torch.float32)
    dcp.paged_write(pool, torch.ones(2, 3, dtype=torch.float64), torch.tensor([-1, 2]))
    assert torch.equal(pool, torch.tensor([[0.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3]))


def test_indexer_scores_vs_reference():
    args = indexer_inputs()
    got = dcp.indexer_scores(*args)
    ref = oracle.indexer_scores(*args)
    assert got.dtype == torch.float32
    masked = ref == NEG_INF
    assert torch.equal(got == NEG_INF, masked)
    torch.testing.assert_close(got.double()[~masked], ref[~masked], rtol=1e-5, atol=1e-5)
    # Long prefill: more queries than one internal block.
    q, w, k_pool, key_slots, allowed, scale = indexer_inputs(B=1, S=300, Hi=2, Di=4, L=5, Pn=9)
    got = dcp.indexer_scores(q, w, k_pool, key_slots, allowed, scale)
    ref = oracle.indexer_scores(q, w, k_pool, key_slots, allowed, scale)
    masked = ref == NEG_INF
    assert torch.equal(got == NEG_INF, masked)
    torch.testing.assert_close(got.double()[~masked], ref[~masked], rtol=1e-5, atol=1e-5)


def _check_topk(case):
    """The op's slots are the oracle's, in the oracle's order (best first), then -1; the count is theirs."""
    args, raw = case
    slots, counts = dcp.topk_select(*args)
    expected = oracle.topk_select(*raw, *args[1:])
    k = args[3]
    assert slots.dtype == torch.int32 and counts.dtype == torch.int32
    assert slots.shape == (args[0].shape[1], k)
    for t, exp in enumerate(expected):
        n = int(counts[t])
        assert n == len(exp), f"query {t}: count {n}, expected {len(exp)} ({exp})"
        assert slots[t, :n].tolist() == exp, f"query {t}: {slots[t].tolist()} vs {exp}"
        assert (slots[t, n:] == -1).all(), f"query {t}: not compacted: {slots[t].tolist()}"
    return expected


def test_topk_select_vs_reference():
    seen_partial = False
    for seed in range(6):
        for rank in range(3):
            expected = _check_topk(topk_case(seed=seed, rank=rank, T=8, k=5))
            seen_partial |= any(0 < len(e) < 5 for e in expected)
        # The ranks' shares of one query partition the global top-k.
        cases = [topk_case(seed=seed, rank=r, T=8, k=5) for r in range(3)]
        all_ranks = [oracle.topk_select(*raw, *args[1:]) for args, raw in cases]
        cs = cases[0][1][0]
        for t in range(8):
            assert sum(len(all_ranks[r][t]) for r in range(3)) == min(5, int((cs[t] > NEG_INF).sum()))
    assert seen_partial
    # world 1, interleave = page size
    _check_topk(topk_case(rank=0, world=1, interleave=4, page_size=4))
    _check_topk(topk_case(rank=1, world=2, interleave=4, page_size=4, k=7))


def test_candidate_keys_order():
    """Keys sort as (score desc, position asc); -0.0 and +0.0 tie; -inf keys are dead and last; the round trip
    gives the positions back."""
    from dcp_compile.ops import reference

    scores = torch.tensor([[1.0, 1.0, 2.0, -0.0, 0.0, NEG_INF, -3.0, 0.5]])
    positions = torch.tensor([[9, 2, 7, 5, 4, 0, 1, 3]])
    keys = dcp.candidate_keys(scores, positions)
    assert keys.dtype == torch.int64 and keys.shape == (1, 8)
    live = reference.key_live(keys)
    assert live.tolist() == [[True] * 7 + [False]]
    assert reference.key_positions(keys)[live].tolist() == [7, 2, 9, 3, 4, 5, 1]
    assert (keys[0, :-1] > keys[0, 1:]).all(), "keys must be strictly decreasing (distinct live keys)"


def test_topk_select_ties_and_edge_cases():
    from dcp_compile.ops import reference

    layout = DCPLayout(1, 1, 4)
    block_table = torch.tensor([[3, 0, 2, 1]], dtype=torch.int32)  # positions 0..15 -> slots via pages 3,0,2,1
    seq_index = torch.tensor([0, 0, 0])
    # Query 0: ties at the cut; the lower positions win.   Query 1: -inf never selected though k is larger.
    # Query 2: higher score beats lower position.
    cand_pos = torch.tensor([[9, 2, 7, 5, 11, 0], [4, 1, 8, 3, 6, 10], [0, 1, 2, 3, 4, 15]])
    cand_scores = torch.tensor(
        [[1.0, 1.0, 2.0, 1.0, 1.0, 0.5], [NEG_INF, 3.0, NEG_INF, NEG_INF, 1.0, NEG_INF], [1.0, 1.0, 1.0, 1.0, 1.0, 1.5]]
    )
    keys = dcp.candidate_keys(cand_scores, cand_pos)[None]
    slots, counts = dcp.topk_select(keys, seq_index, block_table, 3, 0, 1, 1, 4)
    to_slot = lambda ps: [int(layout.slot(block_table[0], torch.tensor([p]))) for p in ps]  # noqa: E731
    assert counts.tolist() == [3, 2, 3]
    assert slots[0].tolist() == to_slot([7, 2, 5])
    assert slots[1, :2].tolist() == to_slot([1, 6]) and slots[1, 2].item() == -1
    assert slots[2].tolist() == to_slot([15, 0, 1])
    # The reference takes keys in any order: unsorted keys give the same selection.
    perm = torch.tensor([5, 3, 1, 0, 4, 2])
    shuffled = reference.order_keys(cand_scores[:, perm], cand_pos[:, perm])[None]
    slots2, counts2 = dcp.topk_select(shuffled, seq_index, block_table, 3, 0, 1, 1, 4)
    assert torch.equal(counts2, counts) and torch.equal(slots2, slots)


def test_topk_select_fewer_candidates_than_k():
    """Blocks shorter than k (a direct call on a short candidate list): the result is still [T, k] with -1
    padding, as the fake implementation declares."""
    case = topk_case(T=4, blocks_of=3, k=5)
    slots, counts = dcp.topk_select(*case[0])
    assert slots.shape == (4, 5), f"topk_select returned {tuple(slots.shape)} but its fake says (T, k) = (4, 5)"
    _check_topk(case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_combine_vs_reference(dtype):
    out, lse, lse_all = combine_inputs(dtype)
    got = dcp.lse_combine(out, lse, lse_all)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not got.isnan().any()
    ref = oracle.lse_combine(out, lse_all, rank=1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    # Empty rank (lse = -inf): exactly zero weight even though its out is non-zero.
    assert (got[0] == 0).all()
    # No rank has rows: exactly 0, no NaN, for every rank.
    for rank in range(lse_all.shape[0]):
        g = dcp.lse_combine(out, lse_all[rank], lse_all)
        assert not g.isnan().any()
        assert (g[1] == 0).all()
    # Only rank 0 has rows for (query 2, head 0): its weight is exactly 1.
    g0 = dcp.lse_combine(out, lse_all[0], lse_all)
    assert torch.equal(g0[2, 0], out[2, 0].to(g0.dtype))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_combine_empty_rank_contributes_exactly_zero(dtype, poison):
    """The op's promise: a rank with lse = -inf contributes exactly 0 whatever its partial holds (never
    0·NaN); and a query no rank has rows for gives 0 on every rank."""
    out, lse, lse_all = combine_inputs(dtype)
    rank = 1
    assert (lse[0] == NEG_INF).all() and (lse_all[:, 1] == NEG_INF).all()
    out[0] = poison  # this rank is empty for query 0
    out[1] = poison  # every rank is empty for query 1
    got = dcp.lse_combine(out, lse, lse_all)
    assert (got[0] == 0).all() and (got[1] == 0).all(), got[:2]
    assert torch.isfinite(got[2:]).all()
    # The other queries are untouched by the poison.
    clean = combine_inputs(dtype)[0]
    torch.testing.assert_close(got[2:], dcp.lse_combine(clean, lse, lse_all)[2:], rtol=0, atol=0)
    # All ranks empty everywhere: 0 from every rank.
    none = torch.full_like(lse_all, NEG_INF)
    for r in range(lse_all.shape[0]):
        assert (dcp.lse_combine(torch.full_like(out, poison), none[rank], none) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_combine_weights_sum_to_one_and_large_lse(dtype):
    g = _gen(7)
    N, T, H, D = 4, 3, 2, 3
    lse_all = (torch.randn(N, T, H, generator=g, dtype=torch.float64) * 200).to(dtype)  # naive exp would overflow
    lse_all[1, 0] = NEG_INF
    ones = torch.ones(T, H, D, dtype=dtype)
    total = sum(dcp.lse_combine(ones, lse_all[r], lse_all) for r in range(N))
    assert torch.isfinite(total).all()
    # fp32: the weights exp(lse_r - lse) carry the lse's absolute rounding (~|lse|·eps32 ≈ 3e-5 at |lse| ~ 600).
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(total, torch.ones_like(total), rtol=tol, atol=tol)


def test_local_topk_sorted_tie_rule():
    """The local top-k keeps the k best columns, ties to the lower column (the benchmark
    benchmarks/bench_local_topk.py checks the topk + tie-fill alternative against it)."""
    from dcp_compile.ops.distributed import local_topk_sorted

    gen = torch.Generator().manual_seed(7)
    for _ in range(50):
        x = torch.randint(-3, 4, (4, 60), generator=gen).float()
        x[:, 50:] = float("-inf")
        for k in (1, 5, 60):
            values, b = local_topk_sorted(x, k)
            assert torch.equal(values, torch.gather(x, -1, b))
            b = b.sort(-1).values
            # every chosen column beats or ties every unchosen one, and ties go to the lower columns
            chosen = torch.zeros_like(x, dtype=torch.bool).scatter(1, b, True)
            kth = torch.where(chosen, x, torch.full_like(x, float("inf"))).min(-1, keepdim=True).values
            assert not (x > kth)[~chosen].any()
            cols, tie = torch.arange(60).expand_as(x), x == kth
            last_chosen = torch.where(tie & chosen, cols, -1).amax(-1)
            first_left = torch.where(tie & ~chosen, cols, 60).amin(-1)
            assert (last_chosen < first_left).all()


# --- empty pool: a rank that owns no token yet -------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparse_mla_attn_empty_pool(device, dtype):
    q, kv, slots, counts, scale, v_dim = empty_pool_attn_inputs(dtype, device=device)
    out, lse = dcp.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    assert out.shape == (q.shape[0], q.shape[1], v_dim) and out.dtype == dtype
    assert (out == 0).all() and (lse == NEG_INF).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_indexer_scores_and_paged_write_empty_pool(device):
    args = empty_pool_indexer_inputs(device)
    scores = dcp.indexer_scores(*args)
    assert scores.shape == (args[0].shape[0], args[0].shape[1], args[3].shape[1]) and (scores == NEG_INF).all()
    pool = torch.empty(0, 6, device=device)
    dcp.paged_write(pool, torch.randn(3, 6, device=device), torch.full((3,), -1, device=device))


# --- inference only ------------------------------------------------------------------------------------------------
INFERENCE_ONLY = "dcp_compile is inference-only: run generate/forward under torch.no_grad() or torch.inference_mode()"


def _requires_grad(args, which):
    return tuple(a.detach().float().requires_grad_() if i in which else a for i, a in enumerate(args))


@pytest.mark.parametrize("op,args", [
    ("sparse_mla_attn", lambda: _requires_grad(attn_inputs(torch.float32), {0})),
    ("indexer_scores", lambda: _requires_grad(indexer_inputs(q_dtype=torch.float32), {0, 1})),
    ("lse_combine", lambda: _requires_grad(combine_inputs(torch.float32), {0})),
])
def test_backward_raises_inference_only(op, args):
    result = getattr(dcp, op)(*args())  # the forward works with grad mode on
    first = result[0] if isinstance(result, tuple) else result
    with pytest.raises(RuntimeError, match=re.escape(f"dcp::{op}: {INFERENCE_ONLY}")):
        first.sum().backward()
    with torch.no_grad():
        assert not (getattr(dcp, op)(*args())[0] if isinstance(result, tuple) else getattr(dcp, op)(*args())).requires_grad


def test_selection_has_no_gradient_path():
    """candidate_keys and topk_select give integers: nothing can flow back through them (their autograd
    formulas, which raise, are registered all the same)."""
    scores, positions = _requires_grad(candidate_inputs(), {0})
    keys = dcp.candidate_keys(scores, positions)
    assert not keys.requires_grad
    args = topk_inputs()
    slots, counts = dcp.topk_select(*args)
    assert not slots.requires_grad and not counts.requires_grad


def _backward_through_collectives(rank, world):
    """On every rank: a backward through each DCP collective raises the inference-only error; without grad
    the same calls give plain tensors."""
    import torch.distributed as dist

    from dcp_compile.ops import all_gather_heads, lse_merge
    from dcp_compile.ops.distributed import all_reduce_sum

    group = dist.group.WORLD.group_name
    q = torch.randn(3, 2, 5, requires_grad=True)
    lse = torch.randn(3, 2 * world)
    calls = {
        "all_gather_into_tensor": lambda: all_gather_heads(q * 1, group, world),
        "all_reduce": lambda: all_reduce_sum(q * 1, group),
        "reduce_scatter_tensor": lambda: lse_merge(torch.randn(3, 2 * world, 5, requires_grad=True) * 1, lse, group, world),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call().sum().backward()
            messages[name] = None
        except RuntimeError as exc:
            messages[name] = str(exc)
        with torch.no_grad():
            assert not call().requires_grad
    return messages


def test_backward_through_collectives_raises_inference_only():
    from dcp_compile.testing import run_ranks

    for messages in run_ranks(_backward_through_collectives, 2, timeout=120):
        for name, msg in messages.items():
            assert msg is not None and msg.startswith(f"_c10d_functional.{name}: {INFERENCE_ONLY}"), (name, msg)


def test_ops_package_has_one_identity():
    """ops/ imports only as dcp_compile.ops: importing the folder as a top-level ``ops`` (e.g. with the repo root
    on sys.path) fails before registering anything, so the dcp ops can never be registered twice."""
    import pathlib
    import subprocess
    import sys

    import dcp_compile.ops

    root = pathlib.Path(dcp_compile.ops.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", "import ops"], cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0 and "ImportError: ops/ is the package dcp_compile.ops" in proc.stderr, proc.stderr


def test_no_group_is_none():
    """In the op layer ``None`` means no group (a single rank): nothing is communicated and the name is never
    read; a group of several ranks needs its name."""
    from dcp_compile.ops import all_gather_heads, all_reduce_sum, lse_merge

    x = torch.randn(3, 2, 4)
    assert all_gather_heads(x, None, 1) is x
    assert lse_merge(x, torch.zeros(3, 2), None, 1) is x
    assert all_reduce_sum(x, None) is x
    for name in (None, ""):
        with pytest.raises(ValueError, match="needs its process group name"):
            all_gather_heads(x, name, 2)
    with pytest.raises(ValueError, match="needs its process group name"):
        all_reduce_sum(x, "")


def test_attention_kernel_is_chosen_by_name():
    from dcp_compile.ops import ATTENTION_KERNELS, use_attention_kernel

    assert {"triton", "reference"} <= set(ATTENTION_KERNELS)
    with pytest.raises(ValueError, match=r"unknown attention kernel 'flashmla'.*'reference', 'triton'"):
        use_attention_kernel("flashmla")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_registered_attention_kernels_agree_on_cuda():
    from dcp_compile.ops import use_attention_kernel

    q, kv, slots, counts, scale, v_dim = (a.cuda() if isinstance(a, torch.Tensor) else a
                                          for a in attn_inputs(torch.float32))
    outs = {}
    try:
        for name in ("triton", "reference"):
            use_attention_kernel(name)
            outs[name] = dcp.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    finally:
        use_attention_kernel("triton")
    for a, b in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_trace_choices_key_the_compile_caches():
    """The ops' trace-time choices (attention kernel, prefill indexer, decode dependent launch) are in
    torch.compile's cache key with ops/'s source hash, each change replacing our part of the tag in place and
    keeping the user's; a bad value is refused naming the choice (and, read from the environment at import,
    the variable)."""
    import subprocess
    import sys

    from dcp_compile.ops import trace_choices, use_attention_kernel

    config = torch.compiler.config
    saved = config.cache_key_tag
    try:
        config.cache_key_tag = "user-tag"
        trace_choices.set("prefill_indexer", "triton")
        tag = config.cache_key_tag
        assert tag.startswith("user-tag+dcp-ops-") and "prefill_indexer=triton" in tag and tag.count("dcp-ops-") == 1
        use_attention_kernel("reference")
        assert "attention_kernel=reference" in config.cache_key_tag and "prefill_indexer=triton" in config.cache_key_tag
        trace_choices.set("prefill_indexer", "auto")
        use_attention_kernel("triton")
        assert config.cache_key_tag != tag and "prefill_indexer=auto" in config.cache_key_tag
        with pytest.raises(ValueError, match="decode_indexer_pdl must be one of off, on"):
            trace_choices.set("decode_indexer_pdl", "maybe")
        with pytest.raises(KeyError, match="unknown trace choice"):
            trace_choices.get("nope")
    finally:
        config.cache_key_tag = saved
        trace_choices.set("prefill_indexer", "auto")
        use_attention_kernel("triton")
    env = {**os.environ, "DCP_DECODE_INDEXER_PDL": "sometimes"}
    run = subprocess.run([sys.executable, "-c", "import dcp_compile.ops"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "DCP_DECODE_INDEXER_PDL='sometimes'" in run.stderr, run.stderr[-2000:]
