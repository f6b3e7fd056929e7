"""Gated attention outputs — an elementwise gate between the attention output and the output projection — through
dcp_compile.apply on 2 gloo ranks give the greedy tokens of the unmodified model in one process:

- AXK2 (A.X-K2): ``sigmoid`` of the gate half of the fused ``q_gate_proj`` (each head's query and gate rows are
  one block of the projection, so sharding the query heads shards the gate with them);
- Dots3Note: a per-head ``sigmoid(g_proj(x))`` multiplying the attention output ``[B, S, H, v]`` — its own
  projection, sharded by head like the query. Its layers mix DSA layers and a sliding-window dense MLA layer
  (another latent width, a windowed mask, no index pool).

Each rank applies the gate to its own heads before the row-parallel output projection. float64, a left-padded
batch with sdpa; the reference asserts that no indexer top-k had a near tie.
"""
from functools import lru_cache

import torch

import dcp_compile
from dcp_compile.testing import TINY_INDEXER, TINY_MLA, TopkGapRecorder, left_padded_prompts, run_ranks, tiny_model

PROMPTS = (6, 17, 29)
NEW_TOKENS = 12
TOPK = TINY_INDEXER["index_topk"]
LOGIT_TOL = 1e-5
MIN_TOPK_GAP = 2e-5
_COMMON = dict(TINY_MLA, **TINY_INDEXER, q_lora_rank=32)


def tiny_axk2():
    from transformers import AXK2Config

    cfg = AXK2Config(**_COMMON, num_hidden_layers=2, gated_norm_rank=8)  # layer 0 dense MLP, layer 1 MoE
    return tiny_model(cfg, 0, torch.float64, "sdpa")


def tiny_dots3_note():
    from transformers import Dots3NoteTextConfig

    # (Dots3Note's "full_attention" layers are DSA layers unless use_dsa=False, which makes every layer dense.)
    layer_types = ["indexed_attention", "sliding_attention", "indexed_attention"]
    # The sliding-window layers have their own shapes (swa_*): a wider latent (48) than the others (32).
    sliding = dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=48,
                   swa_head_dim=24, swa_qk_nope_head_dim=16, swa_v_head_dim=16)
    cfg = Dots3NoteTextConfig(**_COMMON, **sliding, num_hidden_layers=3, layer_types=layer_types, head_dim=24,
                              sliding_window=8, shared_experts_intermediate_size=32, n_group=1, topk_group=1)
    return tiny_model(cfg, 0, torch.float64, "sdpa")


MODELS = {"axk2": tiny_axk2, "dots3_note": tiny_dots3_note}


def _generate(model):
    ids, mask = left_padded_prompts(PROMPTS, seed=3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def generate_on_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    for name, make in MODELS.items():
        model = dcp_compile.apply(make(), init_device_mesh("cpu", (world,)), page_size=4)
        attn = [m for m in model.modules() if hasattr(m, "dcp_graph")]
        # The gate's own projection (Dots3Note's g_proj) is sharded with the heads: 4 heads over 2 ranks.
        gates = {tuple(m.g_proj.weight.shape) for m in attn if hasattr(m, "g_proj")}
        results[name] = (*_generate(model), gates, sorted(model.dcp.new_cache(1, 8).index_keys))
    return results


@lru_cache(maxsize=None)
def reference(name):
    with TopkGapRecorder(TOPK) as gaps, torch.no_grad():
        tokens, logits = _generate(MODELS[name]())
    assert gaps.calls > 0, "the recorder saw no indexer top-k"
    assert gaps.min_gap > MIN_TOPK_GAP, f"{name}: near tie at the top-k boundary ({gaps.min_gap:.2e})"
    return tokens, logits


def test_gated_outputs_generate_matches_single_device_hf():
    per_rank = run_ranks(generate_on_rank, 2)
    for name in MODELS:
        want_tokens, want_logits = reference(name)
        for rank, results in enumerate(per_rank):
            tokens, logits, gates, index_pools = results[name]
            assert torch.equal(tokens, want_tokens), f"{name}, rank {rank}: tokens differ\n{tokens}\n{want_tokens}"
            err = (logits - want_logits).abs().max().item()
            assert err < LOGIT_TOL, f"{name}, rank {rank}: logits differ by {err:.2e}"
            if name == "dots3_note":
                assert gates == {(2, 64)}, gates
                assert index_pools == [0, 2], f"index pools for layers {index_pools}: the sliding layer needs none"
