"""dcp_compile.apply composes with Hugging Face's own tensor and expert parallelism (2 gloo ranks, CPU).

A tiny DeepSeek-V3.2 saved with save_pretrained is loaded with ``from_pretrained(distributed_config=
DistributedConfig(tp_plan="auto"))`` (HF's plan: attention heads, dense MLP, shared experts, routed experts by
tensor, embeddings and LM head sharded) and with TP + EP (``ep_size=2``: routed experts split by expert), as
torchrun would run it (RANK / WORLD_SIZE / LOCAL_RANK set). ``apply(model)`` takes the mesh from the model,
adopts HF's attention head shards and leaves the rest as HF sharded it; ``dcp_compile.from_pretrained`` does
both in one call. Greedy tokens equal the single-device model's (float64), logits to 1e-9, and each rank's
cache is at most 1/N of HF's single-device cache plus one page per sequence per pool.
"""
import os

import torch

import dcp_compile
from dcp_compile.testing import (
    assert_parity_and_sharded_cache, hf_cache_bytes, left_padded_prompts, run_ranks, tiny_deepseek_v32,
)

PAGE = 4
PROMPTS = (7, 19)
NEW_TOKENS = 12
LOGIT_TOL = 1e-9
HF_KWARGS = dict(dtype=torch.float64, attn_implementation="sdpa", experts_implementation="eager")


def _generate(model):
    ids, mask = left_padded_prompts(PROMPTS, seed=1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits), out.cache


def _layout(model) -> dict:
    """How each weight is held on this rank: (class, global shape, local shape, placements)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = ("DTensor", tuple(p.shape), tuple(p.to_local().shape), tuple(map(str, p.placements)))
        else:
            out[name] = ("Tensor", tuple(p.shape), tuple(p.shape), ())
    return out


def hf_parallel_on_rank(rank, world, path):
    from transformers import DeepseekV32ForCausalLM
    from transformers.distributed import DistributedConfig

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun sets them
    results = {}
    # HF tensor parallelism ("auto"), then apply with the mesh taken from the model.
    model = DeepseekV32ForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                   **HF_KWARGS)
    loaded = _layout(model)
    mesh = dcp_compile.tensor_parallel_mesh(model)
    dcp_compile.apply(model, page_size=PAGE)
    results["tp"] = (*_generate(model), loaded, _layout(model), mesh.mesh.tolist(), model.dcp.apply_stats)
    # TP + EP, loaded and applied in one call.
    model = dcp_compile.from_pretrained(path, ep_size=world, page_size=PAGE, **HF_KWARGS)
    results["tp_ep"] = (*_generate(model), None, _layout(model), None, model.dcp.apply_stats)
    for name, (tokens, logits, cache, *rest) in results.items():
        spec = model.dcp.cache_format
        row_bytes = (spec.latent_dim + spec.index_dim) * torch.finfo(spec.dtype).bits // 8
        one_page = len(spec.layer_ids) * tokens.shape[0] * PAGE * row_bytes
        results[name] = (tokens, logits, cache.storage_bytes(), one_page, *rest)

    # The rank check still covers the weights every rank holds whole: one replicated attention weight differs.
    model = DeepseekV32ForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                   **HF_KWARGS)
    if rank == 1:
        with torch.no_grad():
            model.model.layers[1].self_attn.q_a_proj.weight[0, 0] += 1.0
    dcp_compile.apply(model, page_size=PAGE)
    try:
        _generate(model)
        mismatch = None
    except dcp_compile.RankMismatchError as exc:
        mismatch = str(exc)
    return results, mismatch


def test_hf_tensor_and_expert_parallel_models_match_single_device_hf(tmp_path):
    tiny_deepseek_v32().save_pretrained(tmp_path)
    ref = tiny_deepseek_v32(attn_implementation="sdpa", dtype=torch.float64)
    want_tokens, want_logits, hf_cache = _generate(ref)
    hf_bytes = hf_cache_bytes(hf_cache)
    per_rank = run_ranks(hf_parallel_on_rank, 2, str(tmp_path), timeout=300)
    for rank, (results, mismatch) in enumerate(per_rank):
        for name, (tokens, logits, cache_bytes, one_page, loaded, after, mesh, stats) in results.items():
            where = f"rank {rank}, {name}"
            assert_parity_and_sharded_cache(where, tokens, logits, cache_bytes, one_page, want_tokens, want_logits,
                                            hf_bytes, 2, LOGIT_TOL)
            # The attention heads: HF's shards, adopted as plain local tensors (half the heads on each rank).
            for proj, rows, cols in (("q_b_proj", 96 // 2, 32), ("kv_b_proj", 128 // 2, 32), ("o_proj", 64, 64 // 2)):
                held = after[f"model.layers.1.self_attn.{proj}.weight"]
                assert held == ("Tensor", (rows, cols), (rows, cols), ()), (where, proj, held)
            # Everything else stays as HF sharded it: the routed experts by tensor (TP) or by expert (EP).
            experts = after["model.layers.1.mlp.experts.gate_up_proj"]
            assert experts[0] == "DTensor" and experts[1] == (4, 64, 64), (where, experts)
            assert experts[2] == ((4, 32, 64) if name == "tp" else (2, 64, 64)), (where, experts)
            assert after["model.layers.0.mlp.down_proj.weight"][2] == (64, 64), where  # dense MLP, rowwise
            assert stats["layers"] == 2 and stats["distinct_layers"] == 1 and stats["traces"] == 2, (where, stats)
        loaded, mesh = results["tp"][4], results["tp"][6]
        assert loaded["model.layers.0.self_attn.q_b_proj.weight"][0] == "DTensor", "HF did not shard the heads"
        assert mesh == [0, 1], mesh
        assert mismatch is not None and "weights fingerprint differs" in mismatch, (rank, mismatch)
