"""Bad input fails early, clearly, the same way on every rank, and leaves the model usable."""
import pytest
import torch

import dcp_compile
from dcp_compile.testing import RankFailed, run_ranks, tiny_deepseek_v32


def _raises(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return None, "no exception"


def single_rank_errors(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mesh = init_device_mesh("cpu", (1,))
    out = {}
    out["mesh_2d"] = _raises(dcp_compile.apply, tiny_deepseek_v32(), init_device_mesh("cpu", (1, 1)))
    out["dcp_size"] = _raises(dcp_compile.apply, tiny_deepseek_v32(), mesh, dcp_size=2)
    out["dtype"] = _raises(dcp_compile.apply, tiny_deepseek_v32().to(torch.float8_e4m3fn), mesh)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    out["llama"] = _raises(dcp_compile.apply, llama, mesh)

    def einsum_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scaling + attention_mask
        return torch.einsum("bhqk,bhkd->bqhd", scores.softmax(-1), value), None

    ALL_ATTENTION_FUNCTIONS.register("einsum_attention", einsum_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("einsum_attention", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    out["attention_impl"] = _raises(dcp_compile.apply, tiny_deepseek_v32(attn_implementation="einsum_attention"), mesh)

    model = dcp_compile.apply(tiny_deepseek_v32(), mesh, page_size=4)
    from transformers import DynamicCache

    ids = torch.randint(2, 128, (1, 6))
    out["foreign_cache"] = _raises(model, ids, cache=DynamicCache(config=model.config))
    return out


def test_bad_input_single_rank():
    (out,) = run_ranks(single_rank_errors, 1)
    kind, msg = out["mesh_2d"]
    assert kind == "ValueError" and "1-D" in msg and "(1, 1)" in msg, msg
    kind, msg = out["dcp_size"]
    assert kind == "ValueError" and "dcp_size=2" in msg and "mesh size 1" in msg, msg
    kind, msg = out["dtype"]
    assert kind == "TypeError" and "float8_e4m3fn" in msg, msg
    kind, msg = out["llama"]
    assert kind == "UnsupportedModelError" and "model.layers.0.self_attn" in msg and "not multi-head latent" in msg, msg
    kind, msg = out["attention_impl"]
    assert kind == "MatchError" and "model.layers.0.self_attn" in msg and "attention core" in msg, msg
    kind, msg = out["foreign_cache"]
    assert kind == "TypeError" and "ShardedPagedCache" in msg and "DynamicCache" in msg, msg


def heads_not_divisible(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_deepseek_v32(num_attention_heads=3, num_key_value_heads=3)
    dcp_compile.apply(model, init_device_mesh("cpu", (world,)))


def test_heads_not_divisible_fails_on_every_rank_before_any_collective():
    # If one rank got past validation it would wait in a collective and the run would time out instead.
    with pytest.raises(RankFailed, match=r"3 attention heads are not divisible by the mesh size 2"):
        run_ranks(heads_not_divisible, 2, timeout=120)


def fixed_budget(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    ref = tiny_deepseek_v32(seed=0, dtype=torch.float64)
    model = dcp_compile.apply(tiny_deepseek_v32(seed=0, dtype=torch.float64), init_device_mesh("cpu", (world,)),
                              page_size=4, cache_budget_tokens=16)
    big = torch.randint(2, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    kind, msg = _raises(model.generate, big, max_new_tokens=8, do_sample=False)
    small = big[:, :12]
    want = ref.generate(small, max_new_tokens=8, do_sample=False)
    got = model.generate(small, max_new_tokens=8, do_sample=False)
    return kind, msg, torch.equal(want, got), model.dcp._fixed.storage_bytes()


def test_fixed_budget_too_small_raises_then_smaller_request_works():
    for kind, msg, same, storage in run_ranks(fixed_budget, 2):
        assert kind == "CachePoolExhausted", msg
        # 30 + 8 - 1 = 37 positions: rank 0 owns 19 -> 5 pages of 4 = 20 rows; the pool has 16.
        assert "37 tokens" in msg and "20 token rows" in msg and "16 token rows" in msg, msg
        assert same, "after the failed request, a request that fits must still match HF"
        assert storage == 2 * 16 * (40 + 16) * 8  # the pool stayed fixed: 2 layers x 16 rows x (latent + index)
