"""How the ``dcp`` ops lower under torch.compile (ops/__init__.py, "how the ops lower"; docs/design.md, "The
ops layer").

- CPU, Inductor: the Triton-backed ops (sparse_mla_attn, indexer_scores, paged_write, candidate_keys) stay one
  opaque call each (their CPU kernel is ops/reference.py); topk_select and lse_combine are traced into aten ops that
  Inductor compiles (no ``torch.ops.dcp`` call left for them in the generated code); results equal eager.
- The Triton path traced without a GPU (a subprocess that lets the Triton kernels serve CPU tensors, only to
  trace them): every op becomes kernel-launch nodes, symbolic shapes included, with no ``dcp`` op and no host
  sync left: the host wrappers are traceable.
- CUDA (skipped without): a decode-shaped step compiled with ``mode="reduce-overhead"`` equals eager, the
  generated code launches the Triton kernels itself (no ``torch.ops.dcp`` fallback), CUDA graphs are not
  skipped, and the in-place cache write copies no pool.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from test_ops import attn_inputs, candidate_inputs, combine_inputs, indexer_inputs, topk_inputs, write_inputs
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.utils import run_and_get_code

import dcp_compile.ops  # noqa: F401  (registers torch.ops.dcp)

dcp = torch.ops.dcp
TRITON_OPS = ("sparse_mla_attn", "indexer_scores", "paged_write", "candidate_keys")  # Triton kernels on CUDA
TRACED_OPS = ("topk_select", "lse_combine")  # traced as their aten reference on every device


def step(pool, rows, write_slots, q, kv, slots, counts, iq, iw, ik_pool, ikey_slots, allowed,
         local_scores, local_pos, cand_keys, seq_index, block_table, out, lse, lse_all):
    """One call of each op, with some arithmetic around them for Inductor to fuse."""
    dcp.paged_write(pool, rows, write_slots)
    attn_out, attn_lse = dcp.sparse_mla_attn(q, kv, slots, counts, 0.37, 7)
    scores = dcp.indexer_scores(iq, iw, ik_pool, ikey_slots, allowed, 0.125)
    own_keys = dcp.candidate_keys(local_scores * 1, local_pos)
    top_slots, top_counts = dcp.topk_select(cand_keys, seq_index, block_table, 5, 1, 3, 2, 4)
    combined = dcp.lse_combine(out, lse, lse_all)
    best, best_cols = dcp.local_topk(scores.flatten(0, 1), 3)
    return attn_out * 2, attn_lse, scores + 1, own_keys, top_slots, top_counts, combined * 3, best, best_cols


def cpu_step_inputs():
    iq, iw, ik_pool, ikey_slots, allowed, _ = indexer_inputs(q_dtype=torch.float32)
    return (*write_inputs(torch.float32), *attn_inputs(torch.float32)[:4],
            iq, iw, ik_pool.float(), ikey_slots, allowed, *candidate_inputs(T=4, k=5), *topk_inputs()[:3],
            *combine_inputs(torch.float32))


def _clone(args):
    return [a.clone() for a in args]


def _call_targets(gm) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_ops_lower_as_intended_on_cpu():
    """Dynamo's graph holds every op once; after AOTAutograd (functionalization, where the ops are decomposed
    or kept) only the three Triton-backed ops remain, as opaque CPU calls; Inductor's code calls exactly
    those, and the compiled step equals eager (the pool written in place)."""
    dynamo_ops, aot_ops = [], []

    def counting_aot(gm, example_inputs):
        dynamo_ops.append(_call_targets(gm))

        def fw(aot_gm, aot_inputs):
            aot_ops.append(_call_targets(aot_gm))
            return aot_gm  # run the functionalized graph as it is (aot_eager)

        return aot_autograd(fw_compiler=fw)(gm, example_inputs)

    args = cpu_step_inputs()
    with torch.no_grad():
        eager_args = _clone(args)
        want = step(*eager_args)
        aot_args = _clone(args)
        got_aot = torch.compile(step, backend=counting_aot, fullgraph=True)(*aot_args)
        torch._dynamo.reset()
        ind_args = _clone(args)
        got_ind, codes = run_and_get_code(torch.compile(step, backend="inductor", fullgraph=True), *ind_args)

    (dynamo,), (aot,) = dynamo_ops, aot_ops
    for op in TRITON_OPS + TRACED_OPS:
        assert dynamo[f"dcp.{op}"] == 1, dynamo
    dcp_after_aot = {k: v for k, v in aot.items() if k.startswith("dcp.")}
    # paged_write mutates its pool: functionalization wraps it (auto_functionalized) around the same op
    assert dcp_after_aot == {"dcp.sparse_mla_attn.default": 1, "dcp.indexer_scores.default": 1,
                             "dcp.candidate_keys.default": 1}, aot
    assert sum(v for k, v in aot.items() if "auto_functionalized" in k) == 1, aot

    code = "\n".join(codes)
    called = collections.Counter(re.findall(r"torch\.ops\.dcp\.(\w+)", code))
    assert set(called) == set(TRITON_OPS), f"Inductor's code calls {dict(called)}"

    for got in (got_aot, got_ind):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, equal_nan=True)
    for done in (aot_args, ind_args):
        assert torch.equal(done[0], eager_args[0]), "the compiled paged_write did not write the pool in place"


TRACE_TRITON_PATH = textwrap.dedent("""
    import collections, json, logging, sys
    sys.path.insert(0, {tests!r})
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    import dcp_compile.ops as ops
    from dcp_compile.ops.triton import sparse_mla_attn as smla
    from test_op_lowering import cpu_step_inputs, step

    # No GPU here: Triton cannot compile the kernels for its mutation analysis (it then assumes every
    # argument is written, and says so); the trace itself needs no GPU.
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.CRITICAL)
    ops.TRITON_DEVICES = ("cuda", "cpu")  # let the Triton host wrappers serve CPU tensors: trace only
    smla.choose_num_splits = lambda *a, **k: 3  # split-K: the merge kernel is traced too
    result = {{}}
    for mode in ("fake", "symbolic"):
        gm = make_fx(dispatch_functionalize(step), tracing_mode=mode)(*cpu_step_inputs())
        kernels, targets = collections.Counter(), collections.Counter()
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            targets[str(n.target)] += 1
            if "triton_kernel_wrapper" in str(n.target):
                kernels[kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__] += 1
        result[mode] = dict(kernels=kernels, targets=targets)
    print("RESULT" + json.dumps(result))
