"""apply at full depth: layers of the same shape are traced once and share the rewritten graph.

- A tiny DeepSeek-V3.2 with 6 layers (one dense-MLP layer, five MoE layers; every attention layer alike but
  one whose softmax scale is changed) on 2 gloo ranks: apply traces 2 distinct attention shapes (once before and
  once after the head sharding each), not 6, and greedy generate still equals single-device HF (float64).
- The real DeepSeek-V3.2 configuration (61 layers, hidden 7168, 128 MLA heads, q_lora 1536, kv_lora 512,
  rope 64, a 64-head indexer with top-k 2048, 256 routed experts), every weight a bf16 tensor on the meta
  device (no memory, no values): apply on 2 gloo ranks finishes, with one traced shape for the 61 layers. What
  is real: every dimension and the layer count, and the code path (probe forwards, traces, match, head
  sharding, rewrite, install; 3 traces for the 61 layers). What is not: the weights (meta tensors; the
  fingerprint covers their shapes only), and no forward runs after apply. The time apply took on each rank is
  printed (run with -s), not asserted.
"""
import logging
import re
import time

import torch

import dcp_compile
from dcp_compile.install import DCPLayerForward
from dcp_compile.testing import left_padded_prompts, run_ranks, tiny_deepseek_v32

LAYERS = 6
ODD_LAYER = 4  # its attention scale differs: a shape of its own
PAGE = 4
NEW_TOKENS = 12
PROMPTS = (6, 21)


def tiny_deep(dtype=torch.float64):
    model = tiny_deepseek_v32(seed=0, dtype=dtype, attn_implementation="sdpa", num_hidden_layers=LAYERS)
    model.model.layers[ODD_LAYER].self_attn.scaling *= 1.25
    return model


def _generate(model):
    ids, mask = left_padded_prompts(PROMPTS, seed=3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _logged(fn):
    logger = logging.getLogger("dcp_compile")
    handler = _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
    return handler.lines


def deep_on_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_deep()
    lines = _logged(lambda: dcp_compile.apply(model, init_device_mesh("cpu", (world,)), page_size=PAGE))
    graphs = {id(layer.self_attn.forward.gm) for layer in model.model.layers}
    return (*_generate(model), model.dcp.apply_stats, lines, len(graphs))


def test_identical_layers_are_traced_once_and_match_hf():
    want_tokens, want_logits = _generate(tiny_deep())
    per_rank = run_ranks(deep_on_rank, 2)
    for rank, (tokens, logits, stats, lines, graphs) in enumerate(per_rank):
        assert torch.equal(tokens, want_tokens), f"rank {rank}: tokens differ from single-device HF"
        err = (logits - want_logits).abs().max().item()
        assert err < 1e-9, f"rank {rank}: logits differ by {err:.2e}"
        assert stats["layers"] == LAYERS and stats["distinct_layers"] == 2, stats
        assert stats["traces"] == 2 * 2, f"rank {rank}: 2 shapes x (before + after head sharding): {stats}"
        assert graphs == LAYERS, "every layer holds a graph of its own"
        if rank == 0:  # progress: one line per stage, on rank 0 only
            stages = [re.sub(r" \([\d.]+ s, [\d.]+ s in all\)$", "", line) for line in lines]
            assert stages == [
                f"dcp_compile.apply: found {LAYERS} attention layers",
                "dcp_compile.apply: traced and matched 2 distinct layer shape(s) (2 traces)",
                "dcp_compile.apply: fingerprinted the weights",
                f"dcp_compile.apply: sharded heads over 2 rank(s), rewrote and installed {LAYERS} layers (4 traces in all)",
            ], lines
        else:
            assert lines == [], lines


def real_dims_on_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    config = DeepseekV32Config()  # the released configuration
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(config).to(torch.bfloat16).eval()
    start, cpu = time.perf_counter(), time.process_time()
    dcp_compile.apply(model, init_device_mesh("cpu", (world,)))
    seconds = time.perf_counter() - start, time.process_time() - cpu
    attention = [layer.self_attn for layer in model.model.layers]
    installed = all(isinstance(a.forward, DCPLayerForward) for a in attention)
    dims = dict(q_b=tuple(attention[0].q_b_proj.weight.shape), kv_b=tuple(attention[60].kv_b_proj.weight.shape),
                o=tuple(attention[30].o_proj.weight.shape), spec=model.dcp.cache_format)
    return seconds, model.dcp.apply_stats, installed, dims, attention[0].dcp_graph.dcp_attention.config


def test_real_deepseek_v32_config_at_full_depth_on_meta():
    per_rank = run_ranks(real_dims_on_rank, 2, timeout=900)
    for rank, (seconds, stats, installed, dims, attn) in enumerate(per_rank):
        print(f"\nrank {rank}: apply on the 61-layer DeepSeek-V3.2 configuration took {seconds[0]:.1f} s "
              f"({seconds[1]:.1f} s of CPU): {stats}")
        assert installed, f"rank {rank}: not every layer was rewritten"
        assert stats["layers"] == 61 and stats["distinct_layers"] == 1, stats
        assert stats["traces"] == 3, f"one retrace to pass the top-k 2048, one after the head sharding: {stats}"
        assert dims["q_b"] == (64 * 192, 1536) and dims["kv_b"] == (64 * 256, 512) and dims["o"] == (7168, 64 * 128), dims
        assert (dims["spec"].latent_dim, dims["spec"].index_dim, len(dims["spec"].layer_ids)) == (576, 128, 61), dims
        assert (attn.heads, attn.topk, attn.latent_dim, attn.rope_dim, attn.rank) == (64, 2048, 512, 64, rank), attn


def test_layers_whose_read_config_entries_differ_are_traced_apart(monkeypatch):
    """The grouping before tracing cannot see what a layer's code reads from the model config; the trace records
    it, and a layer whose per-layer config entries among those reads differ from its group's is split off. Here
    the trace is made to report that it read ``mlp_layer_types`` (dense for layer 0, sparse for the others)."""
    import dataclasses

    import dcp_compile.api as api
    from dcp_compile.capture import capture_layer, per_layer_config, probe_layers

    model = tiny_deep()
    layers = probe_layers(model)
    assert "_attn_implementation" in capture_layer(layers[0]).config_reads  # HF's attention reads it
    reads = frozenset({"mlp_layer_types"})
    assert per_layer_config(layers[0], reads) == (("mlp_layer_types", "'dense'"),)
    assert per_layer_config(layers[1], reads) == per_layer_config(layers[5], reads) == (("mlp_layer_types", "'sparse'"),)

    capture_and_match = api.capture_and_match

    def reading_mlp_types(layer, past_len=None):
        captured, match = capture_and_match(layer, past_len)
        return dataclasses.replace(captured, config_reads=captured.config_reads | reads), match

    monkeypatch.setattr(api, "capture_and_match", reading_mlp_types)
    stats = {"traces": 0}
    groups = api._capture_groups(layers, stats)
    assert [[layer.layer_idx for layer in g.layers] for g in groups] == [[0], [1, 2, 3, 5], [ODD_LAYER]]
    assert stats["traces"] == 3
