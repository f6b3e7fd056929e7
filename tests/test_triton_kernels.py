"""Correctness of the Triton kernels of ops/triton against the float64 oracles of tests/op_oracles.py.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on CPU in fp32 with tiny
shapes; with CUDA the GPU tests run them compiled, in bf16 (and fp16/fp32), against the same oracles.
Every run: fresh random inputs (never zeros), outputs poisoned with NaN before the run (the wrappers'
allocation hook, ``common.empty``), count-0 queries must give out == 0 exactly and lse == -inf.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: Triton reads it then

triton = pytest.importorskip("triton")

import op_oracles as oracle  # noqa: E402

from dcp_compile.ops.triton import common  # noqa: E402
from dcp_compile.ops.triton import indexer_scores as idx  # noqa: E402
from dcp_compile.ops.triton import merge_partials as mp  # noqa: E402
from dcp_compile.ops.triton import paged_write as pw  # noqa: E402
from dcp_compile.ops.triton import sparse_mla_attn as smla  # noqa: E402

if not HAS_CUDA and not common.INTERPRET:  # the kernels were defined before TRITON_INTERPRET was set
    raise RuntimeError("dcp_compile.ops.triton was imported before TRITON_INTERPRET=1 was set: without CUDA, "
                       "set it before anything imports the Triton kernels")

DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the kernels' wrappers allocate starts as NaN (never zeros)."""
    def nan_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    monkeypatch.setattr(common, "empty", nan_empty)
    yield


def rel_err(out, ref):
    out = out.double().cpu()
    ref = ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------ inputs

def make_mla_inputs(T, H, Dk, K, S, counts, dtype, device, gen, garbage="mixed"):
    q = torch.randn(T, H, Dk, generator=gen).to(dtype=dtype, device=device)
    kv = torch.randn(S, Dk, generator=gen).to(dtype=dtype, device=device)
    counts = torch.tensor(counts, dtype=torch.int32)
    slots = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    for t in range(T):
        c = int(counts[t])
        # entries past the count must never be read: -1 for even t, in-range rows for odd t (a kernel that
        # reads them would then give a wrong result rather than only a fault)
        if garbage == "mixed" and t % 2 == 0:
            slots[t, c:] = -1
    return q, kv, slots.to(device), counts.to(device)


def check_mla(q, kv, slots, counts, scale, v_dim, tol, **kw):
    out, lse = smla.sparse_mla_attn(q, kv, slots, counts, scale, v_dim, **kw)
    T, H, _ = q.shape
    assert out.shape == (T, H, v_dim) and out.dtype == q.dtype
    assert lse.shape == (T, H) and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    assert not torch.isnan(lse).any(), "unwritten or NaN lse"
    ref_out, ref_lse = oracle.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    empty = counts.cpu() == 0
    assert (out.cpu()[empty] == 0).all(), "count 0 must give out exactly 0"
    assert torch.isneginf(lse.cpu()[empty]).all(), "count 0 must give lse = -inf"
    assert torch.isfinite(lse.cpu()[~empty]).all()
    if (~empty).any():
        e_out = rel_err(out.cpu()[~empty], ref_out[~empty])
        e_lse = rel_err(lse.cpu()[~empty], ref_lse[~empty])
        assert e_out < tol, f"out rel err {e_out:.3g}"
        assert e_lse < tol, f"lse rel err {e_lse:.3g}"
    return out, lse


# ------------------------------------------------------------------------- CPU (interpreter) tests

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where CUDA is absent")


