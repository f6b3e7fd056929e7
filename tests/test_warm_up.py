"""warm_up: the requests it runs compile what a server's first real requests would, so that afterwards those
compile nothing (a fixed pool on 2 gloo ranks, decode compiled with static shapes), with tokens equal to HF; what
it skips (no indexer, a pool too small) and refuses. (On a GPU the same requests compile the Triton kernels and
record the CUDA graphs; the CPU runs the reference ops.)"""
import torch

import dcp_compile
from dcp_compile.testing import run_ranks, tiny_deepseek_v3, tiny_deepseek_v32
from test_compiled_decode import compiled_tiny, prompt
from test_errors import _raises

NEW = 8
# after the warm-up, (batch, cache positions reserved) of the real requests: the first two in the smallest
# capacity bucket (256), the third in 300's (320), as warmed
REQUESTS = [(1, None), (2, None), (1, 300)]


def requests(model):
    for batch, positions in REQUESTS:
        cache = None if positions is None else model.dcp.new_cache(batch, positions)
        yield batch, dict(max_new_tokens=NEW, do_sample=False, **({} if cache is None else {"cache": cache}))


def warmed_run(rank, world, budget):
    from torch._dynamo.utils import counters

    model, _ = compiled_tiny(world, cache_budget_tokens=budget)
    counters.clear()
    records = dcp_compile.warm_up(model, batch_sizes=(1, 2), contexts=(None, 300))
    warm_graphs = counters["stats"]["unique_graphs"]
    after = []
    for batch, kwargs in requests(model):
        counters.clear()
        after.append((model.generate(prompt(19, batch), **kwargs), counters["stats"]["unique_graphs"]))
    return records, warm_graphs, after


def test_warm_up_compiles_what_the_first_requests_would():
    ref = tiny_deepseek_v32(seed=0, dtype=torch.float32)
    with torch.no_grad():
        want = [ref.generate(prompt(19, batch), max_new_tokens=NEW, do_sample=False) for batch, _ in REQUESTS]
    for rank, (records, warm_graphs, after) in enumerate(run_ranks(warmed_run, 2, 2 * 320)):
        ran = [(r["what"], r["batch"], r["prompt"], r["positions"]) for r in records if r["skipped"] is None]
        # the long prompt: index_topk 8 x 2 ranks + a page of 4, so each rank holds more keys than the top-k
        assert ran == [("long prompt", 1, 20, 23), ("decode", 2, 4, 7), ("decode", 2, 4, 300),
                       ("decode", 1, 4, 7), ("decode", 1, 4, 300)], (rank, records)
        assert warm_graphs == 4, f"rank {rank}: the warm-up compiled {warm_graphs} decode graphs, not 2 x 2"
        for (tokens, new_graphs), expected, request in zip(after, want, REQUESTS):
            assert torch.equal(tokens, expected), f"rank {rank}, request {request}: tokens differ from HF"
            assert new_graphs == 0, f"rank {rank}, request {request}: compiled {new_graphs} graph(s) after warm_up"


def skips_and_refusals(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = tiny_deepseek_v32(seed=0, dtype=torch.float32)
    # a fixed pool of 64 token rows: the long prompt (8 + 4 tokens + 1 step) and 2 x 5 positions fit, 2 x 300 not
    dcp_compile.apply(model, mesh, page_size=4, cache_budget_tokens=64)
    records = dcp_compile.warm_up(model, batch_sizes=(2,), contexts=(None, 300), decode_steps=1)
    tokens = model.generate(prompt(19), max_new_tokens=4, do_sample=False)  # the pool still serves a request
    errors = [_raises(dcp_compile.warm_up, model, contexts=(5,)), _raises(dcp_compile.warm_up, model, decode_steps=0),
              _raises(dcp_compile.warm_up, tiny_deepseek_v32(seed=0))]
    dense = tiny_deepseek_v3(seed=0, dtype=torch.float32)
    dcp_compile.apply(dense, mesh, page_size=4)
    return records, tokens, errors, dcp_compile.warm_up(dense, decode_steps=1)


def test_warm_up_skips_what_cannot_run_and_refuses_bad_arguments():
    ref = tiny_deepseek_v32(seed=0, dtype=torch.float32)
    with torch.no_grad():
        want = ref.generate(prompt(19), max_new_tokens=4, do_sample=False)
    ((records, tokens, errors, dense),) = run_ranks(skips_and_refusals, 1)
    assert [(r["what"], r["positions"], r["skipped"] is not None) for r in records] == [
        ("long prompt", 13, False), ("decode", 5, False), ("decode", 300, True)], records
    assert "cannot hold 2 x 300 positions" in records[-1]["skipped"]
    assert torch.equal(tokens, want)
    assert errors[0][0] == "ValueError" and "context 5 is shorter than the warm-up prompt" in errors[0][1], errors
    assert errors[1][0] == "ValueError" and "decode_steps = 0" in errors[1][1], errors
    assert errors[2][0] == "TypeError" and "dcp_compile.apply" in errors[2][1], errors
    assert dense[0]["skipped"] == "no indexer in the model" and dense[1]["skipped"] is None, dense
