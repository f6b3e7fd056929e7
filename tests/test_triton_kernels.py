"""Correctness of the Triton kernels in ops/triton/ against float64 references written here.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on CPU in fp32 with tiny
shapes; with CUDA the GPU tests run them compiled, in bf16 (and fp16/fp32), against the same references.
Every run: fresh random inputs (never zeros), outputs poisoned with NaN before the run (the modules'
allocation hook), count-0 queries must give out == 0 exactly and lse == -inf.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is loaded below

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_PKG = "_dcp_triton_kernels_under_test"


def _load(modname: str):
    """Load ops/triton/<modname>.py as a submodule of a private package: a fresh copy made after
    TRITON_INTERPRET is set, independent of whether (and how) ``ops`` was imported elsewhere."""
    if _PKG not in sys.modules:
        pkg_dir = ROOT / "ops" / "triton"
        spec = importlib.util.spec_from_file_location(_PKG, pkg_dir / "__init__.py",
                                                      submodule_search_locations=[str(pkg_dir)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[_PKG] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"{_PKG}.{modname}")


smla = _load("sparse_mla_attn")
lsem = _load("lse_merge")
idx = _load("indexer_scores")

DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the kernels' wrappers allocate starts as NaN (never zeros)."""
    def nan_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    for mod in (smla, lsem, idx):
        monkeypatch.setattr(mod, "_empty", nan_empty)
    yield


def rel_err(out, ref):
    out = out.double().cpu()
    ref = ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------------- references

def ref_sparse_mla(q, kv, slots, counts, scale, v_dim):
    q64, kv64 = q.double().cpu(), kv.double().cpu()
    slots, counts = slots.cpu(), counts.cpu()
    T, H, _ = q.shape
    out = torch.zeros(T, H, v_dim, dtype=torch.float64)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float64)
    for t in range(T):
        c = int(counts[t])
        if c == 0:
            continue
        rows = kv64[slots[t, :c].long()]              # [c, Dk]
        s = scale * (q64[t] @ rows.T)                 # [H, c]
        lse[t] = torch.logsumexp(s, -1)
        out[t] = torch.softmax(s, -1) @ rows[:, :v_dim]
    return out, lse