@cpu_only
@pytest.mark.parametrize("H", [1, 3, 16])
@pytest.mark.parametrize("Dk,v_dim", [(48, 32), (80, 64)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_mla_interpreter(H, Dk, v_dim, num_splits):
    gen = torch.Generator().manual_seed(1000 * H + Dk + num_splits)
    K = 40                                   # not a multiple of the 16-row tile
    counts = [0, 1, 7, K, 16, 33]            # empty, one, < tile, = K, = tile, K-ish not a tile multiple
    q, kv, slots, counts = make_mla_inputs(len(counts), H, Dk, K, 97, counts, torch.float32, "cpu", gen)
    check_mla(q, kv, slots, counts, Dk ** -0.5, v_dim, 1e-4, num_splits=num_splits)


@cpu_only
def test_sparse_mla_interpreter_head_blocks():
    """H = 40 over 16-head tiles: three head blocks, the last partly masked; non-power-of-two v_dim."""
    gen = torch.Generator().manual_seed(7)
    counts = [5, 0, 32]
    q, kv, slots, counts = make_mla_inputs(3, 40, 64, 32, 50, counts, torch.float32, "cpu", gen)
    check_mla(q, kv, slots, counts, 0.3, 48, 1e-4, block_h=16, num_splits=2)


@cpu_only
def test_sparse_mla_interpreter_default_plan():
    """The default plan for H = 40 under the interpreter: 32-head tiles (the second one 8/32 used), one split."""
    smla_plan = smla.plan(3, 40, 32, torch.device("cpu"))
    assert smla_plan == (32, 1), smla_plan
    gen = torch.Generator().manual_seed(8)
    counts = [32, 0, 9]
    q, kv, slots, counts = make_mla_inputs(3, 40, 80, 32, 50, counts, torch.float32, "cpu", gen)
    check_mla(q, kv, slots, counts, 0.2, 64, 1e-4)


def test_sparse_mla_empty_pool():
    """A rank that owns no token yet: kv [0, Dk], every count 0 -> out exactly 0, lse -inf, no launch that
    could read the pool (interpreter on CPU, compiled on CUDA)."""
    T, H, Dk, v_dim, K = 3, 5, 48, 32, 8
    q = torch.randn(T, H, Dk, device=DEV)
    kv = torch.empty(0, Dk, device=DEV)
    slots = torch.full((T, K), -1, dtype=torch.int32, device=DEV)
    counts = torch.zeros(T, dtype=torch.int32, device=DEV)
    for num_splits in (None, 1, 3):
        out, lse = smla.sparse_mla_attn(q, kv, slots, counts, 0.3, v_dim, num_splits=num_splits)
        assert out.shape == (T, H, v_dim) and (out == 0).all()
        assert lse.shape == (T, H) and torch.isneginf(lse).all()


def test_indexer_empty_pool():
    gen = torch.Generator().manual_seed(4)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(2, 3, 4, 32, 9, 20, torch.float32, DEV, gen)
    out = idx.indexer_scores(q, w, k_pool[:0], torch.full_like(key_slots, -1), allowed, 0.2)
    assert out.shape == (2, 3, 9) and torch.isneginf(out).all()


def check_merge(o, lse, tol):
    out, m = mp.merge_partials(o, lse)
    ref, ref_lse = oracle.lse_merge(o, lse)
    assert out.dtype == o.dtype and m.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(m).any()
    empty = torch.isneginf(ref_lse)
    assert (out.cpu()[empty] == 0).all() and torch.isneginf(m.cpu()[empty]).all()
    assert rel_err(out.cpu()[~empty], ref[~empty]) < tol
    assert rel_err(m.cpu()[~empty], ref_lse[~empty]) < tol


@cpu_only
def test_merge_partials_interpreter():
    gen = torch.Generator().manual_seed(3)
    P, T, H, V = 3, 4, 5, 24
    o = torch.randn(P, T, H, V, generator=gen)
    lse = torch.randn(P, T, H, generator=gen) * 3
    lse[1, 0] = float("-inf"); o[1, 0] = float("nan")   # empty part: its rows must not leak
    lse[:, 2, 1] = float("-inf"); o[:, 2, 1] = float("inf")  # all parts empty for (t=2, h=1)
    check_merge(o, lse, 1e-5)


def make_indexer_inputs(B, S, Hi, Di, L, P, dtype, device, gen):
    q = torch.randn(B, S, Hi, Di, generator=gen).to(dtype=dtype, device=device)
    w = torch.randn(B, S, Hi, generator=gen).to(device)                       # negative weights too
    k_pool = torch.randn(P, Di, generator=gen).to(dtype=dtype, device=device)
    key_slots = torch.stack([torch.randperm(P, generator=gen)[:L] for _ in range(B)]).to(torch.int32)
    key_slots[:, L - 3:] = -1                                                  # tail without keys
    key_slots[0, 2] = -1
    pos = torch.arange(L)
    qpos = (L - S) + torch.arange(S)                                           # causal
    allowed = (pos[None, :] <= qpos[:, None])[None].expand(B, S, L).clone()
    allowed &= torch.rand(B, S, L, generator=gen) > 0.1
    allowed[0, 0] = False                                                      # a query with no keys
    return q, w, k_pool, key_slots.to(device), allowed.to(device)


def check_indexer(q, w, k_pool, key_slots, allowed, scale, tol, **kw):
    out = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale, **kw)
    ref = oracle.indexer_scores(q, w, k_pool, key_slots, allowed, scale)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    out = out.cpu()
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), "mask differs"
    fin = torch.isfinite(ref)
    assert torch.isfinite(out[fin]).all()
    e = rel_err(out[fin], ref[fin])
    assert e < tol, f"rel err {e:.3g}"


