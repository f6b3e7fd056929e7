"""Dense MLA (DeepSeek-V3 / R1, Kimi-K2, DeepSeek-V2: no indexer) through dcp_compile.apply on gloo CPU ranks gives
the tokens of the unmodified model in one process.

Each rank attends every row it owns that the mask allows (the "owned rows" selection, docs/design.md §4.2) and
the LSE merge makes the union exact, so the reference is plain single-device HF. float64; left-padded batches
with "sdpa" (HF's eager path turns padded rows into NaN in float64, see test_generate_parity.py), an unpadded
prompt with "eager". One spawn per world size runs every case of that size (tests share it).
"""
from functools import lru_cache

import pytest
import torch

import dcp_compile
from dcp_compile.testing import hf_cache_bytes, left_padded_prompts, run_ranks, tiny_deepseek_v2, tiny_deepseek_v3

PAGE = 4
NEW_TOKENS = 12
LOGIT_TOL = 1e-5  # HF's eager softmax rounds through float32 (test_generate_parity.py)
PROMPTS = {"long": (29,), "mixed": (6, 17, 29)}  # "mixed": batch 3, left padded, with attention_mask
MODELS = {"v3": tiny_deepseek_v3, "v2": tiny_deepseek_v2}

# world -> cases (name, model, attention implementation, prompt, dcp_size (None = world), interleave)
CASES = {
    1: [("v3-eager", "v3", "eager", "long", None, 1), ("v3-sdpa", "v3", "sdpa", "mixed", None, 1),
        ("v2-sdpa", "v2", "sdpa", "mixed", None, 1)],
    2: [("v3-sdpa", "v3", "sdpa", "mixed", None, 1), ("v3-eager-interleave=page", "v3", "eager", "long", None, PAGE),
        ("v2-sdpa", "v2", "sdpa", "mixed", None, 1)],
    4: [("v3-sdpa-interleave=page", "v3", "sdpa", "mixed", None, PAGE), ("v3-dcp2-sdpa", "v3", "sdpa", "mixed", 2, 1),
        ("v2-eager", "v2", "eager", "long", None, 1)],
}
# float32 (HF's float64 MoE path breaks Dynamo graphs); one layer keeps Inductor's CPU compile short.
COMPILE_WORLD, COMPILE_PROMPT, COMPILE_TOKENS, COMPILE_LAYERS = 2, 19, 9, 1  # 1 prefill + 8 decode steps


def _generate(model, prompt: str):
    ids, mask = left_padded_prompts(PROMPTS[prompt], seed=len(prompt))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits), out.cache


@lru_cache(maxsize=None)
def reference(model: str, impl: str, prompt: str):
    with torch.no_grad():
        tokens, logits, cache = _generate(MODELS[model](dtype=torch.float64, attn_implementation=impl), prompt)
    return tokens, logits, hf_cache_bytes(cache)


def _compile_prompt():
    return torch.randint(2, 128, (1, COMPILE_PROMPT), generator=torch.Generator().manual_seed(3))


def _compiled(world):
    from test_compile import compiled_run

    model = tiny_deepseek_v3(dtype=torch.float32, num_hidden_layers=COMPILE_LAYERS)
    return compiled_run(model, world, _compile_prompt(), COMPILE_TOKENS)


