"""The decode indexer as a programmatic dependent launch (ops/triton/indexer_scores_pdl.py; the kernel's "PDL"
section in kernels/indexer_scores_decode.py).

What could go wrong, and the test that would see it:
- a read before the wait: the kernel scores a query, head weights or key row that the previous kernel had not
  written yet. ``test_pdl_waits_for_the_previous_kernel`` puts a kernel before it that lets dependents start
  at once, then spins and only then writes the query, the weights and a new key row (as the model's step
  writes the new token's index key just before the indexer), eagerly and replayed in a CUDA graph;
- different scores: the dependent launch must give the plain launch's scores bit for bit (the same body
  after the wait), on ragged shapes and -1 slots;
- the routing: with the choice on, decode calls on sm_90+ take the opaque op (also under torch.compile and
  CUDA graphs); turned off in the same process, the next compile traces the loop kernel again, not a graph from
  torch.compile's caches (ops/trace_choices.py puts the choice in their key).
GPU only (a dependent launch needs the device); without CUDA the kernel's sm_90a build with the wait before its
first load is checked instead (``test_pdl_builds_for_sm90``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import op_oracles as oracle  # noqa: E402
import test_triton_kernels as tk  # noqa: E402  (sets the interpreter up; shared inputs and checks)

from dcp_compile.ops import trace_choices  # noqa: E402
from dcp_compile.ops.triton import indexer_scores as idx  # noqa: E402
from dcp_compile.ops.triton import indexer_scores_pdl as pdl  # noqa: E402

poison_outputs = tk.poison_outputs  # autouse: every output the wrappers allocate starts as NaN


@pytest.fixture
def pdl_on():
    """The dependent launch on (it is off by default) for one test, then the process's choice back."""
    before = trace_choices.get("decode_indexer_pdl")
    trace_choices.set("decode_indexer_pdl", "on")
    yield
    trace_choices.set("decode_indexer_pdl", before)
gpu_sm90 = pytest.mark.skipif(not tk.HAS_CUDA or torch.cuda.get_device_capability()[0] < 9,
                              reason="needs a CUDA device of compute capability >= 9")
HI, DI, SCALE = 64, 128, 128 ** -0.5


def decode_inputs(B, L, P, dtype, seed, live=1.0):
    """The model's decode call: q [B, 1, 64, 128], keys in a pool of P rows, the last (1 - live) of each
    sequence's slots -1 and not allowed (a capacity bucket's tail), one more -1 slot inside."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, HI, DI, generator=gen).to(dtype)
    w = torch.randn(B, 1, HI, generator=gen) * HI ** -0.5
    k_pool = torch.randn(P, DI, generator=gen).to(dtype)
    key_slots = torch.stack([torch.randperm(P, generator=gen)[:L] for _ in range(B)]).to(torch.int32)
    n_live = int(L * live)
    key_slots[:, n_live:] = -1
    key_slots[0, min(5, L - 1)] = -1
    allowed = torch.zeros(B, 1, L, dtype=torch.bool)
    allowed[:, :, :n_live] = True
    return [t.cuda() for t in (q, w, k_pool, key_slots, allowed)]


def plain(q, w, k_pool, key_slots, allowed):
    """The decode table's loop kernel as a plain launch (the path before the dependent launch)."""
    cfg = idx.choose_decode_config(q.shape[0], key_slots.shape[1], HI, fp32_dots=False)
    return idx.indexer_scores(q, w, k_pool, key_slots, allowed, SCALE, config=cfg)


def assert_oracle(out, q, w, k_pool, key_slots, allowed):
    ref = oracle.indexer_scores(q, w, k_pool, key_slots, allowed, SCALE)
    out = out.cpu()
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), "mask differs"
    fin = torch.isfinite(ref)
    assert tk.rel_err(out[fin], ref[fin]) < 1e-5


@gpu_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,P,live", [(8, 10240, 1 << 17, 0.8), (3, 1000, 4096, 1.0), (1, 64, 64, 1.0),
                                        (16, 4097, 1 << 16, 0.9)])
def test_pdl_scores_equal_the_plain_launch(pdl_on, dtype, B, L, P, live):
    """The dependent launch gives the plain launch's scores bit for bit, called directly and as the op the model
    calls (which takes it)."""
    args = decode_inputs(B, L, P, dtype, seed=B * 7 + L, live=live)
    want = plain(*args)
    assert_oracle(want, *args)
    cfg = idx.choose_decode_config(B, L, HI, fp32_dots=False)
    got = idx.indexer_scores(*args, SCALE, config=cfg, pdl=True)
    assert torch.equal(got, want), f"{(got != want).sum().item()} scores differ"
    assert pdl.serves(args[0], args[2], L)
    assert torch.equal(torch.ops.dcp.indexer_scores(*args, SCALE), want)


@pytest.fixture(scope="module")
def late_writer():
    """A kernel that lets its dependents launch at once (``gdc_launch_dependents``), then spins and only then
    writes the query, the head weights and one key row: a dependent that reads before its wait reads the old
    values."""
    import triton
    import triton.language as tl

    @triton.jit
    def late_writer_kernel(Q_SRC, Q, n_q, W_SRC, W, n_w, NEW_KEY, KP, new_slot, spin,
                           D: tl.constexpr, BLOCK: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()
        acc = tl.program_id(0).to(tl.float32) + 1.0
        for _ in range(spin):  # a dependent chain the compiler keeps: its result guards the stores
            acc = acc * 1.0000001 + 1e-7
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Q + offs, tl.where(acc > 0, tl.load(Q_SRC + offs, mask=offs < n_q), 0.0), mask=offs < n_q)
        tl.store(W + offs, tl.where(acc > 0, tl.load(W_SRC + offs, mask=offs < n_w), 0.0), mask=offs < n_w)
        if tl.program_id(0) == 0:
            d = tl.arange(0, D)
            tl.store(KP + new_slot.to(tl.int64) * D + d, tl.where(acc > 0, tl.load(NEW_KEY + d), 0.0))

    def write(q_src, q, w_src, w, new_key, k_pool, new_slot, spin=40000):
        block = 1024
        late_writer_kernel[(triton.cdiv(q.numel(), block),)](
            q_src, q, q.numel(), w_src, w, w.numel(), new_key, k_pool, new_slot, spin, D=DI, BLOCK=block)

    return write