@cpu_only
@pytest.mark.parametrize("Hi", [1, 3, 16])
@pytest.mark.parametrize("S", [1, 5])
def test_indexer_interpreter(Hi, S):
    gen = torch.Generator().manual_seed(10 * Hi + S)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(2, S, Hi, 32, 37, 60, torch.float32, "cpu", gen)
    check_indexer(q, w, k_pool, key_slots, allowed, 32 ** -0.5, 1e-5)



# The decode loop kernel (kernels/indexer_scores_decode.py): (B, L, Hi, tiles). Under the interpreter the key
# tile is 16, so L = 37 is 3 tiles (the last one partial); tiles 0 takes the interpreter's 2 a program (a
# short last run), 1 a program each, 5 more than a sequence has (one run, cut short).
LOOP_CASES = [(2, 37, 16, 0), (2, 37, 3, 1), (1, 37, 16, 5), (1, 70, 64, 3), (3, 16, 1, 0)]


@cpu_only
@pytest.mark.parametrize("B,L,Hi,tiles", LOOP_CASES)
@pytest.mark.parametrize("scale", [32 ** -0.5, -0.3])
@pytest.mark.parametrize("prefetch", [False, True])
def test_indexer_decode_loop_interpreter(B, L, Hi, tiles, scale, prefetch):
    """Masks, -1 slots (a tail and one inside), a sequence with no allowed key, negative weights and scale;
    with ``prefetch`` the next tile's loads issued by the kernel itself (the last ones of a run masked off) and
    the dot transposed (keys × heads)."""
    gen = torch.Generator().manual_seed(100 * B + L + Hi + tiles)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(B, 1, Hi, 32, L, 90, torch.float32, "cpu", gen)
    cfg = idx.DecodeConfig(128, 4, 3, 2, tiles, prefetch=prefetch)
    check_indexer(q, w, k_pool, key_slots, allowed, scale, 1e-5, config=cfg)


@cpu_only
def test_indexer_decode_loop_interpreter_slot_without_allowed_key():
    """A key that exists but is not allowed is -inf, and so is an allowed key without a slot."""
    gen = torch.Generator().manual_seed(7)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(2, 1, 8, 32, 40, 90, torch.float32, "cpu", gen)
    allowed[:] = True
    allowed[1, 0, 5:21] = False                       # a whole 16-key tile and a bit of its neighbours
    key_slots[1, 30] = -1
    for cfg in (idx.DecodeConfig(128, 4, 3, 2, 1), idx.DecodeConfig(128, 4, 1, 2, 2, prefetch=True)):
        out = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.2, config=cfg)
        assert torch.isneginf(out[1, 0, 5:21]).all() and torch.isneginf(out[1, 0, 30])
        check_indexer(q, w, k_pool, key_slots, allowed, 0.2, 1e-5, config=cfg)


