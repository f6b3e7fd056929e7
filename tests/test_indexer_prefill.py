"""The indexer's prefill kernel (ops/triton/kernels/indexer_scores_prefill.py) against the float64 oracle.

What it adds to the decode kernel is what these tests aim at: a program loops over a run of key tiles (runs
of several tiles, one tile, all of L), narrowed by a pass over ``allowed`` to the tiles holding an allowed
pair (tiles before and after store -inf, a tile between them with none is still scored), a block of
queries a program (S not a multiple of it, padded heads), the scale folded into the head weights (its sign
too). Without CUDA under the Triton interpreter in fp32 (tests/conftest.py sets TRITON_INTERPRET), with
CUDA compiled in bf16/fp16/fp32 at the model's dims and the configs benchmarks/tune_indexer.py sweeps.
Outputs start as NaN (test_triton_kernels.poison_outputs).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import op_oracles as oracle  # noqa: E402
import test_triton_kernels as tk  # noqa: E402  (sets the interpreter up; shared inputs and checks)

from dcp_compile.ops.triton import indexer_scores as idx  # noqa: E402

poison_outputs = tk.poison_outputs  # autouse: every output the wrappers allocate starts as NaN
HAS_CUDA = tk.HAS_CUDA
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where CUDA is absent")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
PrefillConfig = idx.PrefillConfig


def check(q, w, k_pool, key_slots, allowed, scale, tol, config=None):
    """The prefill kernel (``config`` a PrefillConfig, else the default one S > 1 takes) vs the oracle."""
    kw = {} if config is None else {"config": config}
    tk.check_indexer(q, w, k_pool, key_slots, allowed, scale, tol, **kw)


def inputs(B, S, Hi, Di, L, P, dtype, device, seed):
    return tk.make_indexer_inputs(B, S, Hi, Di, L, P, dtype, device, torch.Generator().manual_seed(seed))


def unmasked_inputs(B, S, Hi, Di, L, seed, P=160):
    """fp32 q, w, a pool of P keys and L distinct live slots a sequence, for tests that build their own mask."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hi, Di, generator=gen)
    w = torch.randn(B, S, Hi, generator=gen)
    k_pool = torch.randn(P, Di, generator=gen)
    key_slots = torch.stack([torch.randperm(P, generator=gen)[:L] for _ in range(B)]).to(torch.int32)
    return q, w, k_pool, key_slots


# ------------------------------------------------------------------------- CPU (interpreter) tests

@cpu_only
@pytest.mark.parametrize("cfg", [PrefillConfig(2, 16, 0, 0, 2), PrefillConfig(4, 16, 0, 0, 1),
                                 PrefillConfig(1, 32, 0, 0, 0), PrefillConfig(2, 16, 0, 0, 0)])
@pytest.mark.parametrize("Hi,S", [(3, 5), (16, 7)])
def test_prefill_interpreter_configs(cfg, Hi, S):
    """Runs of 2 / 1 / all key tiles, 1-4 queries a program; S, L and Hi not multiples of their tiles,
    -1 slots (a tail and one inside), a query with no allowed key, causal + random holes."""
    q, w, k_pool, key_slots, allowed = inputs(2, S, Hi, 32, 50, 80, torch.float32, "cpu", 100 * Hi + S)
    check(q, w, k_pool, key_slots, allowed, 32 ** -0.5, 1e-5, cfg)


@cpu_only
def test_prefill_interpreter_default_and_negative_scale():
    """The interpreter's default prefill config (S > 1 selects it), and scale < 0: relu(scale·x) is then
    |scale|·relu(-x), which the kernel folds into the head weights with the opposite sign of x."""
    q, w, k_pool, key_slots, allowed = inputs(2, 6, 5, 32, 41, 60, torch.float32, "cpu", 3)
    check(q, w, k_pool, key_slots, allowed, 0.2, 1e-5)
    check(q, w, k_pool, key_slots, allowed, -0.2, 1e-5)
    out = idx.indexer_scores(q, w, k_pool, key_slots, allowed, -0.2)
    pos = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.2)
    fin = torch.isfinite(out)
    assert not torch.allclose(out[fin], pos[fin]), "the scale's sign changed nothing"