def rank_main(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    for name, which, impl, prompt, dcp_size, interleave in CASES[world]:
        model = MODELS[which](dtype=torch.float64, attn_implementation=impl)
        dcp_compile.apply(model, init_device_mesh("cpu", (world,)), dcp_size=dcp_size, page_size=PAGE,
                          interleave=interleave)
        tokens, logits, cache = _generate(model, prompt)
        results[name] = dict(tokens=tokens, logits=logits, bytes=cache.storage_bytes(), index_pools=len(cache.index_keys),
                             row_bytes=model.dcp.cache_format.latent_dim * 8, layers=len(model.dcp.cache_format.layer_ids))
        if impl == "sdpa":  # a plain forward with no cache (scoring a text) over the padded batch
            ids, mask = left_padded_prompts(PROMPTS[prompt], seed=len(prompt))
            with torch.no_grad():
                results[name]["forward"] = model(ids, attention_mask=mask).logits
    if world == COMPILE_WORLD:
        results["compiled"] = _compiled(world)
    return results


_RUNS: dict[int, list] = {}


def run_world(world):
    if world not in _RUNS:
        _RUNS[world] = run_ranks(rank_main, world, timeout=900)
    return _RUNS[world]


@pytest.mark.parametrize("world", sorted(CASES))
def test_dense_mla_generate_matches_single_device_hf(world):
    per_rank = run_world(world)
    for name, which, impl, prompt, dcp_size, _ in CASES[world]:
        want_tokens, want_logits, hf_bytes = reference(which, impl, prompt)
        dcp = dcp_size or world
        batch = len(PROMPTS[prompt])
        for rank, results in enumerate(per_rank):
            got = results[name]
            assert torch.equal(got["tokens"], want_tokens), f"rank {rank}, {name}: tokens differ"
            err = (got["logits"] - want_logits).abs().max().item()
            assert err < LOGIT_TOL, f"rank {rank}, {name}: logits differ by {err:.2e}"
            # Per-rank storage: the latent pool only (no indexer, no index pool), 1/dcp of HF's single-device
            # cache plus at most one page per sequence per layer.
            assert got["index_pools"] == 0, f"{name}: a dense MLA cache has no index pool"
            one_page = got["layers"] * batch * PAGE * got["row_bytes"]
            assert got["bytes"] <= hf_bytes / dcp + one_page, (rank, name, got["bytes"], hf_bytes, one_page)
            if dcp > 1:
                assert got["bytes"] < hf_bytes, f"{name}: the cache is not sharded"
            if "forward" in got:  # left padding: compare the real (unpadded) positions
                ids, mask = left_padded_prompts(PROMPTS[prompt], seed=len(prompt))
                with torch.no_grad():
                    want = MODELS[which](dtype=torch.float64, attn_implementation=impl)(ids, attention_mask=mask).logits
                err = (got["forward"] - want)[mask.bool()].abs().max().item()
                assert err < LOGIT_TOL, f"rank {rank}, {name}: plain forward logits differ by {err:.2e}"


def test_dense_mla_compiled_generate_matches_hf_with_two_graphs():
    ref = tiny_deepseek_v3(dtype=torch.float32, num_hidden_layers=COMPILE_LAYERS)
    with torch.no_grad():
        want = ref.generate(_compile_prompt(), max_new_tokens=COMPILE_TOKENS, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    layers = ref.config.num_hidden_layers
    for rank, results in enumerate(run_world(COMPILE_WORLD)):
        tokens, logits, unique_graphs, graphs = results["compiled"]
        assert torch.equal(tokens, want.sequences), f"rank {rank}: tokens differ"
        err = (logits - torch.stack(want.logits)).abs().max().item()
        assert err < 1e-3, f"rank {rank}: logits differ by {err:.2e} (float32)"
        assert unique_graphs <= 2, f"rank {rank}: {unique_graphs} Dynamo graphs for prefill + decode"
        for g in graphs:  # the whole DCP step is in the graph; no indexer, no top-k exchange
            assert g.get("dcp.sparse_mla_attn") == layers, g
            assert g.get("dcp.paged_write") == layers, g  # latent rows only
            assert "dcp.topk_select" not in g and "dcp.indexer_scores" not in g, g
            assert sum(v for k, v in g.items() if "all_gather" in k) == 2 * layers, g  # q, lse
            assert sum(v for k, v in g.items() if "reduce_scatter" in k) == layers, g
            assert sum(v for k, v in g.items() if "all_reduce" in k) == layers, g  # o_proj


def test_owned_rows_are_every_causal_unmasked_row_of_the_rank_compacted_in_order():
    from dcp_compile.attention import AttentionConfig, OwnedRows
    from dcp_compile.cache import StepPositions
    from dcp_compile.contract import LayerCacheState
    from dcp_compile.layout import DCPLayout

    batch, past, steps, pad = 2, 9, 3, (0, 5)  # sequence 1 is left padded by 5 positions
    total = past + steps
    for world, interleave in ((1, 1), (2, 1), (3, 2)):
        layout = DCPLayout(world, interleave, PAGE)
        for rank in range(world):
            pages = -(-layout.local_bound(total) // PAGE)
            block_table = (torch.arange(batch * pages, dtype=torch.int32).flip(0) * 2).view(batch, pages)  # odd order
            mask = torch.ones(batch, 1, steps, total, dtype=torch.bool)
            for b, p in enumerate(pad):
                mask[b, ..., :p] = False
            config = AttentionConfig(heads=1, nope_dim=1, rope_dim=1, latent_dim=1, v_dim=1, topk=None, attn_scale=1.0,
                                     index_scale=None, layout=layout, rank=rank, group_name=None, selection="owned_rows")
            at = StepPositions.of(layout, rank, block_table, past, steps, batch)
            slots, counts = OwnedRows(config).select(mask, LayerCacheState(None, None, block_table, at.new, at.keys, at.key_slots), at)
            assert slots.shape == (batch * steps, layout.local_bound(total))
            for t in range(batch * steps):
                b, q = t // steps, past + t % steps
                mine = [p for p in range(pad[b], q + 1) if int(layout.owner(p)) == rank]  # position order
                want = [int(layout.slot(block_table[b], torch.tensor([layout.local_index(p)]))) for p in mine]
                n = int(counts[t])
                assert slots[t, :n].tolist() == want and (slots[t, n:] == -1).all(), (world, rank, t, slots[t], want)


def test_dense_layer_whose_mask_is_changed_before_attention_is_rejected():
    """Without an indexer the layer must attend what its attention mask allows: a mask the layer changes itself
    (a selection dcp_compile does not know) is a MatchError naming the layer, not a silently wrong rewrite."""
    from dcp_compile.api import capture_and_match
    from dcp_compile.capture import probe_layers
    from dcp_compile.match import MatchError

    model = tiny_deepseek_v3(attn_implementation="sdpa")
    attn = model.model.layers[0].self_attn
    forward = attn.forward

    def banded(*args, attention_mask=None, **kwargs):  # keep only the last 4 positions: a selection of its own
        if attention_mask is not None:  # (sdpa's prefill without padding has none)
            band = torch.ones_like(attention_mask).tril(attention_mask.shape[-1] - attention_mask.shape[-2])
            attention_mask = attention_mask & band.triu(attention_mask.shape[-1] - attention_mask.shape[-2] - 3)
        return forward(*args, attention_mask=attention_mask, **kwargs)

    attn.forward = banded
    with pytest.raises(MatchError, match=r"layer model.layers.0.self_attn: .* attention core applies a mask computed "
                                         r"by aten.__and__.*, not the layer's attention_mask input"):
        capture_and_match(probe_layers(model)[0])