def make_decode_tail_inputs(live, L, Hi, gen, lead=None):
    """Decode inputs (S = 1, fp32, Di = 32) whose sequence b has keys (a slot, allowed) at 0 .. live[b] - 1
    and none past them (slot -1, not allowed), as the model's decode call has past each sequence's end;
    inside, ~10 % of the keys not allowed and one slot -1. ``lead``: keys 0 .. lead[b] - 1 have slots but are
    not allowed (left padding)."""
    B = len(live)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(B, 1, Hi, 32, L, B * L + 5, torch.float32, "cpu", gen)
    key_slots = torch.randperm(B * L + 5, generator=gen)[:B * L].view(B, L).to(torch.int32)
    allowed = torch.rand(B, 1, L, generator=gen) > 0.1
    for b, n in enumerate(live):
        key_slots[b, n:] = -1
        allowed[b, :, n:] = False
        if n > 2:
            key_slots[b, n // 2] = -1
        if lead is not None:
            allowed[b, :, :lead[b]] = False
    return q, w, k_pool, key_slots, allowed


# The live-range path (DecodeConfig.live_scan > 0) under the interpreter: 16-key tiles (32 where block_l says
# so: two of the scan's 16-key groups a tile), L = 70 is 5 tiles (3 at 32; the last partial). Live keys a
# sequence: every key, 80 % (a dead tail of a tile and a bit), none, the first tile alone, one key, mixed.
# tiles: 0 the interpreter's 2 a run, 1 (a run a tile: a run a live tile, the rest dead stores only), 9 (one
# run holding every live tile). live_scan 16 / 32: 5 / 3 scan steps, 128: one.
TAILS = {"all_live": [70, 70], "dead_20": [56, 56], "all_dead": [0, 0], "first_tile_only": [16, 3],
         "one_key": [1, 70], "mixed": [70, 0, 33]}


@cpu_only
@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize("tiles", [0, 1, 9])
@pytest.mark.parametrize("live_scan", [16, 32, 128])
@pytest.mark.parametrize("block_l", [16, 32])
def test_indexer_decode_live_range_interpreter(tail, tiles, live_scan, block_l):
    """The live-range path gives the float64 oracle's scores and -inf everywhere else (every element written
    over a NaN-poisoned output), the one-tile kernel's values bit for bit."""
    gen = torch.Generator().manual_seed(len(tail) * 1000 + 10 * tiles + live_scan + block_l)
    q, w, k_pool, key_slots, allowed = make_decode_tail_inputs(TAILS[tail], 70, 16, gen)
    cfg = idx.DecodeConfig(128, 4, 3, 2, tiles, live_scan)
    check_indexer(q, w, k_pool, key_slots, allowed, 32 ** -0.5, 1e-5, config=cfg, block_l=block_l)
    got = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 32 ** -0.5, config=cfg, block_l=block_l)
    ref = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 32 ** -0.5, config=(16, 4, 3), block_l=block_l)
    assert torch.equal(got, ref)
    for b, n in enumerate(TAILS[tail]):
        assert torch.isneginf(got[b, 0, n:]).all()


@cpu_only
@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize("tiles", [0, 1, 9])
def test_indexer_decode_live_range_prefetch_interpreter(tail, tiles):
    """The live-range path with the kernel's own prefetch: the oracle's scores, -inf past each sequence."""
    gen = torch.Generator().manual_seed(len(tail) * 1000 + 10 * tiles + 7)
    q, w, k_pool, key_slots, allowed = make_decode_tail_inputs(TAILS[tail], 70, 16, gen)
    cfg = idx.DecodeConfig(128, 4, 1, 2, tiles, 16, prefetch=True)
    check_indexer(q, w, k_pool, key_slots, allowed, 32 ** -0.5, 1e-5, config=cfg)
    got = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 32 ** -0.5, config=cfg)
    for b, n in enumerate(TAILS[tail]):
        assert torch.isneginf(got[b, 0, n:]).all()


@cpu_only
@pytest.mark.parametrize("tiles", [0, 1, 9])
@pytest.mark.parametrize("block_l", [16, 32])
def test_indexer_decode_live_range_interpreter_leading_and_inner_dead(tiles, block_l):
    """Dead tiles before the live range (left padding: slots but not allowed) and a whole dead tile inside it
    (handled by the masks), an allowed key without a slot, a negative scale."""
    gen = torch.Generator().manual_seed(40 + tiles)
    q, w, k_pool, key_slots, allowed = make_decode_tail_inputs([70, 60, 45], 70, 3, gen, lead=[0, 35, 17])
    allowed[0, 0, 16:32] = False                       # tile 1 of sequence 0: dead inside the range
    allowed[2, 0, 44] = True
    key_slots[2, 44] = -1                              # allowed, no slot: -inf
    cfg = idx.DecodeConfig(128, 4, 3, 2, tiles, 32)
    check_indexer(q, w, k_pool, key_slots, allowed, -0.3, 1e-5, config=cfg, block_l=block_l)
    got = idx.indexer_scores(q, w, k_pool, key_slots, allowed, -0.3, config=cfg, block_l=block_l)
    assert torch.isneginf(got[1, 0, :35]).all() and torch.isneginf(got[0, 0, 16:32]).all()
    assert torch.isneginf(got[2, 0, 44])
    ref = idx.indexer_scores(q, w, k_pool, key_slots, allowed, -0.3, config=(16, 4, 3), block_l=block_l)
    assert torch.equal(got, ref)


