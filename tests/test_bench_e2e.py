"""benchmarks/bench_e2e.py and benchmarks/record_op_calls.py on CPU.

- ``bench_e2e.py --smoke`` under torchrun with 2 gloo ranks (tiny dims, dcp / tp / hf, eager, decode and one
  prefill chunk profiled, recording the dcp op calls): every config ran, results.json has the fields the GPU run
  reports and the numbers are consistent (DCP's cache per rank about half of the replicated one, the capacity
  projection follows from them, the profile tables exist), and the recorded calls are the model's.
- The recorder in that run (the tiny bf16 model, 2 ranks): one prefill chunk and one decode step record each dcp
  op with the dtypes the rewritten model passes (the indexer's query in the model's dtype, its head weights
  in float32), shapes that follow from the config, and the values that make the calls realistic (counts,
  slots), and bench_kernels' input builder rebuilds every call with the recorded strides and valid slots.
No timing is asserted: the machine is shared.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import dcp_compile  # noqa: F401  registers the dcp ops
from dcp_compile.testing import tiny_deepseek_v32_config

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from record_op_calls import load_calls  # noqa: E402

DCP_OPS = {"dcp::paged_write", "dcp::indexer_scores", "dcp::topk_select", "dcp::sparse_mla_attn", "dcp::lse_combine"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(BENCH / "bench_e2e.py"), "--smoke", "--batch", "2", "--context", "24", "72", "--profile",
           "--profile-prefill", "--record", str(out / "calls.pt"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench_e2e --smoke failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def test_smoke_writes_consistent_results(smoke_run):
    out, stdout = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == []
    assert results["info"]["world"] == 2 and results["info"]["smoke"] is True
    rows = results["rows"]
    assert {(r["mode"], r["context"]) for r in rows} == {(m, c) for m in ("dcp", "tp", "hf") for c in (24, 72)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["batch"] == 2 and r["compile"] == "eager"
        assert 0 < r["step_ms_median"] <= r["step_ms_p90"], r
        assert len(r["step_ms_all"]) == 4  # --smoke: 4 timed steps
        assert r["tokens_per_s"] == pytest.approx(2 / (r["step_ms_median"] / 1e3))
        assert r["prefill_s"] > 0 and r["prefill_forwards"] == -(-r["context"] // r["prefill_positions_per_forward"])
        assert r["cache_bytes_max_rank"] > 0
        assert len(r["cache_bytes_per_rank"]) == (1 if r["mode"] == "hf" else 2)
    by = {(r["mode"], r["context"]): r for r in rows}
    # 4 layers of (latent 32 + rope 8 + index key 16) bf16 values = 448 bytes per token on one device (HF).
    assert by["hf", 72]["cache_bytes_per_token"] == 4 * (32 + 8 + 16) * 2
    # DCP over 2 ranks holds about half per rank (a page per sequence more at most); tp replicates it.
    dcp, tp = by["dcp", 72]["cache_bytes_max_rank"], by["tp", 72]["cache_bytes_max_rank"]
    assert dcp < 0.6 * tp, (dcp, tp)
    for mode in ("dcp", "tp", "hf"):
        cap = results["capacity"][mode]
        assert cap["projected"] is True
        per_token = cap["cache_bytes_per_token_per_rank"]
        assert cap["tokens_per_rank"] == int((cap["device_memory_bytes"] - cap["weight_bytes_per_rank"]
                                              - cap["decode_transient_bytes"] - cap["reserve_bytes"]) / per_token)
        assert cap["longest_context"]["2"] == cap["tokens_per_rank"] // 2
    assert results["capacity"]["dcp"]["tokens_per_rank"] > 1.6 * results["capacity"]["tp"]["tokens_per_rank"]
    # the profiled config (largest batch, smallest context) has its tables and a CPU time per step
    for mode in ("dcp", "tp", "hf"):
        assert (out / f"profile_{mode}_eager_b2_t24.txt").read_text().count("Self CPU") >= 2
        assert by[mode, 24]["profile_cpu_ms_per_step"] > 0
    assert "capacity dcp (PROJECTED)" in stdout


def test_smoke_profiles_one_prefill_chunk(smoke_run):
    """--profile-prefill: per mode, one chunk (--smoke: 32 tokens over batch 2 = 16 positions) after the smallest
    context less that chunk (24 - 16 = 8 cached positions), its tables and summary in profile_prefill_<mode>.txt."""
    out, stdout = smoke_run
    results = json.loads((out / "results.json").read_text())
    for mode in ("dcp", "tp", "hf"):
        pp = results["prefill_profile"][mode]
        assert (pp["batch"], pp["chunk_positions"], pp["context_before"]) == (2, 16, 8), pp
        assert pp["cpu_ms"] > 0 and pp["wall_ms"] > 0
        assert pp["kernel_ms"] is None and pp["nccl_ms"] is None  # no CUDA
        text = (out / f"profile_prefill_{mode}.txt").read_text()
        assert text.startswith(f"# prefill chunk profile: mode {mode}, batch 2, chunk 16 positions")
        assert "context before the chunk 8" in text
        summary = [line for line in text.splitlines() if line.startswith("summary: ")]
        assert len(summary) == 1 and "CPU " in summary[0], summary
        assert "## top 40 ops by self" in text and "## top 30 ops by self CPU time" in text
        assert text.count("Self CPU") >= 2
        assert f"mode {mode}: prefill chunk B=2 x 16 after 8: kernels - (no CUDA), CPU" in stdout


def test_smoke_records_the_model_calls(smoke_run):
    out, _ = smoke_run
    record = load_calls(out / "calls.pt")
    assert record["info"]["mode"] == "dcp" and record["info"]["world"] == 2
    ops = {(c["phase"], c["op"]) for c in record["calls"]}
    assert {(p, op) for p in ("prefill", "decode") for op in DCP_OPS} <= ops
    # collectives are recorded too (metadata only): the query all-gather of every layer
    assert any(c["op"] == "_c10d_functional::all_gather_into_tensor" for c in record["calls"])
    assert json.loads((out / "calls.json").read_text())["calls"]  # the readable twin


def test_recorder_sees_the_dtypes_and_shapes_the_model_passes(smoke_run):
    """The smoke run's bf16 tiny model, batch 2: a 16-position prefill chunk per sequence, then one decode step."""
    import bench_kernels

    cfg = tiny_deepseek_v32_config()
    record = load_calls(smoke_run[0] / "calls.pt")
    calls, layers = record["calls"], record["info"]["layers"]
    assert layers == 4  # bench_e2e's default, kept by --smoke
    by = {(c["phase"], c["op"]): c for c in calls}
    assert {(p, op) for p in ("prefill", "decode") for op in DCP_OPS} <= set(by)
    for phase, tokens in (("prefill", 2 * 16), ("decode", 2)):
        idx = {a["name"]: a for a in by[phase, "dcp::indexer_scores"]["args"]}
        assert idx["q"]["dtype"] == "bfloat16", "the indexer gets the model-dtype query, not HF's q.float()"
        assert idx["q"]["shape"] == [2, tokens // 2, cfg.index_n_heads, cfg.index_head_dim]
        assert idx["w"]["dtype"] == "float32" and idx["k_pool"]["dtype"] == "bfloat16"
        attn = {a["name"]: a for a in by[phase, "dcp::sparse_mla_attn"]["args"]}
        # every rank's heads gathered: all 4 heads, absorbed width kv_lora + rope
        assert attn["q"]["shape"] == [tokens, cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim]
        assert attn["q"]["dtype"] == attn["kv"]["dtype"] == "bfloat16"
        assert attn["slots"]["dtype"] == attn["counts"]["dtype"] == "int32"
        assert attn["slots"]["shape"] == [tokens, cfg.index_topk]
        counts = attn["counts"]["values"]
        # each query's top 8 over 2 ranks: this rank holds some of them, never more than 8
        assert 0 <= counts.min() and counts.max() <= cfg.index_topk and counts.sum() > 0
        assert by[phase, "dcp::sparse_mla_attn"]["count"] == layers  # one call per layer, grouped
    # bench_kernels rebuilds each call with the recorded strides, the recorded counts, slots valid first
    gen = torch.Generator().manual_seed(1)
    for call in calls:
        if not call["op"].startswith("dcp::"):
            continue
        args = bench_kernels.materialise_call(call, "cpu", gen)
        for spec in call["args"]:
            if spec["kind"] == "tensor":
                assert list(args[spec["name"]].stride()) == spec["stride"], (call["op"], spec["name"])
        if call["op"] == "dcp::sparse_mla_attn":
            slots, counts, rows = args["slots"], args["counts"].long(), args["kv"].shape[0]
            valid = torch.arange(slots.shape[1])[None, :] < counts[:, None]
            assert ((slots >= 0) & (slots < rows))[valid].all() and (slots[~valid] == -1).all()
        out = getattr(torch.ops.dcp, call["op"].split("::")[1])(*[args[a["name"]] for a in call["args"]])
        if call["op"] == "dcp::sparse_mla_attn":
            assert torch.isfinite(out[0]).all()
        nbytes, flops, _ = bench_kernels.recorded_cost(call, args)
        assert nbytes > 0


def test_smoke_random_fill(tmp_path):
    """--fill random (decode timing at contexts too long to prefill in a benchmark): the dcp/tp caches are
    filled in place, nothing is prefilled, the decode steps run at the requested context; hf still prefills."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(BENCH / "bench_e2e.py"), "--smoke", "--batch", "2", "--context", "72", "--fill", "random",
           "--first-use-profile", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench_e2e --fill random failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["mode"]: r for r in results["rows"]}
    # the first use of each mode (first prefill minus the same again), each mode's first prefill cProfiled
    assert set(results["first_use"]) == {"dcp", "tp", "hf"}
    assert all(f["first_prefill_s"] > 0 and f["again_s"] > 0 for f in results["first_use"].values())
    for mode in ("dcp", "tp", "hf"):
        text = (tmp_path / f"first_use_profile_{mode}.txt").read_text()
        assert text.startswith(f"# first prefill of mode {mode}")
        assert "Ordered by: cumulative time" in text and "Ordered by: internal time" in text  # tottime
    for mode in ("dcp", "tp"):
        r = rows[mode]
        assert r["status"] == "ok" and r["fill"] == "random" and r["prefill_s"] is None and r["prefill_forwards"] == 0
        assert r["step_ms_median"] > 0 and r["cache_bytes_max_rank"] > 0
    assert rows["hf"]["fill"] == "prefill" and rows["hf"]["prefill_s"] > 0
    assert "random fill" in proc.stdout


def test_smoke_compiled_prefill_and_traces(tmp_path):
    """--prefill-compile inductor: prefill chunks through torch.compile(model.forward) (README's usage), over
    the first-use caches and then a new one (the recompiles), timed after an untimed prefill of the same shapes;
    --trace-prefill: every rank writes its Chrome trace of the profiled chunk."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(BENCH / "bench_e2e.py"), "--smoke", "--modes", "dcp", "--batch", "2", "--context", "72",
           "--prefill-compile", "inductor", "--profile-prefill", "--trace-prefill", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench_e2e --prefill-compile failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert row["status"] == "ok" and row["prefill_s"] > 0 and row["prefill_forwards"] > 1
    assert "forwards, inductor)" in proc.stdout
    for rank in range(2):
        trace = json.loads((tmp_path / f"trace_prefill_dcp_rank{rank}.json").read_text())
        assert trace["traceEvents"], f"rank {rank}: empty trace"
