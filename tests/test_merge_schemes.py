"""The two merges of DCP's partial attention outputs (docs/design.md §4.6): "reduce_scatter" (all-gather the
lse, rescale, reduce-scatter: two collectives; the default) and "all_to_all" (each rank receives its own heads'
partials with their lse: one collective). Real gloo ranks; the float64 model against single-device HF."""
from __future__ import annotations

import pytest
import torch

from dcp_compile.ops.distributed import ALL_TO_ALL, MERGE_SCHEMES, REDUCE_SCATTER, merge_scheme, set_merge_scheme
from dcp_compile.testing import run_ranks

from test_generate_parity import LOGIT_TOL, generate_on_rank, reference

NEG_INF = float("-inf")


def _merge_both_ways(rank, world, heads, dtype):
    """Every rank's partials (some empty: lse -inf with NaN outputs there) merged by both schemes."""
    import torch.distributed as dist

    from dcp_compile.ops import lse_merge

    group = dist.group.WORLD.group_name
    gen = torch.Generator().manual_seed(10 + rank)
    T, D = 5, 7
    out = torch.randn(T, world * heads, D, generator=gen, dtype=torch.float64).to(dtype)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as sparse_mla_attn returns it
    lse = torch.randn(T, world * heads, generator=gen, dtype=torch.float64).to(lse_dtype)
    empty = torch.rand(T, world * heads, generator=gen) < 0.3
    empty[0] = rank != 0  # query 0: only rank 0 has rows
    empty[1] = True  # query 1: no rank has rows
    lse = torch.where(empty, NEG_INF, lse)
    out = torch.where(empty[..., None], torch.tensor(float("nan"), dtype=dtype), out)
    results = {}
    for scheme in MERGE_SCHEMES:
        set_merge_scheme(scheme)
        merged, total = lse_merge(out, lse, group, world, lse_of_rank=rank)
        results[scheme] = (merged, total, lse_merge(out, lse, group, world))
    set_merge_scheme(REDUCE_SCATTER)
    return results


@pytest.mark.parametrize("world,heads,dtype", [(2, 3, torch.float64), (3, 2, torch.float32), (2, 4, torch.bfloat16)])
def test_merge_schemes_agree(world, heads, dtype):
    for rank, results in enumerate(run_ranks(_merge_both_ways, world, heads, dtype)):
        (m_rs, t_rs, plain_rs), (m_a2a, t_a2a, plain_a2a) = results[REDUCE_SCATTER], results[ALL_TO_ALL]
        assert m_a2a.shape == m_rs.shape == (5, heads, 7) and m_a2a.dtype == m_rs.dtype
        assert not m_a2a.isnan().any() and not m_rs.isnan().any(), f"rank {rank}: an empty part leaked NaN"
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(m_a2a, m_rs, rtol=tol, atol=tol)
        torch.testing.assert_close(plain_a2a, m_rs, rtol=tol, atol=tol)
        torch.testing.assert_close(t_a2a, t_rs, rtol=tol, atol=tol)
        assert (m_a2a[1] == 0).all() and (t_a2a[1] == NEG_INF).all(), "a query no rank has rows for: 0 and -inf"


def _generate_all_to_all(rank, world, dcp_size, interleave, impl, prompts):
    set_merge_scheme(ALL_TO_ALL)
    return generate_on_rank(rank, world, dcp_size, interleave, impl, prompts)


@pytest.mark.parametrize("world,interleave", [(2, 1), (4, 2)])
def test_generate_with_all_to_all_merge_matches_hf(world, interleave):
    prompts = ("mixed",)
    per_rank = run_ranks(_generate_all_to_all, world, None, interleave, "sdpa", prompts)
    want_tokens, want_logits, _ = reference("sdpa", "mixed")
    for rank, results in enumerate(per_rank):
        tokens, logits, _, _ = results["mixed"]
        assert torch.equal(tokens, want_tokens), f"rank {rank}: tokens differ"
        err = (logits - want_logits).abs().max().item()
        assert err < LOGIT_TOL, f"rank {rank}: logits differ by {err:.2e}"


def test_merge_scheme_is_checked():
    assert merge_scheme() == REDUCE_SCATTER  # the default, until the other is measured on GPUs
    with pytest.raises(ValueError, match="unknown merge scheme 'gather'"):
        set_merge_scheme("gather")