@cpu_only
def test_prefill_interpreter_skipped_tiles():
    """Allowed pairs only in some key tiles (16 keys each, runs of 2 tiles): tiles outside the allowed span
    of a query block store -inf without a dot, a fully-blocked tile between two allowed ones is scored and
    masked, a query block with nothing allowed stores -inf everywhere, and a run whose allowed span is one
    key at its end (the interpreter's pass over ``allowed`` steps 2 tiles at a time) is found."""
    B, S, Hi, Di, L = 2, 6, 3, 32, 100
    q, w, k_pool, key_slots = unmasked_inputs(B, S, Hi, Di, L, 5)
    allowed = torch.zeros(B, S, L, dtype=torch.bool)
    allowed[0, 0, 20:30] = True         # tile 1 only (first run: tiles 0-1)
    allowed[0, 1, 70:75] = True         # tile 4; tiles 2-3 in between blocked for this block
    allowed[0, 2, 95] = True            # one key in the last (partial) tile
    allowed[0, 3, 47] = True            # the last key of run 1 (tiles 2-3)
    # queries 4, 5 of sequence 0: nothing allowed (a whole query block of -inf)
    allowed[1] = torch.rand(S, L, generator=torch.Generator().manual_seed(6)) > 0.5
    allowed[1, :, 32:64] = False        # a blocked run in the middle of sequence 1
    key_slots[1, 90:] = -1
    cfg = PrefillConfig(2, 16, 0, 0, 2)
    check(q, w, k_pool, key_slots, allowed, 0.3, 1e-5, cfg)
    out = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.3, config=cfg)
    assert torch.isneginf(out[0, 4:]).all() and torch.isfinite(out[0, 0, 20:30]).all()


@cpu_only
def test_prefill_interpreter_full_tiles():
    """Tiles where every pair of a query block is allowed skip the per-tile mask (the kernel's middle loop):
    a causal chunk (tiles 0-4 full, tile 5 on the diagonal, tile 6 none), a full run broken by one blocked
    pair (the tiles after it are full again but scored by the masked loop), a -1 slot inside a full tile,
    the last query block padded (S = 5, 2 queries a block: the pad row counts as allowed), and runs of 4
    tiles that the interpreter's pass reads 2 tiles a step (a run's full tiles found across steps)."""
    B, S, Hi, Di, L = 2, 5, 3, 32, 100
    q, w, k_pool, key_slots = unmasked_inputs(B, S, Hi, Di, L, 21)
    allowed = torch.ones(B, S, L, dtype=torch.bool)
    allowed[0] = torch.arange(L)[None, :] <= (80 + torch.arange(S))[:, None]   # queries at 80..84
    allowed[1, 3, 40] = False           # query block 1 of sequence 1: tile 2 not full
    key_slots[1, 20] = -1               # inside a full tile
    key_slots[0, 96:] = -1
    cfg = PrefillConfig(2, 16, 0, 0, 4)
    check(q, w, k_pool, key_slots, allowed, 0.3, 1e-5, cfg)
    out = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.3, config=cfg)
    assert torch.isneginf(out[1, :, 20]).all() and torch.isneginf(out[1, 3, 40])
    assert torch.isfinite(out[1, 2, 40]) and torch.isfinite(out[0, :, :80]).all()


@cpu_only
def test_prefill_interpreter_one_query():
    """S = 1 through the prefill kernel (a 5-number config picks it whatever S): one query a program."""
    q, w, k_pool, key_slots, allowed = inputs(3, 1, 16, 32, 40, 70, torch.float32, "cpu", 12)
    check(q, w, k_pool, key_slots, allowed, 0.3, 1e-5, PrefillConfig(1, 16, 0, 0, 2))


@cpu_only
def test_prefill_interpreter_mixed_dtypes():
    """q fp32, keys bf16: both cast to fp32 in the kernel, IEEE dot (the CAST_F32 path)."""
    q, w, k_pool, key_slots, allowed = inputs(2, 5, 3, 32, 37, 60, torch.float32, "cpu", 9)
    check(q, w, k_pool.bfloat16(), key_slots, allowed, 32 ** -0.5, 1e-5, PrefillConfig(2, 16, 0, 0, 1))


