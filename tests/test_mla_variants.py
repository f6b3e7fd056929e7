"""MLA variants the same capture → match → rewrite pipeline reaches, on 2 gloo ranks against single-device HF, and
the one piece it does not reach failing before any collective:

- HY-V4 (``HYV4ForCausalLM``): attention sinks (one learned logit per head in the softmax: the merged output is
  scaled by sigmoid(lse - sink) on this rank's heads), a per-head sigmoid gate (its own ``gate_proj``), a shared
  indexer layer and hyper-connections around the layers. HF supports only "eager" with sinks, and its eager
  path makes padded rows NaN in float64, so the batch is unpadded.
- Mistral-Large-4 (``MistralLarge4ForConditionalGeneration``'s text stack): the query scaled per head and position
  (``scale_h·log(pos + 1) + bias_h``, parameters sharded with the heads), no q_lora, a NoPE layer (rotary width
  0), logit soft-capping; a left-padded batch with sdpa.
- Mistral-Large-4 with cross-layer KV sharing (``kv_source_layers``): an UnsupportedModelError naming the layer
  and ``shared_kv_states``, the same on both ranks (one rank passing it would hang in a collective).

float64; the references assert that no indexer top-k had a near tie.
"""
from functools import lru_cache

import torch

import dcp_compile
from dcp_compile.testing import TINY_INDEXER, TINY_MLA, TopkGapRecorder, left_padded_prompts, run_ranks, tiny_model
from test_errors import _raises

NEW_TOKENS = 12
TOPK = TINY_INDEXER["index_topk"]
LOGIT_TOL = 1e-5
MIN_TOPK_GAP = 2e-5
_COMMON = dict(TINY_MLA, **TINY_INDEXER)
PROMPTS = {"hy_v4": (23, 23), "mistral_large4": (9, 23)}
SEEDS = {"hy_v4": 4, "mistral_large4": 3}  # prompts without a near tie at either model's top-k boundary


def tiny_hy_v4():
    from transformers import HYV4Config

    cfg = HYV4Config(**_COMMON, num_hidden_layers=2, head_dim=24, q_lora_rank=32, indexer_types=["full", "shared"],
                     hc_mult=2)
    model = tiny_model(cfg, 0, torch.float64, "eager")
    with torch.no_grad():  # a different sink per head, so a head's sink on the wrong rank shows
        gen = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=gen, dtype=torch.float64))
    return model


def tiny_mistral_large4(**text):
    from transformers import AutoModelForImageTextToText, MistralLarge4Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                  patch_size=4, image_size=16)
    text = {**_COMMON, "num_hidden_layers": 2, "no_rope_layers": [1, 0], **text}  # layer 1: NoPE
    cfg = MistralLarge4Config(text_config=text, vision_config=vision)
    model = tiny_model(cfg, 0, torch.float64, "sdpa", AutoModelForImageTextToText)
    with torch.no_grad():  # the query scaling's per-head parameters (HF leaves them uninitialised)
        gen = torch.Generator().manual_seed(1)
        for layer in model.model.language_model.layers:
            scaling = layer.self_attn.softmax_scaling
            scaling.scale.copy_(0.3 * torch.randn(scaling.scale.shape, generator=gen, dtype=torch.float64))
            scaling.bias.copy_(1 + 0.3 * torch.randn(scaling.bias.shape, generator=gen, dtype=torch.float64))
    return model


MODELS = {"hy_v4": tiny_hy_v4, "mistral_large4": tiny_mistral_large4}


def _generate(name, model):
    ids, mask = left_padded_prompts(PROMPTS[name], seed=SEEDS[name])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def rank_main(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, make in MODELS.items():
        model = dcp_compile.apply(make(), mesh, page_size=4)
        results[name] = _generate(name, model)
        with torch.no_grad():  # a plain forward of a batch: HF's position ids are then [1, S], broadcast over it
            results[name + "-forward"] = model(_forward_ids()).logits
    results["kv_sharing"] = _raises(dcp_compile.apply, tiny_mistral_large4(kv_source_layers=[0, 0], no_rope_layers=[1, 1]), mesh)
    return results


@lru_cache(maxsize=None)
def reference(name):
    with TopkGapRecorder(TOPK) as gaps, torch.no_grad():
        want = _generate(name, MODELS[name]())
    assert gaps.calls > 0, "the recorder saw no indexer top-k"
    assert gaps.min_gap > MIN_TOPK_GAP, f"{name}: near tie at the top-k boundary ({gaps.min_gap:.2e})"
    return want


_RUNS = []


def run_world():
    if not _RUNS:
        _RUNS.append(run_ranks(rank_main, 2, timeout=600))
    return _RUNS[0]


def _forward_ids():
    return torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def _check(name):
    want_tokens, want_logits = reference(name)
    with torch.no_grad():
        want_forward = MODELS[name]()(_forward_ids()).logits
    for rank, results in enumerate(run_world()):
        tokens, logits = results[name]
        assert torch.equal(tokens, want_tokens), f"{name}, rank {rank}: tokens differ\n{tokens}\n{want_tokens}"
        err = (logits - want_logits).abs().max().item()
        assert err < LOGIT_TOL, f"{name}, rank {rank}: logits differ by {err:.2e}"
        err = (results[name + "-forward"] - want_forward).abs().max().item()
        assert err < LOGIT_TOL, f"{name}, rank {rank}: plain forward logits differ by {err:.2e}"


def test_hy_v4_sinks_gate_shared_indexer_match_single_device_hf():
    _check("hy_v4")


def test_mistral_large4_query_scaling_and_nope_layer_match_single_device_hf():
    _check("mistral_large4")


def test_cross_layer_kv_sharing_is_rejected_before_any_collective():
    errors = [results["kv_sharing"] for results in run_world()]
    assert errors[0] == errors[1], errors
    kind, msg = errors[0]
    assert kind == "UnsupportedModelError", msg
    assert "layer model.language_model.layers.0.self_attn stores its latent cache rows in `shared_kv_states`" in msg, msg
    assert "cross-layer KV sharing" in msg, msg