def ref_indexer(q, w, k_pool, key_slots, allowed, scale):
    q64, w64, k64 = q.double().cpu(), w.double().cpu(), k_pool.double().cpu()
    key_slots, allowed = key_slots.cpu(), allowed.cpu()
    k = k64[key_slots.clamp(min=0).long()]                            # [B, L, Di]
    s = torch.relu(scale * torch.einsum("bshd,bld->bshl", q64, k))    # [B, S, Hi, L]
    out = (w64[..., None] * s).sum(2)
    ok = allowed & (key_slots >= 0)[:, None, :]
    return out.masked_fill(~ok, float("-inf"))


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
    ref_out, ref_lse = ref_sparse_mla(q, kv, slots, counts, scale, v_dim)
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
@pytest.mark.parametrize("H,block_h", [(1, None), (3, None), (16, None), (40, None), (40, 16)])
@pytest.mark.parametrize("Dk,v_dim", [(80, 64), (64, 48)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_mla_interpreter_vsplit(H, block_h, Dk, v_dim, num_splits):
    """Output columns split over two programs (halves of 32; v=48: the second half partly masked);
    H = 40 over 64-head tiles (one block, 24 rows masked) and over 16-head tiles (three blocks)."""
    gen = torch.Generator().manual_seed(31 * H + Dk + v_dim + num_splits + (block_h or 0))
    K = 40
    counts = [0, 1, 7, K, 16, 33]
    q, kv, slots, counts = make_mla_inputs(len(counts), H, Dk, K, 97, counts, torch.float32, "cpu", gen)
    check_mla(q, kv, slots, counts, Dk ** -0.5, v_dim, 1e-4, num_splits=num_splits, v_split=2, block_h=block_h)


@cpu_only
def test_sparse_mla_interpreter_default_plan():
    """The default plan for H = 40 under the interpreter: 32-head tiles (the second one 8/32 used), no
    value split."""
    smla_plan = smla.plan(3, 40, 32, 64, torch.device("cpu"))
    assert smla_plan == (32, 1, 1), smla_plan
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


@cpu_only
def test_lse_merge_interpreter():
    gen = torch.Generator().manual_seed(3)
    P, T, H, V = 3, 4, 5, 24
    o = torch.randn(P, T, H, V, generator=gen)
    lse = torch.randn(P, T, H, generator=gen) * 3
    lse[1, 0] = float("-inf"); o[1, 0] = float("nan")   # empty part: its rows must not leak
    lse[:, 2, 1] = float("-inf")                          # all parts empty for (t=2, h=1)
    out, m = lsem.lse_merge(o, lse)
    l64 = lse.double()
    ref_lse = torch.logsumexp(l64, 0)
    wgt = torch.exp(l64 - ref_lse).nan_to_num(0.0)
    ref = (wgt[..., None] * o.double().nan_to_num(0.0)).sum(0)
    assert not torch.isnan(out).any() and not torch.isnan(m).any()
    assert (out[2, 1] == 0).all() and torch.isneginf(m[2, 1])
    fin = torch.isfinite(ref_lse)
    assert rel_err(out[fin], ref[fin]) < 1e-5
    assert rel_err(m[fin], ref_lse[fin]) < 1e-5


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
    ref = ref_indexer(q, w, k_pool, key_slots, allowed, scale)
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
@pytest.mark.parametrize("variant", [dict(v_split=1), dict(v_split=2, block_h=32), dict(legacy=True, config=(32, 4, 2)),
                                     dict(block_h=16, v_split=2, config=(32, 4, 2)),
                                     dict(block_h=128, v_split=2, config=(16, 8, 2))])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_sparse_mla_gpu_variants(H, variant, num_splits):
    """Every path the benchmark compares: value split on/off, head tiles 16/32/64, the legacy autotuned one."""
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


@gpu
def test_lse_merge_gpu():
    gen = torch.Generator().manual_seed(9)
    o = torch.randn(4, 6, 16, 512, generator=gen).cuda()
    lse = (torch.randn(4, 6, 16, generator=gen) * 2).cuda()
    lse[0, 1] = float("-inf")
    o[0, 1] = float("nan")
    out, m = lsem.lse_merge(o, lse)
    l64 = lse.double().cpu()
    ref_lse = torch.logsumexp(l64, 0)
    ref = (torch.exp(l64 - ref_lse)[..., None] * o.double().cpu().nan_to_num(0.0)).sum(0)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-5 and rel_err(m, ref_lse) < 1e-5


# ----------------------------------------------------------------- agreement with the registered ops

def _dcp_op(name):
    try:
        import dcp_compile.ops  # noqa: F401  (registers torch.ops.dcp.*)
    except Exception:
        return None
    try:
        return getattr(torch.ops.dcp, name)
    except (AttributeError, RuntimeError):
        return None


def test_cpu_op_matches_kernel_sparse_mla():
    op = _dcp_op("sparse_mla_attn")
    if op is None:
        pytest.skip("torch.ops.dcp.sparse_mla_attn not available")
    gen = torch.Generator().manual_seed(21)
    dtype = torch.float32
    counts = [0, 1, 17, 40]
    q, kv, slots, counts = make_mla_inputs(4, 3, 48, 40, 97, counts, dtype, "cpu", gen)
    ref_out, ref_lse = op(q, kv, slots, counts, 0.2, 32)
    if HAS_CUDA:
        out, lse = smla.sparse_mla_attn(q.cuda(), kv.cuda(), slots.cuda(), counts.cuda(), 0.2, 32)
    else:
        out, lse = smla.sparse_mla_attn(q, kv, slots, counts, 0.2, 32)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))
    assert rel_err(out, ref_out) < 1e-4
    fin = torch.isfinite(ref_lse)
    assert rel_err(lse.cpu()[fin], ref_lse[fin]) < 1e-4


def test_cpu_op_matches_kernel_indexer():
    op = _dcp_op("indexer_scores")
    if op is None:
        pytest.skip("torch.ops.dcp.indexer_scores not available")
    gen = torch.Generator().manual_seed(22)
    q, w, k_pool, key_slots, allowed = make_indexer_inputs(2, 3, 3, 32, 37, 60, torch.float32, "cpu", gen)
    ref = op(q, w, k_pool, key_slots, allowed, 0.25)
    dev = "cuda" if HAS_CUDA else "cpu"
    out = idx.indexer_scores(*(x.to(dev) for x in (q, w, k_pool, key_slots, allowed)), 0.25).cpu()
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(out[fin], ref[fin]) < 1e-4