@cpu_only
def test_prefill_kernel_equals_decode_kernel():
    """The two kernels (a 3-number config picks the one-tile decode kernel whatever S) give the same scores:
    same set of products, summed in another order."""
    q, w, k_pool, key_slots, allowed = inputs(2, 7, 3, 32, 45, 70, torch.float32, "cpu", 11)
    new = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.4, config=PrefillConfig(4, 16, 0, 0, 2))
    old = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.4, config=(16, 4, 2))
    assert torch.equal(torch.isneginf(new), torch.isneginf(old))
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_prefill_config_errors():
    q, w, k_pool, key_slots, allowed = inputs(1, 3, 3, 32, 20, 30, torch.float32, tk.DEV, 1)
    with pytest.raises(ValueError, match="block_s = 3"):
        idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1, config=PrefillConfig(3, 16, 4, 2, 1))
    with pytest.raises(ValueError, match="block_l = 8"):
        idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1, config=PrefillConfig(2, 8, 4, 2, 1))
    with pytest.raises(ValueError, match="tiles = -1"):
        idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1, config=PrefillConfig(2, 16, 4, 2, -1))
    with pytest.raises(ValueError, match=r"config \(16, 4\)"):
        idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1, config=(16, 4))
    with pytest.raises(ValueError, match="S = 3"):
        idx.indexer_scores(q, w, k_pool, key_slots, allowed, 0.1, tune=True)


def test_prefill_table_by_shape_class():
    """The table's tiles are powers of two within the tensor cores' widest N (256 columns) for the model's
    64 heads and for fewer, and the fp32 (FMA) rows are smaller than the tensor-core rows."""
    for block_hi in (16, 32, 64, 128):
        for fp32 in (False, True):
            cfg = idx.choose_prefill_config(block_hi, fp32)
            assert cfg.block_s >= 1 and cfg.block_s & (cfg.block_s - 1) == 0, cfg
            assert cfg.block_l >= 16 and cfg.block_l & (cfg.block_l - 1) == 0, cfg
            assert cfg.block_s * block_hi <= 256 and cfg.tiles >= 0 and cfg.num_stages >= 1, cfg
        bf, f32 = idx.choose_prefill_config(block_hi, False), idx.choose_prefill_config(block_hi, True)
        assert f32.block_s * f32.block_l <= bf.block_s * bf.block_l


# ----------------------------------------------------------------------------------------- GPU tests

# the table's config and neighbours from benchmarks/tune_indexer.py's sweep (runs of 1-3 tiles or all of L)
GPU_CONFIGS = [None, PrefillConfig(2, 128, 8, 2, 32), PrefillConfig(2, 128, 4, 2, 1), PrefillConfig(1, 128, 4, 3, 3),
               PrefillConfig(4, 128, 8, 2, 2), PrefillConfig(2, 64, 4, 4, 0)]


@gpu
@pytest.mark.parametrize("cfg", GPU_CONFIGS)
@pytest.mark.parametrize("S", [7, 130])
def test_prefill_gpu_bf16_model_dims(cfg, S):
    """64 heads × 128, bf16 tensor-core dots (exact products, fp32 sums): S not a multiple of any block,
    1000 keys (not a multiple of any tile), runs of 1-3 tiles or all."""
    q, w, k_pool, key_slots, allowed = inputs(3, S, 64, 128, 1000, 5000, torch.bfloat16, "cuda", S)
    check(q, w, k_pool, key_slots, allowed, 128 ** -0.5, 1e-5, cfg)