""")


def test_triton_path_traces_to_kernel_launches():
    """With the Triton kernels serving the tensors, AOTAutograd's functionalization traces every op down to
    its kernel launches, with fake and with symbolic shapes (a growing decode length): no dcp op is left,
    and no host sync (``.item()``, a data-dependent branch) was met, or the symbolic trace would fail."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real @triton.jit kernels
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", TRACE_TRITON_PATH.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for mode, found in result.items():
        assert found["kernels"] == {"paged_write_kernel": 1, "sparse_mla_fwd_kernel": 1, "merge_partials_kernel": 1,
                                    # the prefill indexer after its pass over the mask
                                    "prefill_tile_bounds_kernel": 1, "indexer_scores_prefill_kernel": 1,
                                    "topk_select_kernel": 1,
                                    "candidate_keys_kernel": 1,
                                    # a few short rows: the five-pass scheme (local_topk.choose_scheme)
                                    "local_topk_histogram_kernel": 4,
                                    "local_topk_compact_kernel": 1}, (mode, found["kernels"])
        left = {t: n for t, n in found["targets"].items() if t.startswith("dcp.") or "_local_scalar_dense" in t}
        assert not left, (mode, left)


# The buffers the local top-k's kernels write, traced with symbolic sizes at row counts where a row is one chunk
# (T >= TARGET_PROGRAMS: the chunk count is then an expression sympy cannot prove >= 1), both schemes.
TRACE_TOPK_WRITES = textwrap.dedent("""
    import collections, json, logging
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    import dcp_compile.ops as ops
    from dcp_compile.ops.triton import local_topk as lt

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.CRITICAL)
    ops.TRITON_DEVICES = ("cuda", "cpu")  # trace only
    result = {{}}
    for scheme in ("five_pass", "candidates"):
        def select(scores):
            return lt.local_topk(scores, 64, scheme=scheme)
        gm = make_fx(dispatch_functionalize(select), tracing_mode="symbolic")(torch.randn(600, 700))
        kernels, with_max = collections.Counter(), []
        for n in gm.graph.nodes:
            if n.target is not torch.ops.higher_order.triton_kernel_wrapper_functional:
                continue
            name = kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
            kernels[name] += 1
            for arg in n.kwargs["tensors_to_clone"]:
                val = n.kwargs["kwargs"][arg].meta["val"]
                if any("Max" in str(st) for st in val.stride()):
                    with_max.append(f"{{name}}.{{arg}} {{tuple(val.shape)}} {{val.stride()}}")
        result[scheme] = dict(kernels=kernels, with_max=with_max)
    print("RESULT" + json.dumps(result))
""")