def test_indexer_decode_live_scan_must_be_power_of_two():
    gen = torch.Generator().manual_seed(9)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(1, 1, 4, 32, 20, 40, torch.float32, DEV, gen)
    with pytest.raises(ValueError, match="live_scan = 24"):
        idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.2, config=idx.DecodeConfig(128, 4, 3, 2, 0, 24))


def test_decode_runs_one_wave_at_most_one_run_a_tile():
    """The live-range path's runs: one wave of programs_per_sm · sms programs unless the batch alone is larger
    (then one run a sequence), never more runs than tiles; 33 runs at the recorded call (8 × 80 tiles)."""
    for sms, pps in ((1, 1), (132, 2), (132, 4)):
        for B in (1, 2, 8, 16, 64, 300):
            for n_lt in (1, 5, 80, 320):
                runs = idx.decode_runs(B, n_lt, sms, pps)
                assert 1 <= runs <= n_lt and B * runs <= max(B, pps * sms), (sms, pps, B, n_lt, runs)
                assert runs == min(n_lt, max(1, pps * sms // B))
    assert idx.decode_runs(8, 80, 132, 2) == 33 and idx.decode_runs(64, 80, 132, 2) == 4


def test_indexer_decode_loop_rejects_prefill():
    gen = torch.Generator().manual_seed(8)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(1, 2, 4, 32, 20, 40, torch.float32, DEV, gen)
    with pytest.raises(ValueError, match="S = 2"):
        idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.2, config=idx.DecodeConfig(128, 4, 3, 2))


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("programs_per_sm", [1, 2, 3])
def test_decode_tiles_one_wave_covering_every_tile(sms, programs_per_sm):
    """The loop kernel's runs cover each sequence's tiles, and the grid stays within programs_per_sm · sms
    programs unless the batch alone is larger (then one run a sequence)."""
    target = programs_per_sm * sms
    for B in (1, 2, 7, 8, 16, 64, 300):
        for n_lt in (1, 5, 20, 80, 81, 320, 1280):
            tiles = idx.decode_tiles(B, n_lt, sms, programs_per_sm)
            runs = triton.cdiv(n_lt, tiles)
            assert tiles >= 1 and runs * tiles >= n_lt and (runs - 1) * tiles < n_lt, (B, n_lt, tiles)
            assert B * runs <= max(B, target), (B, n_lt, tiles, runs)
    assert idx.decode_tiles(8, 80, 132, 2) == 3 and idx.decode_tiles(64, 80, 132, 2) == 20


def test_choose_decode_config_table(monkeypatch):
    """Tensor-core decode takes the table's loop config (as shipped: the prefetch path, whatever the heads;
    a loop config without prefetch has its warps doubled above 64 heads); fp32 dots, a batch above
    DECODE_LOOP_MAX_TILES and a None entry the one-tile kernel's choose_config."""
    shipped = idx.choose_decode_config(8, 10240, 64, False)
    assert isinstance(shipped, idx.DecodeConfig) and shipped.prefetch
    assert idx.choose_decode_config(8, 10240, 128, False) == shipped
    assert idx.choose_decode_config(8, 10240, 64, True) == idx.choose_config(1, 64, True)
    loop = idx.DecodeConfig(64, 4, 2, 4)
    monkeypatch.setitem(idx.DECODE_TABLE, "tensor_cores", loop)
    assert idx.choose_decode_config(8, 10240, 64, False) == loop
    assert idx.choose_decode_config(8, 10240, 128, False).num_warps >= 8
    assert idx.choose_decode_config(8, 10240, 64, True) == idx.choose_config(1, 64, True)
    monkeypatch.setattr(idx, "DECODE_LOOP_MAX_TILES", 8 * 80)
    assert idx.choose_decode_config(8, 80 * loop.block_l, 64, False) == loop
    assert idx.choose_decode_config(8, 80 * loop.block_l + 1, 64, False) == idx.choose_config(1, 64, False)
    monkeypatch.setitem(idx.DECODE_TABLE, "tensor_cores", None)
    assert idx.choose_decode_config(1, 100, 64, False) == idx.choose_config(1, 64, False)


# ----------------------------------------------------------------------------------------- GPU tests

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@gpu
@pytest.mark.parametrize("H", [1, 3, 16, 20, 64, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_sparse_mla_gpu_bf16(H, num_splits):
    gen = torch.Generator().manual_seed(H * 7 + (num_splits or 0))
    K = 2048
    counts = [0, 1, 15, 64, 100, K, K - 37, 1000]
    q, kv, slots, counts = make_mla_inputs(len(counts), H, 576, K, 4096, counts, torch.bfloat16, "cuda", gen)
    check_mla(q, kv, slots, counts, 576 ** -0.5, 512, 1e-2, num_splits=num_splits)


@gpu
@pytest.mark.parametrize("H", [40, 128])
@pytest.mark.parametrize("variant", [dict(), dict(block_h=16, config=(32, 4, 2)), dict(block_h=32, config=(64, 8, 2))])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_sparse_mla_gpu_variants(H, variant, num_splits):
    """The overrides the benchmark compares: head tiles 16/32, configs beside the table's."""
    gen = torch.Generator().manual_seed(H + 13 * (num_splits or 0) + len(str(variant)))
    K = 512
    counts = [0, 1, 15, 64, 100, K, K - 37, 300]
    q, kv, slots, counts = make_mla_inputs(len(counts), H, 576, K, 4096, counts, torch.bfloat16, "cuda", gen)
    check_mla(q, kv, slots, counts, 576 ** -0.5, 512, 1e-2, num_splits=num_splits, **variant)


@gpu
def test_sparse_mla_gpu_fp32_many_heads():
    gen = torch.Generator().manual_seed(17)
    counts = [0, 3, 40, 128, 77]
    q, kv, slots, counts = make_mla_inputs(len(counts), 64, 576, 128, 1000, counts, torch.float32, "cuda", gen)
    check_mla(q, kv, slots, counts, 576 ** -0.5, 512, 1e-4)


@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 1e-4)])
def test_sparse_mla_gpu_dtypes(dtype, tol):
    gen = torch.Generator().manual_seed(11)
    counts = [0, 3, 40, 128, 77]
    q, kv, slots, counts = make_mla_inputs(len(counts), 16, 576, 128, 1000, counts, dtype, "cuda", gen)
    check_mla(q, kv, slots, counts, 576 ** -0.5, 512, tol)