@gpu
@pytest.mark.parametrize("q_dtype,k_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_prefill_gpu_dtypes(q_dtype, k_dtype):
    """fp16 tensor-core dots; fp32 and mixed operands through IEEE fp32 dots (no tf32)."""
    q, w, k_pool, key_slots, allowed = inputs(2, 9, 64, 128, 700, 3000, torch.float32, "cuda", 4)
    check(q.to(q_dtype), w, k_pool.to(k_dtype), key_slots, allowed, 128 ** -0.5, 1e-5)


@gpu
def test_prefill_gpu_negative_scale_and_odd_heads():
    """scale < 0 and 20 heads (padded to 32 columns a query) on the tensor cores."""
    q, w, k_pool, key_slots, allowed = inputs(2, 11, 20, 128, 300, 900, torch.bfloat16, "cuda", 6)
    check(q, w, k_pool, key_slots, allowed, -0.1, 1e-5)


@gpu
def test_prefill_gpu_full_tiles():
    """The table's config on tiles where every pair of a query block is allowed (no mask read): a causal chunk
    at the end of 1000 keys, a blocked pair that breaks one block's full run, -1 slots inside full tiles."""
    B, S, L = 2, 9, 1000
    q, w, k_pool, key_slots, _ = inputs(B, S, 64, 128, L, 3000, torch.bfloat16, "cuda", 10)
    allowed = torch.ones(B, S, L, dtype=torch.bool, device="cuda")
    allowed[0] = torch.arange(L, device="cuda")[None, :] <= (L - S + torch.arange(S, device="cuda"))[:, None]
    allowed[1, 5, 300] = False
    key_slots[:, 100] = -1
    key_slots[1, 700:705] = -1
    check(q, w, k_pool, key_slots, allowed, 128 ** -0.5, 1e-5)
    out = idx.indexer_scores(q, w, k_pool, key_slots, allowed, 128 ** -0.5)
    assert torch.isneginf(out[:, :, 100]).all() and torch.isneginf(out[1, :, 700:705]).all()
    live = key_slots[0, :L - S] >= 0      # the inputs' own -1 slots (a tail, one inside) stay -inf
    assert torch.isfinite(out[0, :, :L - S][:, live]).all() and torch.isneginf(out[1, 5, 300])


@gpu
def test_prefill_gpu_causal_chunk_skips_tiles():
    """A first prefill chunk (queries at the first positions, causal): most key tiles of the early query
    blocks are outside their allowed span (stored -inf, no dot), the late ones score every tile."""
    B, S, L = 2, 256, 1024
    q, w, k_pool, key_slots, _ = inputs(B, S, 64, 128, L, 3000, torch.bfloat16, "cuda", 8)
    qpos = torch.arange(S, device="cuda") * (L // S)
    allowed = (torch.arange(L, device="cuda")[None, :] <= qpos[:, None])[None].expand(B, S, L).contiguous()
    check(q, w, k_pool, key_slots, allowed, 128 ** -0.5, 1e-5)
    ref = oracle.indexer_scores(q, w, k_pool, key_slots, allowed, 128 ** -0.5)
    assert torch.isneginf(ref).float().mean() > 0.4  # the case really skips


def test_bool_mask_is_a_view_in_eager_and_a_conversion_when_traced():
    """``common.uint8_mask``: in eager a bool mask reaches the kernels as a uint8 view of its bytes (no pass
    over the mask, ~5-10 % of the prefill indexer); traced (make_fx, fake tensors) it is a dtype conversion,
    the one Inductor can lower and fuse into the mask's producer."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from dcp_compile.ops.triton import common

    mask = torch.rand(3, 5, 7) > 0.5
    view = common.uint8_mask(mask)
    assert view.dtype == torch.uint8 and view.data_ptr() == mask.data_ptr()
    assert torch.equal(view, mask.to(torch.uint8))
    u8 = mask.to(torch.uint8)
    assert common.uint8_mask(u8) is u8
    traced = make_fx(common.uint8_mask)(mask)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.aten._to_copy.default], targets
    with FakeTensorMode():
        fake = torch.empty(3, 5, dtype=torch.bool)
        assert common.uint8_mask(fake).dtype == torch.uint8


# ------------------------------------------- the warp-specialised Hopper kernel (kernels/indexer_scores_prefill_ws.py)

from dcp_compile.ops.triton import indexer_scores_ws as ws  # noqa: E402

hopper = pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)),
                            reason="needs an H100/H200 (sm_90a: wgmma)")


def ws_case(case):
    """(q, w, k_pool, key_slots, allowed, scale) at the kernel's dims (64 heads × 128), bf16 unless named."""
    B, S, L = {"runs": (2, 37, 2500), "first_chunk": (2, 256, 1024), "long": (3, 130, 9000)}.get(case, (3, 9, 1000))
    dtype = torch.float16 if case == "fp16" else torch.bfloat16
    q, w, k_pool, key_slots, allowed = inputs(B, S, 64, 128, L, 3 * L, dtype, "cuda", hash(case) % 1000)
    if case in ("full", "runs", "long"):
        # a chunk at the end of its context: full tiles, then the diagonal; a blocked pair breaks one full run;
        # -1 slots inside full tiles
        qpos = (L - S) + torch.arange(S, device="cuda")
        allowed = (torch.arange(L, device="cuda")[None, :] <= qpos[:, None])[None].expand(B, S, L).contiguous()
        allowed[1, 5, 300] = False
        key_slots[:, 100] = -1
        key_slots[1, 700:705] = -1
    elif case == "first_chunk":
        qpos = torch.arange(S, device="cuda") * (L // S)
        allowed = (torch.arange(L, device="cuda")[None, :] <= qpos[:, None])[None].expand(B, S, L).contiguous()
    elif case == "no_pair":
        allowed[:, :, :] = False
        allowed[0, 3, 500] = True     # one program with one live tile, the others none
    return q, w, k_pool, key_slots, allowed, (-0.1 if case == "neg_scale" else 128 ** -0.5)


def tile_bounds_reference(allowed, block_s, block_l, tiles):
    """kernels/prefill_tile_bounds.py's four numbers a program, from their definitions, tile by tile."""
    B, S, L = allowed.shape
    n_sb, n_lt = -(-S // block_s), -(-L // block_l)
    n_lc = -(-n_lt // tiles)
    out = torch.empty(B, n_sb, n_lc, 4, dtype=torch.int32)
    for b in range(B):
        for sb in range(n_sb):
            for lc in range(n_lc):
                t_lo, t_hi = lc * tiles, min(lc * tiles + tiles, n_lt)
                blocks = [allowed[b, sb * block_s:(sb + 1) * block_s, t * block_l:(t + 1) * block_l]
                          for t in range(t_lo, t_hi)]
                live = [t for t, blk in zip(range(t_lo, t_hi), blocks) if blk.any()]
                full = [t for t, blk in zip(range(t_lo, t_hi), blocks) if blk.all() and blk.any()]
                first, last = (live[0], live[-1]) if live else (t_hi, t_lo - 1)
                full_lo = full[0] if full else t_hi
                full_hi = next((t for t in range(full_lo + 1, t_hi) if t not in full), t_hi)
                mid_lo = min(max(full_lo, first), last + 1)
                out[b, sb, lc] = torch.tensor([first, last, mid_lo, min(max(full_hi, mid_lo), last + 1)])
    return out


@pytest.mark.parametrize("tiles", [1, 3, 100])
@pytest.mark.parametrize("mask", ["causal_chunk", "first_chunk", "holes", "none"])
def test_prefill_tile_bounds(mask, tiles):
    """The pass that finds each warp-specialised program's tiles (kernels/prefill_tile_bounds.py; the
    interpreter on CPU, 2 tiles a step so a run spans several steps): first and last live tile and the run of
    fully allowed ones, against their definitions: a chunk at the end of its context with a blocked pair inside
    the full run, a first chunk (dead tiles), random holes, nothing allowed; S not a multiple of the query
    block, L not of the tile."""
    from dcp_compile.ops.triton.prefill_tile_bounds import tile_bounds

    B, S, L = 2, 11, 150
    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator().manual_seed(tiles)
    pos = torch.arange(L)
    qpos = {"first_chunk": torch.arange(S) * 13}.get(mask, (L - S) + torch.arange(S))
    allowed = (pos[None, :] <= qpos[:, None])[None].expand(B, S, L).clone()
    if mask == "causal_chunk":
        allowed[1, 5, 40] = False
    elif mask == "holes":
        allowed &= torch.rand(B, S, L, generator=gen) > 0.02
    elif mask == "none":
        allowed[:] = False
    got = tile_bounds(allowed.to(torch.uint8).to(device), 4, 16, tiles)
    assert torch.equal(got.cpu(), tile_bounds_reference(allowed, 4, 16, tiles))


@hopper
@pytest.mark.parametrize("case", ["random", "full", "runs", "first_chunk", "long", "no_pair", "neg_scale", "fp16"])
def test_prefill_ws_gpu_against_oracle(case):
    """The op's default prefill path at DeepSeek-V3.2's indexer dims on Hopper is the warp-specialised kernel;
    against the float64 oracle: random holes and a query with no key, causal chunks (full tiles, the diagonal,
    a blocked pair inside a full run, -1 slots), a first chunk (dead tiles), programs with no live tile,
    a negative scale, fp16, S not a multiple of 4 and L not of 64."""
    q, w, k_pool, key_slots, allowed, scale = ws_case(case)
    assert ws.serves(q, k_pool)
    check(q, w, k_pool, key_slots, allowed, scale, 1e-5)


@hopper
@pytest.mark.parametrize("tiles", [1, 3, 16, 10**6])
def test_prefill_ws_gpu_key_runs_equal_the_triton_kernel(tiles):
    """Any split of the keys into runs a program gives the Triton kernel's scores (same products, fp32 sums in
    another order: 1e-5)."""
    q, w, k_pool, key_slots, allowed, scale = ws_case("runs")
    want = idx.indexer_scores(q, w, k_pool, key_slots, allowed, scale,
                              config=idx.choose_prefill_config(64, fp32_dots=False))
    got = ws.run(q, w, k_pool, key_slots, allowed.to(torch.uint8), scale, tiles=tiles)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@hopper
def test_prefill_ws_gpu_compiled_and_fallbacks():
    """Under torch.compile the kernel is one opaque node with the eager result; a key pool whose rows are not
    16-byte aligned takes the Triton kernel; the trace choice ``prefill_indexer`` (``DCP_PREFILL_INDEXER``) =
    triton turns the kernel off."""
    q, w, k_pool, key_slots, allowed, scale = ws_case("full")
    eager = torch.ops.dcp.indexer_scores(q, w, k_pool, key_slots, allowed, scale)
    compiled = torch.compile(lambda *a: torch.ops.dcp.indexer_scores(*a, scale), fullgraph=True)
    torch.testing.assert_close(compiled(q, w, k_pool, key_slots, allowed), eager, rtol=0, atol=0)
    offset = k_pool.new_empty(k_pool.numel() + 8)[1:1 + k_pool.numel()].view_as(k_pool)   # 2 bytes off
    offset.copy_(k_pool)
    assert offset.data_ptr() % 16
    got = ws.run(q, w, offset, key_slots, allowed.to(torch.uint8), scale)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    from dcp_compile.ops import trace_choices

    trace_choices.set("prefill_indexer", "triton")
    try:
        assert not ws.serves(q, k_pool)
    finally:
        trace_choices.set("prefill_indexer", "auto")


BUILD_SM90 = """
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from dcp_compile.ops.triton.kernels.indexer_scores_prefill_ws import indexer_scores_prefill_ws_kernel as k

names = k.arg_names
types = ["*bf16", "*fp32", "*bf16", "*i32", "*u8", "*fp32", "*i32", "fp32"] + ["i32"] * (len(names) - 9) + ["constexpr"]
aligned = {n for n in names if n.startswith("stride") or n in ("Q", "W", "KP", "KS", "ALLOWED", "BOUNDS", "OUT")}
compiled = triton.compile(
    GluonASTSource(fn=k, signature=dict(zip(names, types)), constexprs={(names.index("NEG_SCALE"),): True},
                   attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned}),
    target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
ptx = compiled.asm["ptx"]
print(json.dumps(dict(shared=compiled.metadata.shared, version=triton.__version__,
                      maxnreg=sorted(set(re.findall(r"setmaxnreg[.][a-z.]*u32[^0-9]*([0-9]+)", ptx))),
                      wgmma="wgmma.mma_async" in ptx, cp_async="cp.async" in ptx, local=".local" in ptx)))
"""


def test_prefill_ws_builds_for_sm90():
    """Without a GPU: the warp-specialised kernel compiles for sm_90a with the installed Triton (the Gluon API
    moves between releases: 3.6 on the GPU image, 3.9 in CI) into its partitions with their register budgets
    (setmaxnreg 232 for the consumers, 40 for the producer), wgmma and cp.async, no local memory, within the
    SM's shared memory. In a subprocess without the Triton interpreter (which replaces the language)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", BUILD_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    assert built["shared"] <= 227 * 1024, built
    assert {"232", "40"} <= set(built["maxnreg"]), built
    assert built["wgmma"] and built["cp_async"] and not built["local"], built
