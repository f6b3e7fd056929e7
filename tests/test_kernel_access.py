"""Every Triton launch of the ``dcp`` ops writes only what its op outputs (or the op's declared mutation,
``paged_write``'s pool): checked with the analysis Inductor itself runs on user kernels
(``torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors``, on the kernel's TTIR).

Why it matters: under torch.compile Inductor trusts that analysis. A kernel it believes writes an input gets
that input copied back after the launch, and when the input is a view Inductor cannot write through (the
bit-viewed candidates of the DCP top-k exchange), the compile fails: the DCP 4 CUDA-graph decode on 4 × H200
did (``make_reindexer NYI on DtypeView``), while one GPU, with no exchange, did not. The analysis is
conservative: a ``@triton.jit`` helper handed an input pointer whose result reaches a store's address makes
that input look written, so kernels load in their own body and pass values to helpers.

The launches are recorded (not run) from the host wrappers on CPU tensors in a subprocess without the Triton
interpreter (the analysis needs the real ``JITFunction``s), with the CUDA backend's target faked (TTIR needs
no GPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import json, sys, torch, triton
    from triton.backends.compiler import GPUTarget

    class FakeCudaTarget:  # TTIR generation asks the active driver for its target only
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(FakeCudaTarget())
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
    from dcp_compile.ops.triton import common

    launches = []

    def record(kernel):
        class Grid:
            def __getitem__(self, grid):
                def call(*args, **meta):
                    launches.append((kernel, args, meta))
                return call
        return Grid()

    common.launch = record  # the wrappers resolve common.launch at call time
    from dcp_compile.ops.triton import (candidate_keys, indexer_scores, local_topk, merge_partials, paged_write,
                                        sparse_mla_attn, topk_select)

    def same_storage(a, b):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    g = torch.Generator().manual_seed(0)
    T, H, Dk, V, K, S = 4, 16, 96, 64, 32, 256
    calls = {
        "sparse_mla_attn": (sparse_mla_attn.sparse_mla_attn,
                            (torch.randn(T, H, Dk, generator=g).bfloat16(), torch.randn(S, Dk, generator=g).bfloat16(),
                             torch.randint(0, S, (T, K), dtype=torch.int32, generator=g),
                             torch.full((T,), K, dtype=torch.int32), 0.1, V), {"num_splits": 2}, ()),
        "indexer_scores": (indexer_scores.indexer_scores,
                           (torch.randn(2, 3, 8, 64, generator=g).bfloat16(), torch.randn(2, 3, 8, generator=g),
                            torch.randn(S, 64, generator=g).bfloat16(),
                            torch.randint(0, S, (2, 40), dtype=torch.int32, generator=g),
                            torch.ones(2, 3, 40, dtype=torch.bool), 0.1), {}, ()),
        # decode (S = 1): the table's kernel (the loop kernel's prefetch path for bf16 operands)
        "indexer_scores_decode": (indexer_scores.indexer_scores,
                                  (torch.randn(2, 1, 8, 64, generator=g).bfloat16(), torch.randn(2, 1, 8, generator=g),
                                   torch.randn(S, 64, generator=g).bfloat16(),
                                   torch.randint(0, S, (2, 40), dtype=torch.int32, generator=g),
                                   torch.ones(2, 1, 40, dtype=torch.bool), 0.1), {}, ()),
        "local_topk": (local_topk.local_topk, (torch.randn(T, 300, generator=g), 16), {}, ()),
        "candidate_keys": (candidate_keys.candidate_keys,
                           (torch.randn(T, 32, generator=g), torch.randperm(64, generator=g)[:32].repeat(T, 1)), {},
                           ()),
        "topk_select": (topk_select.topk_select,
                        (torch.randint(0, 2**40, (2, T, 16), generator=g).sort(-1, descending=True).values,
                         torch.arange(T), torch.arange(T * 4, dtype=torch.int32).view(T, 4), 16, 0, 2, 1, 8), {}, ()),
        "merge_partials": (merge_partials.merge_partials,
                           (torch.randn(2, T, H, V, generator=g), torch.randn(2, T, H, generator=g)), {}, ()),
        "paged_write": (paged_write.paged_write,
                        (torch.zeros(S, Dk).bfloat16(), torch.randn(T, Dk, generator=g).bfloat16(),
                         torch.arange(T)), {}, (0,)),
    }
    report = {}
    for name, (fn, args, kwargs, mutated) in calls.items():
        launches.clear()
        fn(*args, **kwargs)
        inputs = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        found = []
        for kernel, kargs, meta in launches:
            named = dict(zip(kernel.arg_names, kargs))
            named.update({k: v for k, v in meta.items() if k in kernel.arg_names})
            writes = identify_accessed_tensors(kernel, dict(named), {}).read_writes.writes
            for dep in writes:
                t = named[dep.name]
                hit = [i for i, a in inputs if same_storage(a, t) and i not in mutated]
                found.append({"kernel": kernel.fn.__name__, "arg": dep.name, "op_inputs_written": hit})
        report[name] = {"launches": len(launches), "writes": found}
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, f"the launch recorder failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("op", ["sparse_mla_attn", "indexer_scores", "indexer_scores_decode", "local_topk",
                                "candidate_keys", "topk_select", "merge_partials", "paged_write"])
def test_kernels_write_only_outputs(report, op):
    entry = report[op]
    assert entry["launches"] >= 1, f"{op}: no launch recorded"
    assert entry["writes"], f"{op}: the analysis found no written tensor at all"
    wrong = [w for w in entry["writes"] if w["op_inputs_written"]]
    assert not wrong, f"{op}: Inductor's analysis says these launches write the op's inputs: {wrong}"


def test_decode_indexer_case_launches_the_tables_kernel(report):
    """The decode entry above exercises the kernel the decode table picks (the loop kernel for bf16)."""
    from dcp_compile.ops.triton import indexer_scores as ixs

    kernels = {w["kernel"] for w in report["indexer_scores_decode"]["writes"]}
    want = ("indexer_scores_decode_kernel" if ixs.DECODE_TABLE["tensor_cores"] is not None
            else "indexer_scores_kernel")
    assert kernels == {want}, kernels
