"""Models apply cannot rewrite fail with an UnsupportedModelError that names the layer and the piece, before
any collective of apply and the same on every rank: GLM-5-Next (pooled indexer, shared top-k, linear
attention), DeepSeek-V4 (compressed KV caches), and a DeepSeek-V3.2 whose HF tensor-parallel plan shards a
piece of attention other than the heads (the indexer's head weights). HF's plan with the attention replicated
is supported: apply cuts the heads itself (HF's own plan "auto", and TP + EP: tests/test_hf_parallel.py)."""
import os
import re

import torch

import dcp_compile
from dcp_compile.testing import left_padded_prompts, run_ranks, tiny_deepseek_v32
from test_errors import _raises


def tiny_glm5_next():
    """GLM-5-Next's text stack, tiny: a KDA linear-attention layer, a DSA layer with its own (pooled) indexer,
    and a DSA layer that reuses that layer's top-k (indexer_types "shared")."""
    from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

    text = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=0,
        qk_nope_head_dim=16, v_head_dim=16, index_n_heads=4, index_head_dim=16, index_topk=8, index_kpool=4,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["linear_attention", "indexed_attention", "indexed_attention"], indexer_types=["full", "full", "shared"],
        linear_head_dim=16, linear_num_heads=4, hc_mult=2, pad_token_id=0, max_position_embeddings=512,
    )
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                  projection_intermediate_size=64, patch_size=2, image_size=8)
    cfg = Glm5NextConfig(text_config=text, vision_config=vision)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Glm5NextForConditionalGeneration(cfg).eval()


def tiny_deepseek_v4():
    """DeepSeek-V4, tiny: a compressed-sparse-attention layer (compressor + lightning indexer) and a
    heavily-compressed one (compressor only)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["moe", "moe"], sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=4,
        index_head_dim=16, index_topk=4, hc_mult=2, partial_rotary_factor=0.25,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return DeepseekV4ForCausalLM(cfg).eval()


def unsupported_models(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    return {"glm5_next": _raises(dcp_compile.apply, tiny_glm5_next(), mesh),
            "deepseek_v4": _raises(dcp_compile.apply, tiny_deepseek_v4(), mesh)}


def test_unsupported_models_name_the_layer_and_the_piece():
    (out,) = run_ranks(unsupported_models, 1)
    kind, msg = out["glm5_next"]
    assert kind == "UnsupportedModelError", msg
    lines = {re.search(r"(?:layer|module) (\S+)", line).group(1): line for line in msg.splitlines()[1:]}
    assert len(lines) == 3, msg
    layers = "model.language_model.layers"
    pooled = lines[f"{layers}.1.self_attn"]
    assert "DSA indexer `indexer`" in pooled and "pooled" in pooled and "index_kpool=4" in pooled, pooled
    assert "cache.layers[i].keys" in pooled, pooled
    shared = lines[f"{layers}.2.self_attn"]
    assert "no DeepSeek Sparse Attention indexer of its own" in shared and "`prev_topk_indices`" in shared, shared
    linear = lines[f"{layers}.0.self_attn"]
    assert "cache.get_recurrent_state" in linear and "linear-attention" in linear, linear

    kind, msg = out["deepseek_v4"]
    assert kind == "UnsupportedModelError", msg
    csa, hca = msg.splitlines()[1:]
    assert "model.layers.0.self_attn (layer type 'compressed_sparse_attention') keeps a compressed KV cache" in csa, csa
    assert "its indexer `compressor.indexer`" in csa, csa
    assert "not keys written by cache.update_indexer" in csa and "store_compression_weights" in csa, csa
    assert "model.layers.1.self_attn (layer type 'heavily_compressed_attention') keeps a compressed KV cache" in hca, hca
    assert "its indexer" not in hca, hca
    assert "no DeepSeek Sparse Attention indexer" not in msg, "V4 has an indexer; the message must not say otherwise"


ATTENTION_REPLICATED = {f"model.layers.*.self_attn.{p}": "replicate"
                        for p in ("q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
# A plan that shards a piece of attention dcp_compile does not shard: the indexer's head weights (HF gathers
# their output again, so HF's own forward is right; the rewritten indexer would score half the heads).
INDEXER_SHARDED = {"model.layers.*.self_attn.indexer.weights_proj": "colwise_rep"}
PROMPTS = (7, 19)
NEW_TOKENS = 12
HF_KWARGS = dict(dtype=torch.float64, attn_implementation="sdpa", experts_implementation="eager")


def hf_tensor_parallel(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import DeepseekV32ForCausalLM
    from transformers.distributed import DistributedConfig

    import dcp_compile.api as api

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun sets them
    mesh = init_device_mesh("cpu", (world,))
    # HF's plan with the attention replicated (MLP/MoE, embeddings and head still sharded by HF): apply cuts
    # the heads itself, over a mesh of the caller's.
    model = DeepseekV32ForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(tp_plan=ATTENTION_REPLICATED), **HF_KWARGS)
    assert model.tp_size == world, "the model was not loaded with HF tensor parallelism"
    dcp_compile.apply(model, mesh, page_size=4)
    ids, mask = left_padded_prompts(PROMPTS, seed=1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    q_rows = model.model.layers[0].self_attn.q_b_proj.weight.shape[0]

    # HF sharding a piece of attention that dcp_compile keeps whole: rejected on every rank, before any
    # collective of apply (the probe forwards run HF's own collectives, on every rank alike).
    groups = []
    new_group = api._dcp_group
    api._dcp_group = lambda *a: groups.append(1) or new_group(*a)
    model = DeepseekV32ForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(tp_plan=INDEXER_SHARDED), **HF_KWARGS)
    error = _raises(dcp_compile.apply, model, mesh)
    return out.sequences, torch.stack(out.logits), q_rows, error, len(groups)


def test_hf_tensor_parallel_with_replicated_attention_and_an_unsupported_plan(tmp_path):
    tiny_deepseek_v32().save_pretrained(tmp_path)
    ref = tiny_deepseek_v32(attn_implementation="sdpa", dtype=torch.float64)
    ids, mask = left_padded_prompts(PROMPTS, seed=1)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                        return_dict_in_generate=True)
    per_rank = run_ranks(hf_tensor_parallel, 2, str(tmp_path), timeout=300)  # a rank stuck in a collective times out
    assert per_rank[0][3] == per_rank[1][3], [r[3] for r in per_rank]
    for rank, (tokens, logits, q_rows, (kind, msg), groups) in enumerate(per_rank):
        assert torch.equal(tokens, want.sequences), f"rank {rank}: tokens differ from single-device HF"
        err = (logits - torch.stack(want.logits)).abs().max().item()
        assert err < 1e-9, f"rank {rank}: logits differ by {err:.2e}"
        assert q_rows == ref.model.layers[0].self_attn.q_b_proj.weight.shape[0] // 2, "apply did not shard the heads"
        assert kind == "UnsupportedModelError", msg
        assert "layer model.layers.0.self_attn: Hugging Face tensor parallelism shards indexer.weights_proj.weight" in msg, msg
        assert "adopts HF's sharding of the attention heads only" in msg and "'replicate'" in msg, msg
        assert groups == 0, f"rank {rank}: apply created process groups before rejecting the model"