def test_kernel_written_buffers_have_inductor_strides():
    """Every buffer a local top-k kernel writes has, traced with symbolic sizes, strides with no ``Max``: a fake
    tensor's contiguous stride over a size sympy cannot prove >= 1 is ``Max(1, size)·…`` where Inductor's is
    ``size·…``; on such a kernel-written buffer torch 2.11's Inductor re-wraps it and copies it onto itself
    (``KeyError: 'opN'`` in ``Scheduler.compute_ancestors``, pytorch/pytorch#189271: the compiled prefill failed
    so). The scratch buffers are 1-D for that (``ops/triton/local_topk.py: _scratch``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TRACE_TOPK_WRITES.format()], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["five_pass"]["kernels"] == {"local_topk_histogram_kernel": 4, "local_topk_compact_kernel": 1}
    assert result["candidates"]["kernels"]["local_topk_split_kernel"] == 1, result["candidates"]["kernels"]
    for scheme, found in result.items():
        assert not found["with_max"], (scheme, found["with_max"])


# ----------------------------------------------------------------------------------------------- CUDA

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class DecodeStep(torch.nn.Module):
    """A decode step's worth of dcp ops on DeepSeek-V3.2 shapes (one rank of 2: 16 heads each, 32 gathered),
    its two cache pools as buffers (static addresses, as a CUDA-graphed cache must be)."""

    def __init__(self, rows=8192, index_rows=8192, dtype=torch.bfloat16):
        super().__init__()
        self.register_buffer("latent_pool", torch.randn(rows, 576, device="cuda").to(dtype))
        self.register_buffer("index_pool", torch.randn(index_rows, 128, device="cuda").to(dtype))

    def forward(self, latent_new, index_new, write_slots, q, slots, counts, iq, iw, key_slots, allowed,
                cand_scores, cand_pos, seq_index, block_table, lse_all):
        dcp.paged_write(self.latent_pool, latent_new, write_slots)
        dcp.paged_write(self.index_pool, index_new, write_slots)
        scores = dcp.indexer_scores(iq, iw, self.index_pool, key_slots, allowed, 128 ** -0.5)
        # As in the model: every rank's keys from its local top-k (here both ranks' in this step), stacked as
        # the all-gather leaves them; rank 0's share of the selection.
        keys = torch.stack([dcp.candidate_keys(s, p) for s, p in zip(cand_scores.chunk(2, -1), cand_pos.chunk(2, -1))])
        top_slots, top_counts = dcp.topk_select(keys, seq_index + 0, block_table, 2048, 0, 2, 1, 64)
        out, lse = dcp.sparse_mla_attn(q, self.latent_pool, slots, counts, 576 ** -0.5, 512)
        merged = dcp.lse_combine(out, lse, torch.stack([lse, lse_all]))
        return scores, top_slots, top_counts, out, lse, merged


def decode_inputs(batch=4, keys=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev, bf16 = "cuda", torch.bfloat16
    K, heads = 2048, 32
    write_slots = torch.randperm(8192, generator=g)[:batch]
    write_slots[1] = -1  # a row another rank owns
    counts = torch.tensor([K, 0, 700, 1500][:batch], dtype=torch.int32)
    slots = torch.stack([torch.randperm(8192, generator=g)[:K] for _ in range(batch)]).to(torch.int32)
    cand_scores = torch.randn(batch, 2 * K, generator=g)
    cand_scores[:, -100:] = float("-inf")
    # rank r's block: K of the positions it owns (world 2, interleave 1: position % 2 == r)
    cand_pos = torch.stack([torch.cat([torch.randperm(keys, generator=g)[:K] * 2 + r for r in range(2)])
                            for _ in range(batch)])
    pages = keys // 64  # this rank's pages of each sequence (world 2, interleave 1: half of 2·keys positions)
    block_table = torch.randperm(batch * pages + 16, generator=g)[: batch * pages].view(batch, pages).to(torch.int32)
    lse_all = torch.randn(batch, heads, generator=g) * 3
    lse_all[0, :4] = float("-inf")
    allowed = torch.ones(batch, 1, keys, dtype=torch.bool)
    allowed[:, :, -7:] = False
    key_slots = torch.stack([torch.randperm(8192, generator=g)[:keys] for _ in range(batch)]).to(torch.int32)
    cpu = (torch.randn(batch, 576, generator=g).to(bf16), torch.randn(batch, 128, generator=g).to(bf16), write_slots,
           torch.randn(batch, heads, 576, generator=g).to(bf16), slots, counts,
           torch.randn(batch, 1, 64, 128, generator=g).to(bf16), torch.randn(batch, 1, 64, generator=g) * 0.1,
           key_slots, allowed, cand_scores, cand_pos, torch.arange(batch), block_table, lse_all)
    return tuple(t.to(dev) for t in cpu)


@gpu
def test_decode_step_compiles_to_triton_launches_cuda():
    """reduce-overhead (CUDA graphs): equals eager on three replays, launches the Triton kernels from the
    generated code (no torch.ops.dcp call), and no CUDA-graph skip."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = DecodeStep(), DecodeStep()
    compiled.load_state_dict(eager.state_dict())
    for p in (compiled.latent_pool, compiled.index_pool):
        torch._dynamo.mark_static_address(p)
    step_fn = torch.compile(compiled, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for replay in range(3):
            args = decode_inputs(seed=replay)
            torch._dynamo.mark_static_address(args[-2])  # the block table: a static address in the model's cache
            want = eager(*args)
            if replay == 0:
                got, codes = run_and_get_code(step_fn, *args)
            else:
                got = step_fn(*args)
            torch.cuda.synchronize()
            names = ("scores", "top_slots", "top_counts", "out", "lse", "merged")
            for name, g, w in zip(names, got, want):
                # Same kernels and configs as eager, compiled by Inductor (its compiler options may round
                # differently: one bf16 step at most); the selection (integers) is exact
                tol = 1e-2 if g.dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"replay {replay}: {name}: {m}")
            assert torch.equal(compiled.latent_pool, eager.latent_pool), f"replay {replay}: latent pool"
            assert torch.equal(compiled.index_pool, eager.index_pool), f"replay {replay}: index pool"
    code = "\n".join(codes)
    from dcp_compile.ops.triton import indexer_scores as ixs, indexer_scores_pdl

    # every dcp op lowered to kernels Inductor launches, except the decode indexer's dependent launch
    # (sm_90+: an opaque op, ops/triton/indexer_scores_pdl.py); else the kernel the table picks for bf16
    # operands (the prefetch loop kernel as shipped)
    pdl = indexer_scores_pdl.serves(args[6], compiled.index_pool, args[8].shape[1])
    assert set(re.findall(r"torch\.ops\.dcp\.(\w+)", code)) == ({"indexer_scores_decode_pdl"} if pdl else set())
    decode_indexer = ("torch.ops.dcp.indexer_scores_decode_pdl" if pdl
                      else "indexer_scores_decode_kernel" if ixs.DECODE_TABLE["tensor_cores"] is not None
                      else "indexer_scores_kernel")
    for kernel in ("sparse_mla_fwd_kernel", "merge_partials_kernel", decode_indexer, "paged_write_kernel",
                   "candidate_keys_kernel", "topk_select_kernel"):
        assert kernel in code, f"{kernel} is not launched from Inductor's code"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@gpu