@gpu
def test_sparse_mla_gpu_many_queries_small_dims():
    """Many queries (no split-K), small dims, random counts."""
    gen = torch.Generator().manual_seed(5)
    T, K = 300, 96
    counts = torch.randint(0, K + 1, (T,), generator=gen).tolist()
    q, kv, slots, counts = make_mla_inputs(T, 3, 80, K, 500, counts, torch.bfloat16, "cuda", gen)
    check_mla(q, kv, slots, counts, 0.1, 64, 1e-2)


@gpu
@pytest.mark.parametrize("S", [1, 7])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-5), (torch.float32, 1e-5)])
def test_indexer_gpu(S, dtype, tol):
    gen = torch.Generator().manual_seed(S)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(3, S, 64, 128, 1000, 5000, dtype, "cuda", gen)
    check_indexer(q, w, k_pool, key_slots, allowed, 128 ** -0.5, tol)



ONE_TILE_DECODE = (128, 4, 3)   # the one-tile kernel's decode config before the loop kernel


@gpu
@pytest.mark.parametrize("B,L", [(1, 1000), (3, 4099), (8, 10240)])
@pytest.mark.parametrize("loop", [idx.DecodeConfig(128, 4, 3, 2), idx.DecodeConfig(128, 4, 3, 2, 1),
                                  idx.DecodeConfig(128, 4, 2, 1, 7), idx.DecodeConfig(128, 4, 4, 3)])
