"""CUDA graphs (GPU only; skipped without CUDA): ``compile_decode(model)`` (torch.compile mode="reduce-overhead")
replays each decode step as one CUDA graph. Over 96 decode steps of growing length: the same tokens as the eager
DCP model and first-step logits as single-device HF, one Dynamo graph, no CUDA-graph skip, and with a fixed pool
(``cache_budget_tokens``) a second request of the same bucket replays the recorded graph (no new recording).

One process, world 1 over NCCL (the decode step's collectives are absent at world 1; multi-GPU runs are
benchmarks/bench_e2e.py and examples/generate.py --cudagraphs under torchrun)."""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DECODE_STEPS = 96


@pytest.fixture(scope="module")
def mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dcp_compile.testing import free_port

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    yield init_device_mesh("cuda", (1,))


def dense_tiny():
    """The tiny DeepSeek-V3.2 with dense MLPs only (HF's MoE dispatch is not what this test is about), float32
    without TF32, on the GPU."""
    from dcp_compile.testing import tiny_deepseek_v32

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return tiny_deepseek_v32(seed=0, dtype=torch.float32, first_k_dense_replace=2).cuda()


def prompt(length=19, seed=6):
    return torch.randint(2, 128, (1, length), generator=torch.Generator().manual_seed(seed)).cuda()


class GraphRecordings:
    """Counts the CUDA graphs Inductor's cudagraph trees record (one ``CUDAGraphNode`` per recording)."""

    def __enter__(self):
        from torch._inductor import cudagraph_trees

        self.cls, self.count = cudagraph_trees.CUDAGraphNode, 0
        self.init = self.cls.__init__

        def counting_init(node, *args, **kwargs):
            self.count += 1
            self.init(node, *args, **kwargs)

        self.cls.__init__ = counting_init
        return self

    def __exit__(self, *exc):
        self.cls.__init__ = self.init


def test_cuda_graph_decode_matches_eager_and_hf_without_recompiles_or_rerecording(mesh):
    import dcp_compile
    from torch._dynamo.utils import counters

    hf = dense_tiny()
    with torch.no_grad():
        want = hf.generate(prompt(), max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)

    eager = dcp_compile.apply(copy.deepcopy(hf), mesh, page_size=4, cache_budget_tokens=1024)
    eager_tokens = eager.generate(prompt(), max_new_tokens=DECODE_STEPS + 1, do_sample=False)

    graphed = dcp_compile.apply(copy.deepcopy(hf), mesh, page_size=4, cache_budget_tokens=1024)
    dcp_compile.compile_decode(graphed)  # mode="reduce-overhead"
    counters.clear()
    with GraphRecordings() as recordings:
        out = graphed.generate(prompt(), max_new_tokens=DECODE_STEPS + 1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        first_recordings = recordings.count
        again = graphed.generate(prompt(40, seed=7), max_new_tokens=DECODE_STEPS + 1, do_sample=False)
    assert torch.equal(out.sequences, eager_tokens), "CUDA-graph decode tokens differ from the eager DCP model's"
    err = (out.logits[0] - want.logits[0]).norm() / want.logits[0].norm()
    assert err < 1e-4, f"first-step logits differ from HF's by {err:.2e} (relative L2, float32)"
    assert counters["stats"]["unique_graphs"] == 1, counters["stats"]  # one static decode graph
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert first_recordings >= 1, "no CUDA graph was recorded"
    # The second request (same batch, same capacity bucket, the same fixed pool) replays: nothing re-recorded.
    assert recordings.count == first_recordings, (first_recordings, recordings.count)
    eager_again = eager.generate(prompt(40, seed=7), max_new_tokens=DECODE_STEPS + 1, do_sample=False)
    assert torch.equal(again, eager_again)


def test_warm_up_records_what_the_first_requests_replay(mesh):
    """``warm_up`` with a fixed pool: afterwards requests of the warmed batch sizes and capacity buckets compile
    nothing and record no CUDA graph (they replay the warm-up's), with the eager DCP model's tokens."""
    import dcp_compile
    from torch._dynamo.utils import counters

    hf = dense_tiny()
    eager = dcp_compile.apply(copy.deepcopy(hf), mesh, page_size=4, cache_budget_tokens=1024)
    graphed = dcp_compile.apply(copy.deepcopy(hf), mesh, page_size=4, cache_budget_tokens=1024)
    dcp_compile.compile_decode(graphed)
    records = dcp_compile.warm_up(graphed, batch_sizes=(1, 2), contexts=(None, 300))
    assert all(r["skipped"] is None for r in records), records
    requests = [(prompt(19), None), (torch.cat([prompt(19), prompt(19, seed=7)]), None), (prompt(40, seed=8), 300)]
    counters.clear()
    with GraphRecordings() as recordings:
        for ids, positions in requests:
            kwargs = dict(max_new_tokens=24, do_sample=False)
            got = graphed.generate(ids, **kwargs, **({} if positions is None else
                                                     {"cache": graphed.dcp.new_cache(ids.shape[0], positions)}))
            want = eager.generate(ids, **kwargs, **({} if positions is None else
                                                    {"cache": eager.dcp.new_cache(ids.shape[0], positions)}))
            assert torch.equal(got, want), f"request {tuple(ids.shape)}, cache {positions}: tokens differ"
    assert counters["stats"]["unique_graphs"] == 0, counters["stats"]
    assert recordings.count == 0, f"{recordings.count} CUDA graph(s) recorded after warm_up"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
