"""Block-FP8 checkpoints loaded with Hugging Face tensor parallelism (dcp_compile/fp8.py, shard.py), 2 gloo ranks.

A tiny DeepSeek-V3.2 (all layers dense) saved as a block-FP8 checkpoint (16 x 16 blocks, every linear but the LM
head and the indexer's ``weights_proj`` float8_e4m3fn + ``weight_scale_inv``; ``kv_a_proj_with_mqa``'s 32 + 8 = 40
rows end in a partial block, as the release's 512 + 64 = 576 rows do in 128-blocks) is loaded with its FP8Linears
kept and ``tp_plan="auto"``: HF shards ``q_b_proj`` / ``kv_b_proj`` (Shard(0)) and ``o_proj`` (Shard(1)), weights
and scales alike. ``apply`` adopts those shards (``kv_b_proj`` dequantized from its local shard) and generates what
the same FP8 checkpoint generates unmodified on one process (float64 compute; tokens equal, logits to 1e-9), with
1/N of the cache per rank.

CPU stand-ins: HF's FP8 kernels are CUDA-only, so every process runs ``fp8.dequantizing_fp8_linear`` in their place
(``use_dequantizing_fp8_linear``), and ``keep_fp8_linears_on_cpu`` stops transformers from switching a
pre-quantized checkpoint to its dequantizing load when no GPU is present (which is also the load that rejects the
partial edge block: ``test_hf_dequantizing_load_rejects_a_partial_edge_block``).
"""
import os
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import dcp_compile
from dcp_compile.fp8 import use_dequantizing_fp8_linear
from dcp_compile.testing import (
    assert_parity_and_sharded_cache, hf_cache_bytes, left_padded_prompts, run_ranks, tiny_deepseek_v32, write_block_fp8,
)

NOT_FP8 = ("lm_head", "weights_proj")  # as in DeepSeek-V3.2's checkpoint
PAGE = 4
PROMPTS = (6, 19)  # batch 2, left padded; 19 > index_topk 8: the indexer selects
NEW_TOKENS = 10
LOGIT_TOL = 1e-9  # float64, as test_hf_parallel.py
HF_KWARGS = dict(dtype=torch.float64, attn_implementation="sdpa")


def save_fp8_checkpoint(path, block, seed=0):
    """The tiny DeepSeek-V3.2, all layers dense (no FP8 experts: their CPU path is not the stand-in's), saved as a
    block-FP8 checkpoint in ``block`` blocks (edge blocks may be partial), float64 elsewhere."""
    model = tiny_deepseek_v32(seed=seed, dtype=torch.float64, first_k_dense_replace=2)
    quantized = {f"{name}.weight" for name, m in model.named_modules()
                 if type(m) is nn.Linear and not name.endswith(NOT_FP8)}
    model.save_pretrained(path)
    done = set(write_block_fp8(path, block, lambda key, value: key in quantized, NOT_FP8))
    assert done == quantized, f"linears not found under their module names in the checkpoint: {sorted(quantized - done)}"


@contextmanager
def keep_fp8_linears_on_cpu():
    """Without a GPU, transformers loads a pre-quantized FP8 checkpoint dequantized (its ``validate_environment``
    sets ``dequantize=True``); skip that check so the CPU load keeps ``FP8Linear`` as a GPU load does."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    saved = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = saved


def _generate(model):
    ids, mask = left_padded_prompts(PROMPTS, seed=5)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits), out.cache


def _attention_layout(model) -> dict:
    """Layer 0's attention parameters on this rank: (class, dtype, global shape, local shape, placements)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.model.layers[0].self_attn.named_parameters():
        if isinstance(p, DTensor):
            out[name] = ("DTensor", p.dtype, tuple(p.shape), tuple(p.to_local().shape), tuple(map(repr, p.placements)))
        else:
            out[name] = ("Tensor", p.dtype, tuple(p.shape), tuple(p.shape), ())
    modules = {n: type(m).__name__ for n, m in model.model.layers[0].self_attn.named_children()}
    return dict(params=out, modules=modules)


def fp8_tp_on_rank(rank, world, path):
    from transformers import DeepseekV32ForCausalLM
    from transformers.distributed import DistributedConfig

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun sets them
    results = {}
    with keep_fp8_linears_on_cpu(), use_dequantizing_fp8_linear():
        model = DeepseekV32ForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                       **HF_KWARGS)
        loaded = _attention_layout(model)
        dcp_compile.apply(model, page_size=PAGE)
        results["tp"] = (*_generate(model), loaded, _attention_layout(model))
        # The README's recipe: dcp_compile.from_pretrained on the FP8 checkpoint, FP8Linears kept.
        model = dcp_compile.from_pretrained(path, page_size=PAGE, **HF_KWARGS)
        results["from_pretrained"] = (*_generate(model), None, _attention_layout(model))
    for name, (tokens, logits, cache, *rest) in results.items():
        spec = model.dcp.cache_format
        row_bytes = (spec.latent_dim + spec.index_dim) * torch.finfo(spec.dtype).bits // 8
        one_page = len(spec.layer_ids) * tokens.shape[0] * PAGE * row_bytes
        results[name] = (tokens, logits, cache.storage_bytes(), one_page, *rest)
    return results