def test_indexer_decode_loop_gpu_bit_identical(B, L, loop):
    """The decode loop kernel at the one-tile kernel's tile and warps gives its scores bit for bit, in the
    model's dtypes (bf16 q and keys, fp32 weights; 64 heads × 128), and both match the float64 oracle."""
    gen = torch.Generator().manual_seed(B * 31 + L + loop.num_stages + loop.tiles)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(B, 1, 64, 128, L, 2 * L, torch.bfloat16, "cuda", gen)
    scale = 128 ** -0.5
    ref = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=ONE_TILE_DECODE)
    got = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=loop)
    assert not torch.isnan(got).any(), "unwritten or NaN output"
    assert torch.equal(got, ref), f"max |diff| {(got - ref).nan_to_num().abs().max().item():.3g}"
    if L <= 4099:
        check_indexer(q, w, k_pool, key_slots, allowed, scale, 1e-5, config=loop)


PREFETCH_GPU_CONFIGS = [idx.DECODE_TABLE["tensor_cores"], idx.DecodeConfig(128, 4, 1, 2, prefetch=True),
                        idx.DecodeConfig(128, 4, 1, 2, 1, prefetch=True), idx.DecodeConfig(64, 4, 1, 4, 7, prefetch=True),
                        idx.DecodeConfig(128, 4, 1, 2, 0, 8192, prefetch=True),
                        idx.DecodeConfig(128, 8, 1, 2, prefetch=True)]


@gpu
@pytest.mark.parametrize("B,L,Hi", [(1, 1000, 64), (3, 4099, 64), (8, 10240, 64), (3, 4099, 128)])
@pytest.mark.parametrize("cfg", PREFETCH_GPU_CONFIGS)
def test_indexer_decode_prefetch_gpu(B, L, Hi, cfg):
    """The prefetch path (keys × heads dot, next tile's loads issued by hand) in the model's dtypes: the
    one-tile kernel's -inf pattern, its finite scores to fp32 rounding of another head-sum order, and the float64
    oracle's; a tail of each sequence without keys, as at decode."""
    gen = torch.Generator().manual_seed(B * 17 + L + Hi + cfg.block_l + cfg.tiles + cfg.live_scan)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(B, 1, Hi, 128, L, 2 * L, torch.bfloat16, "cuda", gen)
    key_slots[:, L * 4 // 5:] = -1
    allowed[:, :, L * 4 // 5:] = False
    scale = 128 ** -0.5
    ref = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=ONE_TILE_DECODE)
    got = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=cfg)
    assert not torch.isnan(got).any(), "unwritten or NaN output"
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-5, atol=1e-5)
    if L <= 4099:
        check_indexer(q, w, k_pool, key_slots, allowed, scale, 1e-5, config=cfg)


# The live-range path's configs beside the fixed runs' (4 warps: the one-tile kernel's dot and reduction order
# at the same tile). Live keys a sequence at 8 × 10240: the recorded call's 80 %, every key, none, the first
# tile alone, one key, a sequence with 300 leading keys masked (slots, not allowed), 80 % again.
LIVE_GPU_CONFIGS = [idx.DecodeConfig(128, 4, 3, 2, 0, 8192), idx.DecodeConfig(128, 4, 2, 2, 0, 16384),
                    idx.DecodeConfig(64, 4, 2, 4, 0, 4096), idx.DecodeConfig(128, 4, 3, 2, 1, 8192),
                    idx.DecodeConfig(128, 4, 3, 1, 40, 8192)]
LIVE_GPU_KEYS = {(8, 10240): [8192, 10240, 0, 128, 1, 5000, 8192, 8191], (3, 4099): [3000, 0, 4099]}


