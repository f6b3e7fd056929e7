"""HF generate with dcp_compile.apply on gloo CPU ranks gives the tokens of the unmodified model in one process.

The reference is the unpatched tiny DeepSeek-V3.2 in float64 (float64 keeps the two runs' rounding far
below every decision boundary; the HF indexer itself scores in float32, so each reference run also
asserts that no top-k selection had a near tie — see TopkGapRecorder). Logits of every generated step are
compared to LOGIT_TOL: HF's eager attention rounds its softmax through float32, so the two runs agree to
about 1e-7, not 1e-15.
"""
from functools import lru_cache

import pytest
import torch

import dcp_compile
from dcp_compile.testing import (
    TopkGapRecorder, hf_cache_bytes, left_padded_prompts, run_ranks, tiny_deepseek_v32, tiny_deepseek_v32_config,
)

PAGE = 4
NEW_TOKENS = 32
LOGIT_TOL = 1e-5
MIN_TOPK_GAP = 2e-5  # 20x the float32 rounding of the indexer scores here (~1e-6)
TOPK = tiny_deepseek_v32_config().index_topk  # 8
PROMPTS = {
    "short": (5,),  # fewer tokens than index_topk: every position is selected at first
    "long": (29,),  # more than index_topk: sparsity matters from the prompt on
    "mixed": (6, 17, 29),  # batch 3, different lengths: left padding and attention_mask
}


@lru_cache(maxsize=None)
def reference(impl: str, prompt: str):
    ids, mask = left_padded_prompts(PROMPTS[prompt], seed=len(prompt))
    model = tiny_deepseek_v32(seed=0, dtype=torch.float64, attn_implementation=impl)
    with TopkGapRecorder(TOPK) as gaps, torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert gaps.calls > 0, "the recorder saw no indexer top-k"
    assert gaps.min_gap > MIN_TOPK_GAP, f"test input has a near tie at the top-k boundary ({gaps.min_gap:.2e})"
    return out.sequences, torch.stack(out.logits), hf_cache_bytes(out.cache)


def generate_on_rank(rank, world, dcp_size, interleave, impl, prompts):
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_deepseek_v32(seed=0, dtype=torch.float64, attn_implementation=impl)
    dcp_compile.apply(model, init_device_mesh("cpu", (world,)), dcp_size=dcp_size, page_size=PAGE, interleave=interleave)
    results = {}
    for prompt in prompts:
        ids, mask = left_padded_prompts(PROMPTS[prompt], seed=len(prompt))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        spec = model.dcp.cache_format
        row_bytes = (spec.latent_dim + spec.index_dim) * torch.finfo(spec.dtype).bits // 8
        one_page_per_sequence = len(spec.layer_ids) * ids.shape[0] * PAGE * row_bytes
        results[prompt] = (out.sequences, torch.stack(out.logits), out.cache.storage_bytes(), one_page_per_sequence)
    # A plain forward with no cache (as for scoring a text) gets a cache sized for its input.
    ids, mask = left_padded_prompts(PROMPTS["mixed"], seed=len("mixed"))
    with torch.no_grad():
        results["forward"] = model(ids, attention_mask=mask).logits
    return results


RUNS = [
    # world, dcp_size (None = world), interleave, attention implementation, prompts.
    # Left-padded batches run with "sdpa": HF's own eager path turns padded rows into NaN in float64
    # (two finfo.min masks add to -inf), which makes the reference unusable there.
    pytest.param(1, None, 1, "eager", ("short", "long"), id="world1"),
    pytest.param(1, None, PAGE, "sdpa", ("mixed",), id="world1-interleave=page-sdpa"),
    pytest.param(2, None, 1, "sdpa", ("long", "mixed"), id="world2-sdpa"),
    pytest.param(2, None, PAGE, "eager", ("short", "long"), id="world2-interleave=page"),
    pytest.param(4, None, 1, "sdpa", ("mixed",), id="world4-sdpa"),
    pytest.param(4, None, PAGE, "eager", ("long",), id="world4-interleave=page"),
    pytest.param(4, 2, 1, "sdpa", ("mixed",), id="world4-dcp2-sdpa"),
    pytest.param(4, 1, 1, "sdpa", ("mixed",), id="world4-dcp1-sdpa"),
]


@lru_cache(maxsize=None)
def reference_forward(impl: str):
    ids, mask = left_padded_prompts(PROMPTS["mixed"], seed=len("mixed"))
    with torch.no_grad():
        logits = tiny_deepseek_v32(seed=0, dtype=torch.float64, attn_implementation=impl)(ids, attention_mask=mask).logits
    return logits, mask.bool()


@pytest.mark.parametrize("world,dcp_size,interleave,impl,prompts", RUNS)
def test_generate_matches_single_device_hf(world, dcp_size, interleave, impl, prompts):
    per_rank = run_ranks(generate_on_rank, world, dcp_size, interleave, impl, prompts)
    dcp = dcp_size or world
    for prompt in prompts:
        want_tokens, want_logits, hf_bytes = reference(impl, prompt)
        for rank, results in enumerate(per_rank):
            tokens, logits, cache_bytes, one_page = results[prompt]
            assert torch.equal(tokens, want_tokens), f"rank {rank}, prompt {prompt}: tokens differ"
            err = (logits - want_logits).abs().max().item()
            assert err < LOGIT_TOL, f"rank {rank}, prompt {prompt}: logits differ by {err:.2e}"
            # Per-rank storage: 1/dcp of HF's single-device cache, plus at most one page per sequence per pool.
            assert cache_bytes <= hf_bytes / dcp + one_page, (rank, prompt, cache_bytes, hf_bytes, one_page)
            if dcp > 1:
                assert cache_bytes < hf_bytes, "the cache is not sharded"
    if impl == "sdpa":  # left padding: compare the real (unpadded) positions of a plain forward
        want, real = reference_forward(impl)
        for rank, results in enumerate(per_rank):
            err = (results["forward"] - want)[real].abs().max().item()
            assert err < LOGIT_TOL, f"rank {rank}: plain forward logits differ by {err:.2e}"
