"""GLM-MoE-DSA (transformers ``GlmMoeDsaForCausalLM``) through dcp_compile.apply on 2 gloo ranks gives the
greedy tokens of the unmodified model in one process.

GLM-like shapes where they differ from the tiny DeepSeek-V3.2: the query/key no-RoPE width (24) differs from
the value width (32), the latent is 48 wide. Two models: every layer running its own indexer (indexer_types
"full"), and shared-indexer layers (``["full", "shared", "shared", "full"]``: a "shared" layer reuses the
previous layer's top-k, handed to it as ``prev_topk_indices``). Under DCP a shared layer reuses the previous
layer's *distributed* selection — this rank's compacted rows and counts, which the full layer hands on in place
of its top-k indices — with no indexer, no top-k and no candidate exchange of its own. float64 and a
left-padded batch with sdpa, as in test_generate_parity.py; the reference asserts that no indexer top-k had a
near tie, so the two runs can only differ by a real error.
"""
import torch

import dcp_compile
from dcp_compile.testing import TopkGapRecorder, left_padded_prompts, run_ranks

PROMPTS = (9, 23)  # batch 2, left padded; both longer than index_topk
NEW_TOKENS = 16
TOPK = 8
LOGIT_TOL = 1e-5
MIN_TOPK_GAP = 2e-5


SHARED = ("full", "shared", "shared", "full")


def tiny_glm_moe_dsa(seed: int = 0, indexer_types=("full", "full")):
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    cfg = GlmMoeDsaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=len(indexer_types),
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=48, qk_rope_head_dim=8,
        qk_nope_head_dim=24, v_head_dim=32, index_n_heads=8, index_head_dim=16, index_topk=TOPK, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, indexer_types=list(indexer_types),
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(cfg)
    with torch.no_grad():  # as tiny_deepseek_v32: attention far from uniform, indexer scores well separated
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model.to(torch.float64).eval()


def _generate(model):
    ids, mask = left_padded_prompts(PROMPTS, seed=3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


class CountOps:
    """Counts the dcp ops and collectives run under it (a dispatch mode: it sees every op the eager layers run)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if "dcp" in name or "c10d" in name:
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def generate_on_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    model = dcp_compile.apply(tiny_glm_moe_dsa(), init_device_mesh("cpu", (world,)), page_size=4)
    shared = dcp_compile.apply(tiny_glm_moe_dsa(indexer_types=SHARED), init_device_mesh("cpu", (world,)), page_size=4)
    selections = [m.dcp_graph.dcp_attention.config.selection for m in shared.modules() if hasattr(m, "dcp_graph")]
    with CountOps() as ops:
        tokens, logits = _generate(shared)
    cache = shared.dcp.new_cache(1, 8)
    return _generate(model), (tokens, logits, selections, ops.counts, sorted(cache.index_keys))


def _check(name, per_rank_results, want_tokens, want_logits):
    for rank, (tokens, logits) in enumerate(per_rank_results):
        assert torch.equal(tokens, want_tokens), f"{name}, rank {rank}: tokens differ\n{tokens}\n{want_tokens}"
        err = (logits - want_logits).abs().max().item()
        assert err < LOGIT_TOL, f"{name}, rank {rank}: logits differ by {err:.2e}"


_RUNS = []


def run_world():
    if not _RUNS:
        _RUNS.append(run_ranks(generate_on_rank, 2))
    return _RUNS[0]


def _reference(model):
    with TopkGapRecorder(TOPK) as gaps, torch.no_grad():
        want = _generate(model)
    assert gaps.calls > 0, "the recorder saw no indexer top-k"
    assert gaps.min_gap > MIN_TOPK_GAP, f"test input has a near tie at the top-k boundary ({gaps.min_gap:.2e})"
    return want


def test_glm_moe_dsa_generate_matches_single_device_hf():
    _check("full", [full for full, _ in run_world()], *_reference(tiny_glm_moe_dsa()))


def test_glm_shared_indexer_layers_reuse_the_distributed_selection():
    per_rank = run_world()
    _check("shared", [shared[:2] for _, shared in per_rank], *_reference(tiny_glm_moe_dsa(indexer_types=SHARED)))
    forwards = NEW_TOKENS  # one prefill + NEW_TOKENS - 1 decode steps
    full_layers = SHARED.count("full")
    for rank, (_, (_, _, selections, ops, index_pools)) in enumerate(per_rank):
        assert selections == ["indexer_topk", "handed", "handed", "indexer_topk"], selections
        # Only the full layers score and exchange candidates; every layer attends and merges.
        assert ops["dcp.indexer_scores"] == ops["dcp.topk_select"] == full_layers * forwards, ops
        assert ops["dcp.sparse_mla_attn"] == ops["dcp.lse_combine"] == len(SHARED) * forwards, ops
        gathers = sum(v for k, v in ops.items() if "all_gather" in k)
        assert gathers == (full_layers * 3 + (len(SHARED) - full_layers) * 2) * forwards, ops  # top-k, q, lse
        assert index_pools == [0, 3], f"rank {rank}: index pools for layers {index_pools}, not only the full ones"