@gpu_sm90
def test_pdl_waits_for_the_previous_kernel(pdl_on, late_writer):
    """The indexer after a kernel that writes its query, weights and the new token's key row late: its scores
    are those of the written values (the oracle on them), eagerly and over CUDA-graph replays with new values
    each time."""
    B, L, P = 8, 4096, 1 << 15
    q, w, k_pool, key_slots, allowed = decode_inputs(B, L, P, torch.bfloat16, seed=1)
    new_slot = int(key_slots[2, 0])             # sequence 2's first key
    q_src, w_src, new_key = torch.empty_like(q), torch.empty_like(w), torch.empty(DI, dtype=q.dtype, device="cuda")

    def fresh(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        q_src.normal_(generator=gen)
        w_src.normal_(generator=gen)
        new_key.normal_(generator=gen)
        q.zero_(), w.zero_()                    # what a read before the wait would see

    def step():
        late_writer(q_src, q, w_src, w, new_key, k_pool, new_slot)
        return torch.ops.dcp.indexer_scores(q, w, k_pool, key_slots, allowed, SCALE)

    assert pdl.serves(q, k_pool, L)
    fresh(0)
    out = step()
    assert torch.equal(k_pool[new_slot], new_key)
    assert_oracle(out, q_src, w_src, k_pool, key_slots, allowed)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                  # warm (compiled kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for replay in range(3):
        fresh(100 + replay)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_pool[new_slot], new_key)
        assert_oracle(out, q_src, w_src, k_pool, key_slots, allowed)


@gpu_sm90
def test_pdl_compiled_graphed_and_off_switch(pdl_on):
    """Under torch.compile (fullgraph, and with CUDA graphs) the call is one extern node, the opaque op, with
    the eager scores; with the choice turned off the next compile traces the loop kernel (torch.compile's
    caches hold the graph traced with it on, under another key), with the same scores."""
    from torch._inductor.utils import run_and_get_code

    args = decode_inputs(8, 2048, 1 << 14, torch.bfloat16, seed=3)
    want = plain(*args)
    fn = lambda *a: torch.ops.dcp.indexer_scores(*a, SCALE)  # noqa: E731
    torch._dynamo.reset()
    got, codes = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    assert torch.equal(got, want)
    code = "\n".join(codes)
    assert "torch.ops.dcp.indexer_scores_decode_pdl" in code and "indexer_scores_decode_kernel" not in code
    graphed = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        assert torch.equal(graphed(*args).clone(), want)
    trace_choices.set("decode_indexer_pdl", "off")
    assert not pdl.serves(args[0], args[2], 2048)
    torch._dynamo.reset()
    got, codes = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    code = "\n".join(codes)
    assert "indexer_scores_decode_pdl" not in code and "indexer_scores_decode_kernel" in code
    assert torch.equal(got, want)
    torch._dynamo.reset()


def test_pdl_choice():
    """``decode_indexer_pdl``: off by default (unless the environment set it), on or off, nothing else."""
    import os

    before = trace_choices.get("decode_indexer_pdl")
    assert before == os.environ.get("DCP_DECODE_INDEXER_PDL", "off")
    try:
        for setting in ("on", "off"):
            trace_choices.set("decode_indexer_pdl", setting)
            assert pdl.enabled() == (setting == "on")
        with pytest.raises(ValueError, match="must be one of off, on"):
            trace_choices.set("decode_indexer_pdl", "1")
    finally:
        trace_choices.set("decode_indexer_pdl", before)


BUILD_SM90 = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dcp_compile.ops.triton.kernels.indexer_scores_decode import indexer_scores_decode_kernel as k

names = k.arg_names
ptrs = {"Q": "*bf16", "W": "*fp32", "KP": "*bf16", "KS": "*i32", "ALLOWED": "*u8", "OUT": "*fp32", "scale": "fp32"}
const = dict(D=128, BLOCK_D=128, BLOCK_HI=64, BLOCK_L=64, CAST_F32=False, DOT_PRECISION=None, LIVE_SCAN=0,
             PREFETCH=True, PDL=True)
sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in names}
aligned = {n for n in names if n.startswith("stride") or (n in ptrs and n != "scale")}
c = triton.compile(ASTSource(fn=k, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                             attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1, launch_pdl=True))
ptx = c.asm["ptx"]
wait = ptx.find("griddepcontrol.wait")
print(json.dumps(dict(wait=wait >= 0, local=".local" in ptx, loads_before_wait=ptx[:max(wait, 0)].count("ld.global"),
                      launch_pdl=c.metadata.launch_pdl)))
"""


def test_pdl_builds_for_sm90():
    """Without a GPU: the dependent launch's kernel compiles for sm_90a with the installed Triton, with the wait
    before its first load and no local memory. In a subprocess without the Triton interpreter (which replaces
    the language)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", BUILD_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    assert built["wait"] and built["launch_pdl"] and not built["local"], built
    assert built["loads_before_wait"] == 0, built
