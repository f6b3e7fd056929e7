"""GLM-MoE-DSA (transformers ``GlmMoeDsaForCausalLM``) through dcp_compile.apply on 2 gloo ranks gives the
greedy tokens of the unmodified model in one process.

GLM-like shapes where they differ from the tiny DeepSeek-V3.2: the query/key no-RoPE width (24) differs from
the value width (32), the latent is 48 wide, and every layer runs its own indexer (indexer_types "full").
float64 and a left-padded batch with sdpa, as in test_generate_parity.py; the reference asserts that no
indexer top-k had a near tie, so the two runs can only differ by a real error.
"""
import torch

import dcp_compile
from dcp_compile.testing import TopkGapRecorder, left_padded_prompts, run_ranks

PROMPTS = (9, 23)  # batch 2, left padded; both longer than index_topk
NEW_TOKENS = 16
TOPK = 8
LOGIT_TOL = 1e-5
MIN_TOPK_GAP = 2e-5


def tiny_glm_moe_dsa(seed: int = 0):
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    cfg = GlmMoeDsaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=48, qk_rope_head_dim=8,
        qk_nope_head_dim=24, v_head_dim=32, index_n_heads=8, index_head_dim=16, index_topk=TOPK, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, indexer_types=["full", "full"],
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(cfg)
    with torch.no_grad():  # as tiny_deepseek_v32: attention far from uniform, indexer scores well separated
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model.to(torch.float64).eval()


def _generate(model):
    ids, mask = left_padded_prompts(PROMPTS, seed=3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def generate_on_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    model = dcp_compile.apply(tiny_glm_moe_dsa(), init_device_mesh("cpu", (world,)), page_size=4)
    return _generate(model)


def test_glm_moe_dsa_generate_matches_single_device_hf():
    with TopkGapRecorder(TOPK) as gaps, torch.no_grad():
        want_tokens, want_logits = _generate(tiny_glm_moe_dsa())
    assert gaps.calls > 0, "the recorder saw no indexer top-k"
    assert gaps.min_gap > MIN_TOPK_GAP, f"test input has a near tie at the top-k boundary ({gaps.min_gap:.2e})"
    for rank, (tokens, logits) in enumerate(run_ranks(generate_on_rank, 2)):
        assert torch.equal(tokens, want_tokens), f"rank {rank}: tokens differ\n{tokens}\n{want_tokens}"
        err = (logits - want_logits).abs().max().item()
        assert err < LOGIT_TOL, f"rank {rank}: logits differ by {err:.2e}"