def test_compiled_step_copies_no_pool_cuda():
    """The pools stay in place under Inductor: the paged writes' functional form is re-inplaced, and the
    kernels that only read a pool (attention, indexer) do not get it copied (Triton's mutation analysis
    finds their stores). A copy of either pool would allocate all of it; the step's own buffers (split-K
    partials, scores, selection) are a few MB."""
    torch._dynamo.reset()
    module = DecodeStep(rows=1 << 17, index_rows=1 << 17)  # 144 MiB latent pool, 32 MiB index pool
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        compiled(*decode_inputs(seed=0))  # compile and first run
        args = decode_inputs(seed=1)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        compiled(*args)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    smallest_pool = module.index_pool.numel() * module.index_pool.element_size()
    assert extra < smallest_pool // 2, f"the compiled step allocated {extra} bytes (index pool: {smallest_pool})"
    write_slots = args[2]
    keep = write_slots >= 0
    assert torch.equal(module.latent_pool[write_slots[keep]], args[0][keep])
    assert torch.equal(module.index_pool[write_slots[keep]], args[1][keep])


@gpu
def test_float64_on_cuda_stays_on_the_reference():
    """float64 CUDA tensors: no Triton kernel; the compiled op calls the op (its reference branch) and
    equals eager exactly."""
    torch._dynamo.reset()
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in attn_inputs(torch.float64))

    def attend(q, kv, slots, counts):
        return dcp.sparse_mla_attn(q, kv, slots, counts, args[4], args[5])

    with torch.no_grad():
        got, codes = run_and_get_code(torch.compile(attend, fullgraph=True), *args[:4])
        want = attend(*args[:4])
    assert "torch.ops.dcp.sparse_mla_attn" in "\n".join(codes)
    assert got[1].dtype == torch.float64
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@gpu
def test_local_topk_compiles_with_dynamic_row_length_cuda():
    """dcp::local_topk under Inductor with a dynamic row length at 4096 rows (one chunk a row, as a prefill chunk
    of 8 x 512 queries), both schemes: it compiles (torch 2.11 raised KeyError in Scheduler.compute_ancestors on
    the 3-D scratch buffers, pytorch/pytorch#189271) and equals eager exactly (the same kernels)."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)

    def select(scores):
        return dcp.local_topk(scores, 2048)

    compiled = torch.compile(select, backend="inductor", fullgraph=True)
    for lengths in ((3000, 5000), (33000, 40000)):  # five-pass, then candidates (choose_scheme)
        for L in lengths:
            scores = torch.randn(4096, L, device="cuda", generator=g)
            scores[:, -100:] = float("-inf")
            torch._dynamo.mark_dynamic(scores, 1)
            with torch.no_grad():
                got, want = compiled(scores), select(scores)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"L = {L}"
