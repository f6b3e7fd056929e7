"""apply() then torch.compile(model.forward, backend="inductor"): same tokens as single-device HF, over 32
decode steps of growing length, with at most two Dynamo graphs (prefill + one dynamic decode graph)."""
import pytest
import torch

import dcp_compile
from dcp_compile.testing import TopkGapRecorder, run_ranks, tiny_deepseek_v32, tiny_deepseek_v32_config

NEW_TOKENS = 33  # 1 prefill + 32 decode steps
PROMPT = 19


def prompt():
    return torch.randint(2, 128, (1, PROMPT), generator=torch.Generator().manual_seed(3))


def counting_inductor(graphs: list):
    """A backend that records which dcp and c10d-functional ops each Dynamo graph holds, then compiles it
    with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        ops = [str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function"]
        graphs.append({op: ops.count(op) for op in set(ops) if "dcp" in op or "c10d" in op or "funcol" in op})
        return compile_fx(gm, example_inputs)

    return backend


def compiled_generate(rank, world, merge="reduce_scatter"):
    # float32: HF's float64 MoE path (per-expert loops) breaks Dynamo graphs; the grouped-mm path does not.
    from dcp_compile.ops.distributed import set_merge_scheme

    set_merge_scheme(merge)
    return compiled_run(tiny_deepseek_v32(seed=0, dtype=torch.float32), world, prompt(), NEW_TOKENS)


def compiled_run(model, world, ids, new_tokens):
    """apply (page size 4), compile the forward with Inductor and greedy-generate: (tokens, logits, how many
    Dynamo graphs, the dcp/collective ops of each graph)."""
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh

    dcp_compile.apply(model, init_device_mesh("cpu", (world,)), page_size=4)
    counters.clear()
    graphs: list = []
    model.forward = torch.compile(model.forward, backend=counting_inductor(graphs))
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits), counters["stats"]["unique_graphs"], graphs


@pytest.mark.parametrize("merge", ["reduce_scatter", "all_to_all"])
def test_compiled_generate_matches_hf_with_two_graphs(merge):
    ref = tiny_deepseek_v32(seed=0, dtype=torch.float32)
    with TopkGapRecorder(tiny_deepseek_v32_config().index_topk) as gaps, torch.no_grad():
        want = ref.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    assert gaps.min_gap > 1e-4, f"near tie at the indexer's top-k boundary ({gaps.min_gap:.2e}): change the prompt"
    want_logits = torch.stack(want.logits)
    layers = tiny_deepseek_v32_config().num_hidden_layers
    for rank, (tokens, logits, unique_graphs, graphs) in enumerate(run_ranks(compiled_generate, 2, merge)):
        assert torch.equal(tokens, want.sequences), f"rank {rank}: tokens differ"
        err = (logits - want_logits).abs().max().item()
        assert err < 1e-3, f"rank {rank}: logits differ by {err:.2e} (float32)"
        assert unique_graphs <= 2, f"rank {rank}: {unique_graphs} Dynamo graphs for prefill + 32 decode steps"
        for g in graphs:  # every graph is the whole DCP step: attention, writes and collectives in the graph
            assert g.get("dcp.sparse_mla_attn") == layers, g
            assert g.get("dcp.paged_write") == 2 * layers, g
            assert g.get("dcp.topk_select") == layers, g
            if merge == "reduce_scatter":
                assert sum(v for k, v in g.items() if "all_gather" in k) == 3 * layers, g  # top-k, q, lse
                assert sum(v for k, v in g.items() if "reduce_scatter" in k) == layers, g
            else:  # one all-to-all in place of the lse all-gather and the reduce-scatter
                assert sum(v for k, v in g.items() if "all_gather" in k) == 2 * layers, g  # top-k, q
                assert sum(v for k, v in g.items() if "all_to_all" in k) == layers, g
                assert not any("reduce_scatter" in k for k in g), g
            assert sum(v for k, v in g.items() if "all_reduce" in k) == layers, g  # o_proj
