"""examples/real_dims_slice.py --smoke under torchrun on 2 gloo ranks (tiny dims, the real slice's structure).

- float32, batch 2, a 40-token prompt (past the tiny indexer's top 8: the selection is at work), with the
  unmodified single-device reference: the checkpoint saved and loaded with HF tensor parallelism, DCP 2 and TP
  (dcp_size 1) each generating every token the reference does; the memory split fields; DCP's cache half of TP's
  per rank; the weights per rank predicted from the placement read off the slice equal to the bytes held; the
  capacity table's numbers following from the measured bytes per token (the arithmetic of step 5).
- bf16 with a block-FP8 checkpoint and HF expert parallelism: the checkpoint holds float8 weights and block scales
  (kv_a_proj_with_mqa and the modules DeepSeek keeps unquantized in bf16), loads dequantized, and DCP and TP agree
  on the first step (bf16 rule; a prompt of 8 tokens, at the tiny top-k, so that no near tie of the tiny bf16
  indexer decides it).
No timing is asserted: the machine is shared.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "real_dims_slice.py"
GIB = 2**30


def _run(tmp_path, *extra):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--smoke", "--dir", str(ckpt), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"real_dims_slice --smoke failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text()), proc.stdout, ckpt


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("slice_fp32"), "--dtype", "float32", "--batch", "2", "--reference")


def test_dcp_tp_and_reference_generate_the_same_tokens(fp32_run):
    results, stdout, _ = fp32_run
    assert results["ok"] is True and "verdict: PASS" in stdout
    parity = results["parity"]
    assert parity["reference"] == "ok"
    for name in ("dcp_vs_tp", "dcp_vs_reference", "tp_vs_reference"):
        c = parity[name]
        assert c["ok"] and c["equal_leading_tokens"] == [8, 8] and c["of"] == 8, (name, c)
        assert c["first_step_logits_rel_l2"] < 1e-4, (name, c)
    assert results["modes"]["dcp"]["tokens"] == results["modes"]["tp"]["tokens"]
    # the slice as configured: the published dims' structure, 3 dense layers then MoE, yarn rope
    info = results["info"]
    assert (info["world"], info["layers"], info["experts"], info["batch"], info["context"]) == (2, 5, 8, 2, 40)
    assert list(info["config_defaults_vs_published"]) == ["rope_parameters"]  # the defaults lack only yarn
    assert results["slice"]["reused"] is False and results["slice"]["parameters"] > 0


def test_memory_split_and_cache_bytes_per_token(fp32_run):
    results, _, _ = fp32_run
    dcp, tp = results["modes"]["dcp"], results["modes"]["tp"]
    assert (dcp["dcp_size"], tp["dcp_size"]) == (2, 1)
    for m in (dcp, tp):
        assert len(m["weight_bytes_per_rank"]) == len(m["cache_bytes_per_rank"]) == 2
        assert m["weight_bytes"] > 0 and m["cache_bytes"] > 0
        assert m["activation_bytes_max_rank"] is None and m["peak_bytes_max_rank"] is None  # CPU: not measured
        reserved = 40 + 8
        assert m["cache_tokens_reserved"] == reserved and m["cache_layers"] == 5
        assert m["cache_bytes_per_token_per_layer"] == m["cache_bytes"] / (2 * reserved * 5)
        assert m["cache_row_bytes"] == (32 + 8 + 16) * 4  # latent + rope + index key, float32
    # TP replicates the whole cache (48 positions fill 6 pages of 8 exactly); DCP 2 holds half of it per rank.
    assert tp["cache_bytes_per_token_per_layer_max_rank"] == tp["cache_row_bytes"]
    assert dcp["cache_bytes_per_token_per_layer_max_rank"] == tp["cache_row_bytes"] / 2
    assert dcp["weight_bytes_per_rank"] == tp["weight_bytes_per_rank"]  # dcp_size changes the cache only
    # The placement read off the slice predicts the bytes rank 0 holds, exactly.
    placement = results["placement"]
    assert placement["slice_weight_bytes_predicted_rank0"] == dcp["weight_bytes_per_rank"][0]
    for name in ("q_b_proj", "kv_b_proj", "o_proj", "experts.gate_up_proj", "shared_experts.down_proj"):
        assert any(k.endswith(name) or f".{name}." in k for k in placement["sharded"]), name
    assert "model.layers.*.self_attn.kv_a_proj_with_mqa.weight" in placement["whole"]
    assert placement["bytes_per_element"]["model.layers.*.mlp.gate.weight"] == 4  # HF keeps the routers fp32


def test_capacity_table_follows_from_the_measured_bytes(fp32_run):
    results, stdout, _ = fp32_run
    cap, modes = results["capacity"], results["modes"]
    assert cap["projected"] is True and cap["gpus"] == 8 and cap["layers"] == 61
    assert 671.0e9 < cap["full_model_parameters"] < 672.5e9
    per = cap["cache_bytes_per_token_per_layer"]
    assert per["tp"] == modes["tp"]["cache_bytes_per_token_per_layer_max_rank"]
    assert per["dcp_at_8"] == modes["dcp"]["cache_bytes_per_token_per_layer_max_rank"] * 2 / 8
    # The full model's weights per GPU: bf16 ~171 GB (README), block FP8 about half.
    bf16, fp8 = cap["weights"]["bf16"]["bytes"], cap["weights"]["fp8"]["bytes"]
    assert 155 * GIB < bf16 < 165 * GIB and 0.45 < fp8 / bf16 < 0.55
    assert cap["unplaced"] == []
    fp8_scale = cap["fp8_latent_row_bytes"] / cap["cache_row_bytes"]
    assert cap["fp8_latent_row_bytes"] == 32 + 2 * 8 + 4 + 16 * 4  # fp8 latent + bf16 rope + a scale + index key
    rows = cap["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # machine x weights dtype x mode x cache dtype
    for r in rows:
        weights = bf16 if r["weights"] == "bf16" else fp8
        mode = r["mode"].split()[0]
        want_per = per["tp" if mode == "tp" else "dcp_at_8"] * (fp8_scale if r["cache"] == "fp8" else 1.0)
        assert r["weight_bytes_per_gpu"] == weights and r["cache_bytes_per_token_per_layer_per_gpu"] == want_per
        assert r["activation_reserve_bytes"] == 16 * GIB  # CPU: the stated default
        free = r["gpu_memory_bytes"] - weights - r["activation_reserve_bytes"]
        assert r["free_for_cache_bytes"] == free
        if free <= 0:
            assert r["fits"] is False
            continue
        tokens = int(free // (want_per * 61))
        assert r["fits"] and r["context_tokens_per_node"] == tokens, r
        assert r["longest_context"] == {"1": tokens, "2": tokens // 2}
    by = {(r["machine"], r["weights"], r["mode"], r["cache"]): r for r in rows}
    # bf16 weights do not fit 8 x H100 (the table says so); DCP 8 holds 8x TP 8's context where both fit.
    assert not any(r["fits"] for k, r in by.items() if k[:2] == ("8 x H100 80GB", "bf16"))
    dcp, tp = by["8 x H200 141GB", "fp8", "dcp 8", "bf16"], by["8 x H200 141GB", "fp8", "tp 8", "bf16"]
    assert dcp["context_tokens_per_node"] == pytest.approx(8 * tp["context_tokens_per_node"], rel=1e-6)
    assert "weights + reserve do not fit" in stdout and "PROJECTED" in stdout


def test_fp8_checkpoint_with_expert_parallelism(tmp_path):
    from safetensors import safe_open

    results, stdout, ckpt = _run(tmp_path, "--fp8", "--ep", "--context", "8")
    assert results["info"]["fp8"] and results["info"]["ep"] and results["info"]["dtype"] == "bfloat16"
    assert results["slice"]["fp8_weights"] > 0
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [16, 16]
    dtypes = {}
    for file in ckpt.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    attn = "model.layers.3.self_attn."
    assert dtypes[attn + "q_b_proj.weight"] == "F8_E4M3" and dtypes[attn + "q_b_proj.weight_scale_inv"] == "F32"
    assert dtypes["model.layers.3.mlp.experts.0.gate_proj.weight"] == "F8_E4M3"
    for kept in (attn + "kv_a_proj_with_mqa.weight", attn + "indexer.weights_proj.weight", "lm_head.weight",
                 "model.embed_tokens.weight"):
        assert dtypes[kept] == "BF16", kept
    c = results["parity"]["dcp_vs_tp"]
    assert c["ok"] and c["first_tokens_equal"] and c["first_step_logits_rel_l2"] < 2e-2, c
    # loaded dequantized: bf16 weights per rank, as the placement predicts
    assert results["placement"]["slice_weight_bytes_predicted_rank0"] == results["modes"]["dcp"]["weight_bytes"]
