"""What HF users do with generate, on the DCP model, against the unmodified model in one process: a cache held
across turns, a padded batch without a mask, several return sequences, no cache, prompt-lookup and assisted
decoding; and each thing DCP cannot do raises a clear error instead of returning something wrong.

float64 and sdpa (HF's eager path is NaN for padded rows in float64); every rank runs the reference itself.
"""
import pytest
import torch

import dcp_compile
from dcp_compile.testing import left_padded_prompts, run_ranks, tiny_deepseek_v32

PAGE = 4


def model_pair(heads: int = 4):
    """(unmodified reference, model to apply) with the same weights."""
    kw = dict(seed=0, dtype=torch.float64, attn_implementation="sdpa", num_attention_heads=heads, num_key_value_heads=heads)
    return tiny_deepseek_v32(**kw), tiny_deepseek_v32(**kw)


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)


def three_turns(model, ref, how: str):
    """Turns of a batch-2 left-padded conversation with one held cache: each turn passes the whole
    conversation so far plus new user tokens (HF's pattern); HF's own DynamicCache is the reference."""
    from transformers import DynamicCache

    ids, mask = left_padded_prompts((6, 13), seed=1)
    cache, ref_cache = model.dcp.new_cache(2, 96), DynamicCache(config=ref.config)
    same, lengths = [], []
    for turn in range(3):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **{how: cache})
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache=ref_cache)
        same.append(torch.equal(got, want))
        lengths.append((cache.get_seq_length(), ref_cache.get_seq_length()))
        user = torch.randint(2, 128, (2, 4), generator=torch.Generator().manual_seed(turn))
        ids = torch.cat([got, user], dim=1)
        mask = torch.cat([mask, torch.ones(2, got.shape[1] - mask.shape[1] + 4, dtype=mask.dtype)], dim=1)
    # Continue from a cache that already holds more positions than the new input: only the new tokens are
    # passed, with the mask of the whole conversation.
    new = ids[:, -4:]
    got = model.generate(new, attention_mask=mask, max_new_tokens=4, do_sample=False, cache=cache)
    want = ref.generate(new, attention_mask=mask, max_new_tokens=4, do_sample=False, cache=ref_cache)
    same.append(torch.equal(got, want))
    return same, lengths


def multi_turn_on_rank(rank, world, heads):
    from torch.distributed.device_mesh import init_device_mesh

    ref, model = model_pair(heads)
    dcp_compile.apply(model, init_device_mesh("cpu", (world,)), page_size=PAGE)
    return {how: three_turns(model, ref, how) for how in ("cache", "past_key_values")}


@pytest.mark.parametrize("world,heads", [(1, 4), (2, 4), (3, 6)], ids=["world1", "world2", "world3"])
def test_multi_turn_with_a_held_cache_matches_hf(world, heads):
    for rank, results in enumerate(run_ranks(multi_turn_on_rank, world, heads)):
        for how, (same, lengths) in results.items():
            assert all(same), f"rank {rank}, cache passed as {how}: turns equal to HF {same}"
            assert all(a == b for a, b in lengths), f"rank {rank}: cached positions {lengths} (DCP, HF)"


def usage_on_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    ref, model = model_pair()
    mesh = init_device_mesh("cpu", (world,))
    dcp_compile.apply(model, mesh, page_size=PAGE)
    ids, mask = left_padded_prompts((6, 13), seed=1)
    one = ids[1:]
    out = {}
    # HF infers the mask from the pad token when none is given: it must see the model's own signature.
    out["no mask"] = torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                                 ref.generate(ids, max_new_tokens=6, do_sample=False))

    def sampled(m):
        torch.manual_seed(5)
        return m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=2)

    got, want = sampled(model), sampled(ref)
    out["num_return_sequences"] = (torch.equal(got, want), tuple(got.shape))
    out["use_cache=False"] = torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False),
                                         ref.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False))
    out["prompt lookup"] = torch.equal(model.generate(one, max_new_tokens=10, prompt_lookup_num_tokens=3),
                                       ref.generate(one, max_new_tokens=10, prompt_lookup_num_tokens=3))
    assistant = tiny_deepseek_v32(seed=1, dtype=torch.float64, attn_implementation="sdpa")
    out["assisted"] = torch.equal(model.generate(one, max_new_tokens=10, assistant_model=assistant),
                                  ref.generate(one, max_new_tokens=10, assistant_model=assistant))

    # What DCP cannot do is an error, never a silent difference; the model stays usable after each.
    out["output_attentions"] = _outcome(lambda: model.generate(one, max_new_tokens=2, output_attentions=True,
                                                               return_dict_in_generate=True))
    out["save_pretrained"] = _outcome(lambda: model.save_pretrained("unused-directory"))
    out["apply twice"] = _outcome(lambda: dcp_compile.apply(model, mesh))
    out["backward"] = _outcome(lambda: model(one).logits.sum().backward())
    out["beam search"] = _outcome(lambda: model.generate(one, max_new_tokens=2, num_beams=2))
    moved = dcp_compile.apply(tiny_deepseek_v32(seed=0, dtype=torch.float64), mesh, page_size=PAGE)
    moved.to(torch.float32)
    out["to(dtype)"] = _outcome(lambda: moved(one))
    out["after errors"] = torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                                      ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    return out


def test_generate_usage_matches_hf_or_raises_clearly():
    for rank, out in enumerate(run_ranks(usage_on_rank, 2)):
        for case in ("no mask", "use_cache=False", "prompt lookup", "assisted", "after errors"):
            assert out[case] is True, f"rank {rank}: {case} differs from HF"
        same, shape = out["num_return_sequences"]
        assert same and shape[0] == 4, f"rank {rank}: num_return_sequences=2 gave {shape}, equal to HF: {same}"
        kind, msg = out["output_attentions"]
        assert kind == "NotImplementedError" and "output_attentions" in msg and "dense attention" in msg, msg
        kind, msg = out["save_pretrained"]
        assert kind == "RuntimeError" and "save the model before apply" in msg, msg
        kind, msg = out["apply twice"]
        assert kind == "RuntimeError" and "already applied" in msg, msg
        kind, msg = out["backward"]
        assert kind == "RuntimeError" and "inference" in msg, msg
        kind, msg = out["beam search"]
        assert kind == "NotImplementedError" and "beam search" in msg, msg
        kind, msg = out["to(dtype)"]
        assert kind == "RuntimeError" and "torch.float32" in msg and "torch.float64" in msg and "before apply" in msg, msg
