"""The top-k kernels (ops/triton/local_topk.py, candidate_keys.py, topk_select.py) against the sort-based code
they replace: ``local_topk_padded`` (one stable sort), ``reference.candidate_keys`` / ``reference.topk_select``
and the pure-Python oracle of tests/op_oracles.py. The selection must be exactly the same (ties: higher score
first, equal scores to the lower column / position); topk_select's slots in the same order (best first).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on CPU at small shapes with
small tiles (several tiles and chunks per row); with CUDA the same tests run compiled, plus the real decode
shapes (k = 2048, L up to 160K, T up to 64). Outputs are poisoned before each run (NaN floats, a sentinel
for integers), inputs are fresh and full of exact ties (quantized scores, relu zeros of both signs).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: Triton reads it then

triton = pytest.importorskip("triton")

import op_oracles as oracle  # noqa: E402

from dcp_compile.ops import reference  # noqa: E402
from dcp_compile.ops.distributed import PAD_POSITION, local_topk_padded  # noqa: E402
from dcp_compile.ops.layout import DCPLayout  # noqa: E402
from dcp_compile.ops.triton import common  # noqa: E402
from dcp_compile.ops.triton import local_topk as ltk  # noqa: E402
from dcp_compile.ops.triton import candidate_keys as ck  # noqa: E402
from dcp_compile.ops.triton import topk_select as tks  # noqa: E402

if not HAS_CUDA and not common.INTERPRET:
    raise RuntimeError("dcp_compile.ops.triton was imported before TRITON_INTERPRET=1 was set: without CUDA, "
                       "set it before anything imports the Triton kernels")

DEV = "cuda" if HAS_CUDA else "cpu"
INT_POISON = -123456789
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the wrappers allocate starts as NaN (floats) or INT_POISON (integers)."""
    def poisoned_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)
    monkeypatch.setattr(common, "empty", poisoned_empty)
    yield


# ------------------------------------------------------------------------------------------ inputs

def tied_scores(T, L, gen, levels=5, neg_inf_frac=0.2):
    """[T, L] fp32 with many exact ties: relu of a few quantized levels times a per-row weight that may be
    negative, zeros as +0.0 and -0.0 mixed in a row (w·relu(·) with w < 0 makes -0.0; the sort sees them
    equal), some -inf (masked keys)."""
    raw = torch.randint(-levels, levels + 1, (T, L), generator=gen).float()
    weight = torch.where(torch.rand(T, 1, generator=gen) < 0.5, -1.0, 1.0) * (0.5 + torch.rand(T, 1, generator=gen))
    x = torch.relu(raw) * weight
    x = torch.where(x == 0, torch.where(torch.rand(T, L, generator=gen) < 0.5, -0.0, 0.0), x)
    x = torch.where(torch.rand(T, L, generator=gen) < neg_inf_frac, NEG_INF, x)
    return x


def wide_scores(T, L, gen):
    """[T, L] fp32 spread over the whole exponent range (subnormals to 1e38, both signs): every digit of the
    uint32 key matters, ties are rare."""
    mant = torch.randn(T, L, generator=gen)
    expo = torch.randint(-149, 127, (T, L), generator=gen).float()
    return (mant * torch.exp2(expo)).float()


# ---------------------------------------------------------------------------------------- local_topk

def coarse_digit(x):
    """torch mirror of ``radix_select.coarse_digit`` on fp32 scores: what the documented output order of the
    candidate scheme is stated in (0 = -inf, quarter-octave bins of magnitudes 2^-16 .. 2^16)."""
    bits = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32).long() & 0xFFFFFFFF
    key = torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 2**31)  # float_key
    top = key >> 21
    positive = top >= 1024
    mag = (torch.where(positive, top - 1024, 1023 - top) - 4 * (127 - 16)).clamp(0, 127)
    digit = torch.where(positive, 128 + mag, 127 - mag)
    return torch.where(torch.isneginf(x), 0, digit.clamp(min=1))