def test_fp8_checkpoint_under_hf_tensor_parallelism_matches_unmodified_fp8_model(tmp_path):
    save_fp8_checkpoint(tmp_path, (16, 16))
    from transformers import DeepseekV32ForCausalLM

    with keep_fp8_linears_on_cpu(), use_dequantizing_fp8_linear():
        ref = DeepseekV32ForCausalLM.from_pretrained(tmp_path, **HF_KWARGS).eval()
        kv_a = ref.model.layers[0].self_attn.kv_a_proj_with_mqa
        assert type(kv_a).__name__ == "FP8Linear" and tuple(kv_a.weight_scale_inv.shape) == (3, 4)  # 40 rows: partial
        want_tokens, want_logits, hf_cache = _generate(ref)
    hf_bytes = hf_cache_bytes(hf_cache)
    for rank, results in enumerate(run_ranks(fp8_tp_on_rank, 2, str(tmp_path), timeout=900)):
        for name, (tokens, logits, cache_bytes, one_page, loaded, after) in results.items():
            where = f"rank {rank}, {name}"
            assert_parity_and_sharded_cache(where, tokens, logits, cache_bytes, one_page, want_tokens, want_logits,
                                            hf_bytes, 2, LOGIT_TOL)
            # After apply: HF's shards adopted as plain local tensors; FP8 kept but for kv_b_proj (dequantized).
            params, modules = after["params"], after["modules"]
            fp8, f32 = torch.float8_e4m3fn, torch.float32
            assert params["q_b_proj.weight"][:3] == ("Tensor", fp8, (48, 32)), (where, params["q_b_proj.weight"])
            assert params["q_b_proj.weight_scale_inv"][:3] == ("Tensor", f32, (3, 2)), where
            assert params["o_proj.weight"][:3] == ("Tensor", fp8, (64, 32)), (where, params["o_proj.weight"])
            assert params["o_proj.weight_scale_inv"][:3] == ("Tensor", f32, (4, 2)), where
            assert modules["kv_b_proj"] == "Linear", (where, modules)
            assert params["kv_b_proj.weight"][:3] == ("Tensor", torch.float64, (64, 32)), where
            assert modules["kv_a_proj_with_mqa"] == "FP8Linear" and params["kv_a_proj_with_mqa.weight_scale_inv"][2] == (3, 4)
        # As loaded: HF's plan sharded the heads' weights and their block scales alike (what apply adopted).
        loaded = results["tp"][4]["params"]
        for proj, placement, weight, scales in (("q_b_proj", "Shard(dim=0)", (48, 32), (3, 2)),
                                                ("kv_b_proj", "Shard(dim=0)", (64, 32), (4, 2)),
                                                ("o_proj", "Shard(dim=1)", (64, 32), (4, 2))):
            w, s = loaded[f"{proj}.weight"], loaded[f"{proj}.weight_scale_inv"]
            assert w[0] == "DTensor" and w[1] == torch.float8_e4m3fn and w[3:] == (weight, (placement,)), (rank, proj, w)
            assert s[0] == "DTensor" and s[3:] == (scales, (placement,)), (rank, proj, s)


def misaligned_on_rank(rank, world, path):
    from transformers import DeepseekV32ForCausalLM
    from transformers.distributed import DistributedConfig

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    with keep_fp8_linears_on_cpu(), use_dequantizing_fp8_linear():
        model = DeepseekV32ForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                       **HF_KWARGS)
        with pytest.raises(dcp_compile.UnsupportedModelError) as exc:
            dcp_compile.apply(model, page_size=PAGE)
    return str(exc.value)


def test_hf_fp8_shards_not_covering_whole_blocks_are_rejected_on_every_rank_before_any_forward(tmp_path):
    """32 x 32 blocks: HF splits q_b_proj's 96 rows into 48 per rank and its 3 scale rows into 2 + 1, so rank 1's
    rows [48, 96) would be scaled by block 2 alone. Every rank raises the same error (from the global shapes)."""
    save_fp8_checkpoint(tmp_path, (32, 32))
    messages = run_ranks(misaligned_on_rank, 2, str(tmp_path), timeout=600)
    assert messages[0] == messages[1], messages
    assert ("`model.layers.0.self_attn.q_b_proj` is an FP8 linear with 32 x 32 scale blocks that Hugging Face tensor "
            "parallelism splits over 2 ranks into 48 rows per rank (96 in all): rank 1 holds rows [48, 96) but scale "
            "blocks [2, 3) of 3, not those of its rows ([1, 3))") in messages[0], messages[0]
    assert "use a tensor-parallel size that splits 96 rows into whole blocks of 32" in messages[0], messages[0]


# --- the partial edge block of kv_a_proj_with_mqa --------------------------------------------------------------------
def test_hf_dequantizing_load_rejects_a_partial_edge_block(tmp_path, caplog):
    """transformers' dequantizing load (``FineGrainedFP8Config(dequantize=True)``, also what it switches to on its
    own for a pre-quantized checkpoint without a GPU) derives the block from the scale grid and fails on
    kv_a_proj_with_mqa's 40 rows over 3 scale rows (the release: 576 rows over 5): a CONVERSION error in its load
    report, then RuntimeError. The README's recipe therefore keeps the FP8Linears, whose ceil-sized scale grid is
    read correctly (``test_fp8_checkpoint_under_hf_tensor_parallelism_matches_unmodified_fp8_model``). If this test
    fails, transformers changed that load: revisit the README's note."""
    from transformers import DeepseekV32ForCausalLM, FineGrainedFP8Config

    save_fp8_checkpoint(tmp_path, (16, 16))
    with pytest.raises(RuntimeError, match="issues during automatic conversion of the weights"):
        DeepseekV32ForCausalLM.from_pretrained(tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True),
                                               **HF_KWARGS)
    assert "Weight shape (40, 64) not divisible by scale grid (3, 4)" in caplog.text
    assert "kv_a_proj_with_mqa.weight" in caplog.text