@gpu
@pytest.mark.parametrize("B,L", list(LIVE_GPU_KEYS))
@pytest.mark.parametrize("cfg", LIVE_GPU_CONFIGS)
def test_indexer_decode_live_range_gpu_bit_identical(B, L, cfg):
    """The live-range path gives the one-tile kernel's bits at its tile and warps, -inf past each sequence's
    keys, every element written (NaN-poisoned output); at the small size also the float64 oracle's scores."""
    gen = torch.Generator().manual_seed(B + L + cfg.block_l + cfg.live_scan + cfg.tiles)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(B, 1, 64, 128, L, 2 * L, torch.bfloat16, "cuda", gen)
    live = LIVE_GPU_KEYS[(B, L)]
    for b, n in enumerate(live):
        key_slots[b, n:] = -1
        allowed[b, :, n:] = False
    allowed[B - 3, :, :300] = False
    scale = 128 ** -0.5
    ref = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=(cfg.block_l, 4, 3))
    got = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=cfg)
    assert not torch.isnan(got).any(), "unwritten or NaN output"
    assert torch.equal(got, ref), f"max |diff| {(got - ref).nan_to_num().abs().max().item():.3g}"
    for b, n in enumerate(live):
        assert torch.isneginf(got[b, 0, n:]).all()
    if L <= 4099:
        check_indexer(q, w, k_pool, key_slots, allowed, scale, 1e-5, config=cfg)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_indexer_decode_table_gpu(dtype):
    """The table's decode path (whatever DECODE_TABLE picks) is the chosen config's kernel bit for bit, with
    the one-tile kernel's -inf pattern and its finite scores to fp32 rounding (the prefetch path sums the heads
    in another order), in both tensor-core dtypes."""
    gen = torch.Generator().manual_seed(77)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(8, 1, 64, 128, 2560, 5000, dtype, "cuda", gen)
    got = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1)
    chosen = idx.choose_decode_config(8, 2560, 64, False)
    assert torch.equal(got, idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1, config=chosen))
    ref = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1, config=ONE_TILE_DECODE)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_indexer_decode_loop_gpu_dtypes(dtype):
    """The loop kernel in the other dtypes (fp32: IEEE dots; fp16: tensor cores), against the oracle."""
    gen = torch.Generator().manual_seed(5)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(3, 1, 64, 128, 1000, 3000, dtype, "cuda", gen)
    cfg = idx.DecodeConfig(32, 4, 2, 2) if dtype == torch.float32 else idx.DecodeConfig(128, 4, 3, 2)
    check_indexer(q, w, k_pool, key_slots, allowed, 128 ** -0.5, 1e-5, config=cfg)


@gpu
def test_merge_partials_gpu():
    gen = torch.Generator().manual_seed(9)
    o = torch.randn(4, 6, 16, 512, generator=gen).cuda()
    lse = (torch.randn(4, 6, 16, generator=gen) * 2).cuda()
    lse[0, 1] = float("-inf")
    o[0, 1] = float("nan")
    lse[:, 3, 2] = float("-inf")
    check_merge(o, lse, 1e-5)


# ------------------------------------------------------------------------------------------ paged write

def test_paged_write_kernel():
    gen = torch.Generator().manual_seed(12)
    pool = torch.randn(17, 40, generator=gen).to(DEV)
    rows = torch.randn(9, 40, generator=gen, dtype=torch.float64).to(DEV)    # cast to the pool's dtype
    slots = torch.randperm(17, generator=gen)[:9]
    slots[::3] = -1                                                          # rows another rank owns
    expected = pool.cpu().clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[s] = rows[i].cpu().float()
    pw.paged_write(pool, rows, slots.to(DEV))
    assert torch.equal(pool.cpu(), expected)
    empty = torch.empty(0, 40, device=DEV)                                   # a rank that owns no token yet
    pw.paged_write(empty, rows, torch.full((9,), -1, device=DEV))


# ------------------------------------------------------------- the registered ops dispatch to the kernels

@gpu
def test_registered_ops_on_cuda_match_oracles():
    """torch.ops.dcp.* on CUDA tensors run these kernels (register_kernel("cuda")): same oracles."""
    gen = torch.Generator().manual_seed(21)
    counts = [0, 1, 17, 40]
    q, kv, slots, counts = make_mla_inputs(4, 3, 48, 40, 97, counts, torch.bfloat16, "cuda", gen)
    out, lse = torch.ops.dcp.sparse_mla_attn(q, kv, slots, counts, 0.2, 32)
    ref_out, ref_lse = oracle.sparse_mla_attn(q, kv, slots, counts, 0.2, 32)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))
    assert rel_err(out, ref_out) < 1e-2
    fin = torch.isfinite(ref_lse)
    assert rel_err(lse.cpu()[fin], ref_lse[fin]) < 1e-2
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(2, 3, 3, 32, 37, 60, torch.float32, "cuda", gen)
    got = torch.ops.dcp.indexer_scores(q, w, k_pool, key_slots, allowed, 0.25).cpu()
    ref = oracle.indexer_scores(q, w, k_pool, key_slots, allowed, 0.25)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(got[fin], ref[fin]) < 1e-5