def quarter_octave(x):
    """torch mirror of ``radix_select.quarter_octave``: the top 11 bits of the signed order key (-0.0 = +0.0)."""
    bits = torch.where(x == 0, torch.zeros_like(x), x).float().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 21


def window_base(x, k, block):
    """torch mirror of the candidate scheme's sample (``local_topk_sample_kernel``: a piece of block / 16
    columns of every tile, its place rotating by 7 pieces a tile) and ``radix_select.window_base``: per row,
    the quarter octave that window bin 0 stands for."""
    T, L = x.shape
    sample = max(1, block // ltk.SAMPLE_FRACTION)
    pieces = block // sample
    tiles = torch.arange(-(-L // block))
    cols = (tiles[:, None] * block + (tiles[:, None] * 7 % pieces) * sample + torch.arange(sample)).flatten()
    cols = cols[cols < L]
    bases = []
    for t in range(T):
        digits = coarse_digit(x[t, cols].float())
        rank = max(1, -(-len(cols) * min(k, L) // max(L, 1)))
        d = int(digits.sort(descending=True).values[rank - 1]) if len(cols) else 128
        bases.append((d + 316 if d >= 128 else d - 572) - 16)
    return torch.tensor(bases)


def window_digit(x, base):
    """torch mirror of ``radix_select.window_digit``: 0 = -inf, else the quarter octave minus the row's base,
    clamped to 1 .. 31."""
    return torch.where(torch.isneginf(x), 0, (quarter_octave(x) - base[:, None]).clamp(1, 31))


def expected_order(x, idx, k, cap=None, block=None):
    """The documented order of a row's chosen columns (idx: the set): those above the window bin of the k-th
    element in column order, then that bin's chosen ones in column order, then padding columns (>= L); a row
    whose bin overflows the candidate buffer (more than min(cap, L) finite elements in it: the five-pass
    fallback) in plain column order."""
    T, L = x.shape
    cap = min(ltk.CAP if cap is None else cap, L)
    block = block or (ltk.BLOCK if HAS_CUDA else ltk.INTERPRET_BLOCK)
    digits = window_digit(x, window_base(x, k, block))
    out = []
    for t in range(T):
        cols = idx[t].sort().values
        real = cols[cols < L]
        chosen = digits[t, real]
        d0 = chosen.min() if len(real) else 0
        in_bin = int((digits[t] == d0).sum())
        if d0 != 0 and in_bin > cap:
            out.append(cols)
        else:
            out.append(torch.cat([real[chosen > d0], real[chosen == d0], cols[cols >= L]]))
    return torch.stack(out)


def check_local_topk(x, k, **kw):
    """The kernel's columns are the stable sort's set, its values the scores at them, in the documented order;
    a second run gives the same output (the order is deterministic)."""
    values, idx = ltk.local_topk(x.to(DEV), k, **kw)
    T, L = x.shape
    assert values.shape == (T, k) and idx.shape == (T, k)
    assert values.dtype == x.dtype and idx.dtype == torch.int64
    values, idx = values.cpu(), idx.cpu()
    assert not torch.isnan(values).any(), "unwritten value"
    assert not (idx == INT_POISON).any(), "unwritten column"
    ref_values, ref_idx = local_topk_padded(x.cpu(), k)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values), "not the stable sort's columns"
    padded = torch.nn.functional.pad(x.cpu(), (0, k), value=NEG_INF)
    assert torch.equal(values, torch.gather(padded, -1, idx))
    assert torch.equal(idx, expected_order(x.cpu(), idx, k, kw.get("cap"), kw.get("block"))), "not the documented order"
    again_values, again_idx = ltk.local_topk(x.to(DEV), k, **kw)
    assert torch.equal(again_idx.cpu(), idx) and torch.equal(again_values.cpu(), values), "not deterministic"
    return values, idx


@pytest.mark.parametrize("T,L,k,chunks", [
    (3, 300, 17, None),   # L not a multiple of the 64 tile; default split (one tile per chunk)
    (2, 300, 40, 2),      # two chunks of 3 tiles, the last partly masked
    (4, 129, 1, 3),       # k = 1
    (2, 200, 200, 1),     # k = L: everything, no padding
])
@pytest.mark.parametrize("cap", [None, 3])  # candidates in the buffer, or (mostly) overflowing it
def test_local_topk_ties(T, L, k, chunks, cap):
    gen = torch.Generator().manual_seed(T * 1000 + L + k)
    x = tied_scores(T, L, gen)
    x[0] = NEG_INF                         # a row with no candidate: the first k columns
    check_local_topk(x, k, chunks=chunks, cap=cap)


def test_local_topk_fewer_columns_than_k():
    """L < k: every column, then the padding columns L .. k-1 with -inf (as the padded sort)."""
    gen = torch.Generator().manual_seed(5)
    x = tied_scores(3, 70, gen)
    x[1] = NEG_INF
    values, idx = check_local_topk(x, 150, chunks=2)
    assert torch.equal(idx[:, 70:], torch.arange(70, 150).expand(3, -1))
    assert torch.isneginf(values[:, 70:]).all()
    check_local_topk(x[:, :5], 8)          # one partial tile
    check_local_topk(x[:, :0], 3)          # no column at all: only padding
    check_local_topk(x, 150, cap=2)        # the lowest bin overflows: read from the row


def test_local_topk_wide_range_and_signs():
    gen = torch.Generator().manual_seed(9)
    x = wide_scores(3, 250, gen)
    x[1:] = -x[1:].abs()                   # all negative: the flipped half of the key
    x[2, ::7] = 0.0
    x[2, 3::7] = -0.0                      # the top 72 are +0.0 and -0.0: a tie, lower columns first
    check_local_topk(x, 33, chunks=3)
    check_local_topk(x, 33, chunks=3, cap=4)


def test_local_topk_all_equal_row():
    """One value everywhere: the threshold bin is the whole row; the quota of ties spans chunks."""
    x = torch.full((2, 260), 0.75)
    x[1, :100] = -0.0                      # -0.0 ties with +0.0: columns 0 .. 129, not +0.0's first
    x[1, 100:] = 0.0
    _, idx = check_local_topk(x, 130, chunks=4)
    assert torch.equal(idx, torch.arange(130).expand(2, -1))
    _, idx = check_local_topk(x, 130, chunks=4, cap=100)   # 260 in the bin > cap: the row fallback
    assert torch.equal(idx, torch.arange(130).expand(2, -1))


def test_local_topk_half_precision_scores():
    gen = torch.Generator().manual_seed(3)
    x = tied_scores(2, 150, gen).to(torch.bfloat16)
    check_local_topk(x, 20, chunks=2)
    check_local_topk(tied_scores(2, 150, gen).half(), 20, chunks=2, cap=5)


def test_local_topk_neg_inf_padding_and_relu_zeros():
    """Fewer finite scores than k (a short sequence in a long bucket): the -inf bin is the threshold bin, its
    chosen ones are its lowest columns (interleaved -inf too); many relu zeros of both signs tie at 0."""
    gen = torch.Generator().manual_seed(11)
    x = tied_scores(3, 400, gen, neg_inf_frac=0.5)
    x[:, 120:] = NEG_INF                   # about 60 finite scores per row, k = 100
    _, idx = check_local_topk(x, 100, chunks=3)
    finite = torch.isfinite(x)
    for t in range(3):
        n = int(finite[t].sum())
        assert torch.equal(idx[t, :n], finite[t].nonzero()[:, 0]), "every finite score first, in column order"
    x = torch.relu(torch.randn(4, 300, generator=gen)) * torch.tensor([[1.0], [-1.0], [2.0], [-0.5]])
    check_local_topk(x, 200, chunks=2)     # the zeros' bin holds the threshold: ~150 ties at it
    check_local_topk(x, 200, chunks=2, cap=8)


def test_local_topk_narrow_range_overflows():
    """Scores in [1, 1.01): one coarse bin holds every element; with cap < L the refinement reads the row,
    without (cap >= L) the buffer holds them: the same output either way, and several chunks."""
    gen = torch.Generator().manual_seed(12)
    x = 1.0 + 0.01 * torch.rand(3, 500, generator=gen)
    x[1, ::3] = x[1, 0]                    # ties within the range
    assert (coarse_digit(x) == coarse_digit(x[:1, :1])).all(), "the test needs one bin"
    v_overflow, i_overflow = check_local_topk(x, 64, chunks=4, cap=100)
    v_buffer, i_buffer = check_local_topk(x, 64, chunks=4)
    # the same set and values; the order is each path's documented one (the fallback: column order)
    assert torch.equal(i_overflow, i_overflow.sort(-1).values)
    assert torch.equal(i_overflow, i_buffer.sort(-1).values)
    assert torch.equal(v_overflow, torch.gather(x, -1, i_overflow))


def test_local_topk_same_output_for_any_split_or_cap():
    """The output order is defined by the data (and whether the threshold bin overflows the buffer's cap)
    alone: tiles and chunks do not change it; a cap it overflows gives the same set in column order."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 700, generator=gen)
    x = torch.where(torch.rand(3, 700, generator=gen) < 0.2, torch.round(x * 4) / 4, x)
    base_v, base_i = check_local_topk(x, 90)
    for kw in (dict(chunks=1), dict(chunks=5), dict(block=32, chunks=3)):
        v, i = check_local_topk(x, 90, **kw)
        assert torch.equal(i, base_i) and torch.equal(v, base_v), kw
    for kw in (dict(cap=1), dict(cap=10, chunks=2)):
        v, i = check_local_topk(x, 90, **kw)
        assert torch.equal(i, base_i.sort(-1).values) and torch.equal(v, torch.gather(x, -1, i)), kw


def test_local_topk_row_passes_without_prefetch(monkeypatch):
    """The window and split passes load the next tile early or not (``PassConfig.prefetch``): the same output."""
    gen = torch.Generator().manual_seed(15)
    x = torch.cat([tied_scores(2, 400, gen), 1.0 + 0.18 * torch.rand(1, 400, generator=gen)])  # one bin: 400
    want_v, want_i = check_local_topk(x, 70, chunks=3)
    for name in ("WINDOW_PASS", "SPLIT_PASS"):
        monkeypatch.setattr(ltk, name, ltk.PassConfig(ltk.BLOCK, ltk.NUM_WARPS, prefetch=False))
    v, i = check_local_topk(x, 70, chunks=3)
    assert torch.equal(i, want_i) and torch.equal(v, want_v)


def test_local_topk_five_pass_scheme_same_set():
    """The previous kernels (kept for the benchmark) still give the sort's set, in column order."""
    gen = torch.Generator().manual_seed(14)
    x = tied_scores(3, 300, gen)
    values, idx = ltk.local_topk(x.to(DEV), 40, chunks=2, scheme="five_pass")
    ref_values, ref_idx = local_topk_padded(x, 40)
    assert torch.equal(idx.cpu(), ref_idx.sort(-1).values)
    new_values, new_idx = ltk.local_topk(x.to(DEV), 40, chunks=2)
    assert torch.equal(new_idx.sort(-1).values, idx)


def test_local_topk_rejects_bad_arguments():
    x = torch.zeros(2, 8, device=DEV)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        ltk.local_topk(x, 0)
    with pytest.raises(ValueError, match="float64"):
        ltk.local_topk(x.double(), 2)
    with pytest.raises(ValueError, match=r"\[T, L\]"):
        ltk.local_topk(x[0], 2)
    with pytest.raises(ValueError, match="cap must be >= 1, got 0"):
        ltk.local_topk(x, 2, cap=0)
    with pytest.raises(ValueError, match="scheme must be one of"):
        ltk.local_topk(x, 2, scheme="sort")
    with pytest.raises(ValueError, match="block must be a power of two <= 32768, got 48"):
        ltk.local_topk(x, 2, block=48)


def test_scheme_chosen_by_shape():
    """dcp::local_topk runs the candidate scheme on many long rows, the five-pass scheme elsewhere."""
    assert ltk.choose_scheme(64, 40960) == "candidates" and ltk.choose_scheme(1024, 32768) == "candidates"
    assert ltk.choose_scheme(8, 131072) == "candidates" and ltk.choose_scheme(8, 40960) == "five_pass"
    assert ltk.choose_scheme(64, 10240) == "five_pass" and ltk.choose_scheme(1, 1 << 20) == "five_pass"


def test_plan_splits_rows_into_whole_tiles():
    assert ltk.plan(64, 131072, 4096) == (16384, 8)              # 32 tiles, ~9 programs per row wanted
    assert ltk.plan(64, 131072 + 123, 4096) == (16384, 9)        # 33 tiles: the last chunk has one
    assert ltk.plan(1, 131072, 4096) == (4096, 32)               # one row: one tile per program
    assert ltk.plan(64, 100, 4096) == (4096, 1)
    assert ltk.plan(2, 0, 64) == (64, 1)                         # L = 0 still launches one (padding) chunk


# ------------------------------------------------------------------------- candidate_keys, topk_select

def local_candidates(T, L_per_rank, k, world, interleave, gen, levels=3, scores_of=None):
    """Per rank, what distributed_topk makes before the exchange: the local top-k of its tied scores (k columns
    of the row padded with k -inf ones; padding position PAD_POSITION): [(scores [T, k], positions [T, k])]."""
    layout = DCPLayout(world, interleave)
    out = []
    for r in range(world):
        x = tied_scores(T, L_per_rank, gen, levels=levels) if scores_of is None else scores_of(T, L_per_rank, gen)
        pos = layout.global_position(torch.arange(L_per_rank), r)
        pos = torch.nn.functional.pad(pos, (0, k), value=PAD_POSITION)
        v, i = local_topk_padded(x, k)
        out.append((v, pos[i]))
    return out


def block_tables(num_seqs, pages, gen):
    return torch.stack([torch.randperm(4 * pages, generator=gen)[:pages] for _ in range(num_seqs)]).int()


def check_candidate_keys(scores, positions, **kw):
    keys = ck.candidate_keys(scores.to(DEV), positions.to(DEV), **kw).cpu()
    assert keys.dtype == torch.int64 and keys.shape == scores.shape
    assert not (keys == INT_POISON).any(), "unwritten output"
    assert torch.equal(keys, reference.candidate_keys(scores, positions))
    return keys


def check_topk_select(per_rank, seq, bt, k, rank, world, interleave, page_size, **kw):
    """The kernel's slots and counts are the reference's exactly (best first, -1 after), and the oracle's."""
    keys = torch.stack([check_candidate_keys(v, p) for v, p in per_rank])  # [world, T, k]
    args = (k, rank, world, interleave, page_size)
    slots, counts = tks.topk_select(keys.to(DEV), seq.to(DEV), bt.to(DEV), *args, **kw)
    slots, counts = slots.cpu(), counts.cpu()
    T = keys.shape[1]
    assert slots.shape == (T, k) and slots.dtype == torch.int32
    assert counts.shape == (T,) and counts.dtype == torch.int32
    assert not (slots == INT_POISON).any() and not (counts == INT_POISON).any(), "unwritten output"
    ref_slots, ref_counts = reference.topk_select(keys, seq, bt, *args)
    assert torch.equal(counts, ref_counts) and torch.equal(slots, ref_slots)
    raw_scores = torch.cat([v for v, _ in per_rank], -1)
    raw_pos = torch.cat([p for _, p in per_rank], -1)
    expected = oracle.topk_select(raw_scores, raw_pos, seq, bt, *args)
    for t in range(T):
        c = int(counts[t])
        assert slots[t, :c].tolist() == expected[t], f"query {t}: not the oracle's slots, best first"
    return slots, counts


def test_candidate_keys_ties_zeros_and_wide_scores():
    gen = torch.Generator().manual_seed(5)
    T, k = 6, 37                                          # k not a power of two: padded lanes
    pos = torch.stack([torch.randperm(500, generator=gen)[:k] for _ in range(T)])
    check_candidate_keys(tied_scores(T, k, gen, levels=2), pos)
    check_candidate_keys(wide_scores(T, k, gen), pos)
    check_candidate_keys(torch.full((T, k), NEG_INF), pos)  # every key dead
    check_candidate_keys(tied_scores(T, 1, gen), pos[:, :1])  # k = 1


@pytest.mark.parametrize("world,rank,interleave,page_size", [
    (1, 0, 1, 4), (2, 1, 1, 3), (3, 2, 2, 5), (4, 0, 4, 4),
])
@pytest.mark.parametrize("block", [None, 2, 128])  # several shares a row (the smallest: 1 key each), or one
def test_topk_select_from_distributed_candidates(world, rank, interleave, page_size, block):
    gen = torch.Generator().manual_seed(100 * world + rank)
    T, L, k = 5, 90, 24
    per_rank = local_candidates(T, L, k, world, interleave, gen)
    for v, _ in per_rank:
        v[0] = NEG_INF                                    # a query with no candidate
    seq = torch.tensor([0, 1, 1, 0, 1])
    bt = block_tables(2, 200 // page_size + 2, gen)
    check_topk_select(per_rank, seq, bt, k, rank, world, interleave, page_size, block=block)


@pytest.mark.parametrize("world,rank,interleave,page_size,L,k", [
    (2, 0, 1, 4, 150, 40),     # ties decided by position (one score level)
    (3, 1, 3, 2, 20, 33),      # L < k: every live key of every rank is selected
    (4, 3, 1, 1, 129, 1),      # k = 1
    (8, 5, 2, 4, 40, 12),      # 8 ranks
])
def test_topk_select_ties_by_position(world, rank, interleave, page_size, L, k):
    gen = torch.Generator().manual_seed(L + k + world)
    T = 4
    per_rank = local_candidates(T, L, k, world, interleave, gen, levels=1)
    seq = torch.tensor([1, 0, 2, 1])
    bt = block_tables(3, world * L // page_size + 2, gen)
    check_topk_select(per_rank, seq, bt, k, rank, world, interleave, page_size)


def test_topk_select_wide_scores_and_all_equal():
    gen = torch.Generator().manual_seed(17)
    world, interleave, k, L = 2, 2, 37, 60

    def scores_of(T, L, gen):
        s = wide_scores(T, L, gen)
        s[1] = 0.5                                        # one value: only positions decide
        s[2] = -0.0
        s[2, ::2] = 0.0                                   # +0.0 / -0.0 tie
        return s
    per_rank = local_candidates(3, L, k, world, interleave, gen, scores_of=scores_of)
    for rank in range(world):
        check_topk_select(per_rank, torch.zeros(3, dtype=torch.long), block_tables(1, 80, gen), k, rank, world,
                          interleave, 4)


def test_topk_select_rejects_bad_arguments():
    keys = torch.zeros(2, 2, 8, dtype=torch.long, device=DEV)
    seq = torch.zeros(2, dtype=torch.long, device=DEV)
    bt = torch.zeros(1, 4, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="rank 2 must be in"):
        tks.topk_select(keys, seq, bt, 8, 2, 2, 1, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        tks.topk_select(keys, seq, bt, 0, 0, 2, 1, 4)
    with pytest.raises(ValueError, match=r"expected \[world, T, k\] = \[4, T, 8\]"):
        tks.topk_select(keys, seq, bt, 8, 0, 4, 1, 4)
    with pytest.raises(ValueError, match="must be \\[world, T, k\\] int64"):
        tks.topk_select(keys.float(), seq, bt, 8, 0, 2, 1, 4)
    with pytest.raises(ValueError, match="power of two >= 2, got 6"):
        tks.topk_select(keys, seq, bt, 8, 0, 2, 1, 4, block=6)


# ------------------------------------------------------------------------ GPU: real decode shapes

def check_gpu_local_topk(x, k, **kw):
    """On CUDA: the sort's set, the scores at the columns, the documented order, deterministic; and the same
    set as the five-pass scheme."""
    L = x.shape[1]
    values, idx = ltk.local_topk(x, k, **kw)
    ref_values, ref_idx = local_topk_padded(x, k)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert torch.equal(values, torch.gather(x, -1, idx.clamp(max=L - 1)).masked_fill(idx >= L, NEG_INF))
    assert torch.equal(idx.cpu(), expected_order(x.cpu(), idx.cpu(), k, kw.get("cap"), kw.get("block")))
    again_values, again_idx = ltk.local_topk(x, k, **kw)
    assert torch.equal(again_idx, idx) and torch.equal(again_values, values)
    old_values, old_idx = ltk.local_topk(x, k, scheme="five_pass")
    assert torch.equal(old_idx, idx.sort(-1).values)
    return values, idx


@gpu
@pytest.mark.parametrize("T", [1, 8, 64])
@pytest.mark.parametrize("L", [8192, 10240, 32768 + 123, 131072, 163840])
def test_local_topk_gpu_decode_shapes(T, L):
    """k = 2048 at decode shapes: the same set as the stable sort (on the GPU), ties from relu zeros and
    quantized scores, a -inf tail (keys beyond the sequence), a row with fewer finite scores than k."""
    k = 2048
    gen = torch.Generator(device="cuda").manual_seed(T + L)
    x = torch.randn(T, L, device="cuda", generator=gen)
    x = torch.where(torch.rand(T, L, device="cuda", generator=gen) < 0.3, 0.0, x)
    x = torch.round(x * 64) / 64                        # ~600 levels: many exact ties at the threshold
    x[:, L - L // 5:] = NEG_INF
    x[0, : L // 2] = NEG_INF
    if T > 1:
        x[1, 1000:] = NEG_INF                           # 1000 finite scores < k: the -inf bin decides
    check_gpu_local_topk(x, k)


@gpu
@pytest.mark.parametrize("T,L", [(8, 10240), (64, 163840)])
def test_local_topk_gpu_indexer_like_and_overflow(T, L):
    """Indexer-like scores (sum over 64 heads of w_h·relu(q_h·k), weights of both signs), random normal, and a
    narrow range (every score in one coarse bin: the row fallback), also with a small cap."""
    k, H, D = 2048, 64, 32
    gen = torch.Generator(device="cuda").manual_seed(T * L)
    q = torch.randn(T, H, D, device="cuda", generator=gen)
    keys = torch.randn(L, D, device="cuda", generator=gen)
    w = torch.randn(T, H, device="cuda", generator=gen)
    indexer = torch.einsum("th,thl->tl", w, torch.relu(torch.einsum("thd,ld->thl", q, keys)))
    indexer[:, L - L // 5:] = NEG_INF
    check_gpu_local_topk(indexer, k)
    check_gpu_local_topk(torch.randn(T, L, device="cuda", generator=gen), k)
    narrow = 1.0 + 0.01 * torch.rand(T, L, device="cuda", generator=gen)
    check_gpu_local_topk(narrow, k)
    check_gpu_local_topk(indexer, k, cap=512)          # the overflow path on every row


@gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_local_topk_gpu_compiled_equals_eager(mode):
    """Through torch.compile (Inductor traces the op's launches and owns its buffers; "reduce-overhead" also
    replays a CUDA graph) the candidate scheme gives the eager output at a decode shape (64 x 40960, with the
    gated fallback launched). Kernels that mutated views of one histogram buffer once selected garbage there
    (Inductor copies a mutated view), while eager was exact."""
    gen = torch.Generator(device="cuda").manual_seed(41)
    x = torch.randn(64, 40960, device="cuda", generator=gen)
    x[:, 32768:] = NEG_INF
    x[1, 1000:] = NEG_INF                               # the -inf bin decides
    x[2] = 1.0 + 0.01 * torch.rand(40960, device="cuda", generator=gen)  # overflows: the gated fallback
    assert ltk.choose_scheme(*x.shape) == "candidates"
    want_v, want_i = torch.ops.dcp.local_topk(x, 2048)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s: torch.ops.dcp.local_topk(s, 2048), mode=mode, fullgraph=True)
    for _ in range(3):                                  # warm-up, record, replay
        v, i = compiled(x)
        assert torch.equal(i, want_i) and torch.equal(v, want_v)


@gpu
def test_local_topk_gpu_short_rows():
    """Prefill-like: a few keys per row (L < k), many rows."""
    x = tied_scores(300, 1000, torch.Generator().manual_seed(4)).cuda()
    check_gpu_local_topk(x, 2048)


@gpu
@pytest.mark.parametrize("world,interleave", [(1, 1), (4, 1), (8, 64)])
def test_topk_select_gpu_decode_shapes(world, interleave):
    """k = 2048, every simulated rank's local top-k of 8192 keys (the kernels' own local top-k) as sorted keys;
    every rank's selection is exactly the reference's, and the ranks' counts add up to the global top-k."""
    k, T, page_size = 2048, 64, 64
    gen = torch.Generator().manual_seed(world)
    layout = DCPLayout(world, interleave, page_size)
    L = 8192
    blocks = []
    for r in range(world):
        x = tied_scores(T, L, gen, levels=50).cuda()
        pos = layout.global_position(torch.arange(L, device="cuda"), r)
        pos = torch.nn.functional.pad(pos, (0, k), value=PAD_POSITION)
        v, i = ltk.local_topk(x, k)
        keys = ck.candidate_keys(v, pos[i])
        assert torch.equal(keys, reference.candidate_keys(v, pos[i]))
        blocks.append(keys)
    keys = torch.stack(blocks)
    seq = torch.arange(T, device="cuda") % 3
    bt = block_tables(3, L // page_size + 1, gen).cuda()
    total = torch.zeros(T, dtype=torch.int32)
    for rank in range(world):
        slots, counts = tks.topk_select(keys, seq, bt, k, rank, world, interleave, page_size)
        ref_slots, ref_counts = reference.topk_select(keys, seq, bt, k, rank, world, interleave, page_size)
        assert torch.equal(counts, ref_counts) and torch.equal(slots, ref_slots)
        total += counts.cpu()
    assert (total == reference.key_live(keys).sum((0, 2)).clamp(max=k).int().cpu()).all()


@gpu
def test_registered_topk_ops_on_cuda():
    """torch.ops.dcp.local_topk / topk_select on CUDA tensors run these kernels; float64 keeps the sort."""
    gen = torch.Generator().manual_seed(8)
    x = tied_scores(4, 5000, gen).cuda()
    v, i = torch.ops.dcp.local_topk(x, 300)
    _, want = ltk.local_topk(x, 300, scheme=ltk.choose_scheme(*x.shape))
    assert torch.equal(i, want), "the kernel's order, of the scheme chosen for the shape (the sort: score order)"
    assert torch.equal(i.sort(-1).values, local_topk_padded(x, 300)[1].sort(-1).values)
    v64, i64 = torch.ops.dcp.local_topk(x.double(), 300)
    assert torch.equal(i64, local_topk_padded(x.double(), 300)[1])
    per_rank = local_candidates(4, 600, 100, 2, 1, gen)
    keys = torch.stack([torch.ops.dcp.candidate_keys(v.cuda(), p.cuda()) for v, p in per_rank])
    assert torch.equal(keys.cpu(), torch.stack([reference.candidate_keys(v, p) for v, p in per_rank]))
    seq, bt = torch.tensor([0, 1, 0, 1]), block_tables(2, 600, gen)
    slots, counts = torch.ops.dcp.topk_select(keys, seq.cuda(), bt.cuda(), 100, 1, 2, 1, 4)
    ref_slots, ref_counts = reference.topk_select(keys.cpu(), seq, bt, 100, 1, 2, 1, 4)
    assert torch.equal(counts.cpu(), ref_counts) and torch.equal(slots.cpu(), ref_slots)
