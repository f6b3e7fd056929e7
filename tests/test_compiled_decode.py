"""compile_decode: decode steps compiled once per (batch size, capacity bucket) with fully static shapes, prefill
eager; tokens equal to single-device HF over 96 decode steps on 2 gloo ranks. (CUDA graphs on top of this
are tests/test_cuda_graphs.py, on a GPU.)"""
import pytest
import torch

import dcp_compile
from dcp_compile.testing import TopkGapRecorder, run_ranks, tiny_deepseek_v32, tiny_deepseek_v32_config

DECODE_STEPS = 96


def prompt(length: int, batch: int = 1, seed: int = 6):  # seed 6: no near tie at the top-k boundary
    return torch.randint(2, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


REQUESTS = [  # (prompt length, batch): the first two share a capacity bucket (<= 256 positions), the third does not
    (19, 1), (40, 1), (19, 2),
]


def static_graph_recorder(graphs: list):
    """A backend that records, per Dynamo graph, the symbolic sizes among its inputs (none for a static graph),
    then compiles it with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        symbolic = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.SymInt)
                    or (isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape))]
        graphs.append(symbolic)
        return compile_fx(gm, example_inputs)

    return backend


def compiled_tiny(world: int, **apply_kwargs):
    """In a rank of ``run_ranks``: the tiny model applied over ``world`` CPU ranks (page size 4) with its decode
    compiled by Inductor without CUDA graphs, and the list that records its decode graphs' symbolic inputs."""
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_deepseek_v32(seed=0, dtype=torch.float32)
    dcp_compile.apply(model, init_device_mesh("cpu", (world,)), page_size=4, **apply_kwargs)
    graphs: list = []
    dcp_compile.compile_decode(model, mode=None, backend=static_graph_recorder(graphs))
    return model, graphs


def compiled_decode_run(rank, world):
    from torch._dynamo.utils import counters

    model, graphs = compiled_tiny(world)
    results = []
    for length, batch in REQUESTS:
        counters.clear()
        out = model.generate(prompt(length, batch), max_new_tokens=DECODE_STEPS + 1, do_sample=False)
        results.append((out, counters["stats"]["unique_graphs"]))
    # release_decode (what a process calls before destroy_process_group): eager again, nothing compiled
    dcp_compile.release_decode(model)
    counters.clear()
    length, batch = REQUESTS[0]
    out = model.generate(prompt(length, batch), max_new_tokens=DECODE_STEPS + 1, do_sample=False)
    released = (out, counters["stats"]["unique_graphs"], hasattr(model.forward, "dcp_decode"))
    return results, graphs, released


def test_decode_compiles_once_per_batch_and_bucket_with_static_shapes_and_matches_hf():
    ref = tiny_deepseek_v32(seed=0, dtype=torch.float32)
    want = []
    with TopkGapRecorder(tiny_deepseek_v32_config().index_topk) as gaps, torch.no_grad():
        for length, batch in REQUESTS:
            want.append(ref.generate(prompt(length, batch), max_new_tokens=DECODE_STEPS + 1, do_sample=False))
    if gaps.min_gap <= 1e-4:
        pytest.fail(f"near tie at the indexer's top-k boundary ({gaps.min_gap:.2e}): change the prompts")
    for rank, (results, graphs, released) in enumerate(run_ranks(compiled_decode_run, 2)):
        for (tokens, new_graphs), expected, request in zip(results, want, REQUESTS):
            assert torch.equal(tokens, expected), f"rank {rank}, request {request}: tokens differ from HF"
        # prefill runs eagerly; decode: one graph for (batch 1, bucket 256), reused by the second request,
        # one more for batch 2
        assert [n for _, n in results] == [1, 0, 1], f"rank {rank}: decode graphs per request {[n for _, n in results]}"
        assert graphs == [[], []], f"rank {rank}: symbolic inputs in the decode graphs: {graphs}"
        tokens, new_graphs, still_compiled = released
        assert torch.equal(tokens, want[0]) and new_graphs == 0 and not still_compiled, (rank, new_graphs)


def test_compile_decode_needs_apply():
    with pytest.raises(TypeError, match="dcp_compile.apply"):
        dcp_compile.compile_decode(torch.nn.Linear(2, 2))


def long_decode_run(rank, world, steps):
    from torch._dynamo.utils import counters

    model, graphs = compiled_tiny(world)
    counters.clear()
    out = model.generate(prompt(19), max_new_tokens=steps + 1, do_sample=False)
    return out, counters["stats"]["unique_graphs"], graphs, dict(counters["recompiles"])


def test_512_decode_steps_one_static_graph():
    """The issue's bar: no recompilation across 512 decode steps of growing length (2 ranks)."""
    results = run_ranks(long_decode_run, 2, 512)
    (tokens0, *_), (tokens1, *_) = results
    assert tokens0.shape[1] == 19 + 513 and torch.equal(tokens0, tokens1)
    for rank, (_, unique, graphs, recompiles) in enumerate(results):
        assert unique == 1 and graphs == [[]], f"rank {rank}: {unique} graphs, symbolic inputs {graphs}"
        assert not recompiles, f"rank {rank}: recompiles {recompiles}"


def short_prompt_run(rank, world):
    from torch._dynamo.utils import counters

    model, _ = compiled_tiny(world)
    out = []
    for length in (5, 9):
        counters.clear()
        out.append((model.generate(prompt(length), max_new_tokens=6, do_sample=False),
                    counters["stats"]["unique_graphs"]))
    return out


def test_short_prompts_prefill_eagerly():
    """A prompt of at most STATIC_STEP_TOKENS tokens is a request's first step, a prefill: it runs eagerly, so
    prompts of 5 and 9 tokens share the one decode graph (compiled as static steps, each length would be a graph
    of its own), with tokens equal to HF."""
    ref = tiny_deepseek_v32(seed=0, dtype=torch.float32)
    with TopkGapRecorder(tiny_deepseek_v32_config().index_topk) as gaps, torch.no_grad():
        want = [ref.generate(prompt(length), max_new_tokens=6, do_sample=False) for length in (5, 9)]
    if gaps.min_gap <= 1e-4:
        pytest.fail(f"near tie at the indexer's top-k boundary ({gaps.min_gap:.2e}): change the prompts")
    ((first, second),) = run_ranks(short_prompt_run, 1)
    assert torch.equal(first[0], want[0]) and torch.equal(second[0], want[1])
    assert (first[1], second[1]) == (1, 0), f"graphs compiled per request: {first[1]}, {second[1]}"
