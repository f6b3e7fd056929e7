"""Op-level DCP parity: the distributed pipeline on N ∈ {1,2,3,4} gloo ranks

    owner-only paged_write -> indexer_scores on own keys -> distributed_topk -> all_gather_heads
    -> sparse_mla_attn -> lse_merge

equals an independent single-process dense float64 reference (dense indexer scores over every causal
position, exact top-K, softmax over the selected set with plain torch) to 1e-10.

Everything is float64 except the indexer scores, which the ops define as fp32: the reference computes its
scores with the same fp32 arithmetic and asserts that the K-th / (K+1)-th gap of every query is far above fp32
noise, so the selected set is unambiguous. A second check uses small-integer (exactly representable) scores
with many ties, where the selection is defined by the tie rule (higher score, then lower position).

One spawn per world size; each rank runs every configuration (interleave 1, 2 and P; cache-allocated and
random page ids; prefill then decode steps; left padding; a query whose whole selection lives on one rank;
queries with fewer candidates than K; a query with none).
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from dcp_compile.layout import DCPLayout
from dcp_compile.attention import AttentionConfig, DCPSparseMLA
from dcp_compile.cache import StepPositions
from dcp_compile.contract import LayerCacheState
from dcp_compile.ops import all_gather_heads, distributed_topk, lse_merge
from dcp_compile.testing import run_ranks

NEG_INF = float("-inf")
TOL = 1e-10

# Static sizes: latent (c) width, rope width, index heads/width, query heads per rank.
D_C, D_ROPE, H_IDX, D_IDX, H_LOCAL = 8, 4, 3, 8, 2
D_K = D_C + D_ROPE

CONFIGS = [
    # interleave, page size, topk K, chunk sizes (prefill first, then decode steps), own random page ids
    dict(interleave=1, page_size=4, topk=6, chunks=(21, 1, 2, 1), random_pages=True),
    dict(interleave=4, page_size=4, topk=6, chunks=(27, 3, 2), random_pages=True),
    dict(interleave=2, page_size=3, topk=5, chunks=(1, 1, 22, 1), random_pages=True),
]
BATCH = 2
PAD = 3  # sequence 1 is left-padded: its first PAD positions are never keys


# --- inputs (identical on every rank: same seed) ----------------------------------------------------------------
def make_inputs(cfg, world, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(cfg["chunks"])
    heads = H_LOCAL * world
    x = dict(
        q=torch.randn(BATCH, total, heads, D_K, generator=g, dtype=torch.float64),  # absorbed queries
        kv=torch.randn(BATCH, total, D_K, generator=g, dtype=torch.float64),  # latent rows c ‖ k_rope
        k_idx=torch.randn(BATCH, total, D_IDX, generator=g, dtype=torch.float64),
        q_idx=torch.randn(BATCH, total, H_IDX, D_IDX, generator=g, dtype=torch.float64),
        w_idx=torch.randn(BATCH, total, H_IDX, generator=g, dtype=torch.float64),
    )
    # Mostly positive index dot products (relu still clips some): exact-zero scores, which would tie, are rare.
    x["q_idx"] = x["q_idx"] * 0.5 + 1.0
    x["k_idx"] = x["k_idx"] * 0.5 + 0.5
    # Sequence 1: every key NOT owned by the last rank scores ~0, the last rank's keys score high, so the late
    # queries' whole selection lives on one rank and every other rank is empty.
    layout = DCPLayout(world, cfg["interleave"], cfg["page_size"])
    target = world - 1
    pos = torch.arange(total)
    other = layout.owner(pos) != target
    x["k_idx"][1, other] *= 1e-3
    x["k_idx"][1, ~other] = x["k_idx"][1, ~other].abs() + 0.5
    x["q_idx"][1] = x["q_idx"][1].abs()
    x["w_idx"][1] = x["w_idx"][1].abs() + 0.1
    x["pad"] = torch.zeros(BATCH, total, dtype=torch.bool)
    x["pad"][1, :PAD] = True
    x["target"] = target
    return x


# --- the independent dense reference -------------------------------------------------------------------------
def fp32_scores(q_idx, w_idx, k_idx, scale):
    """Σ_h w_h relu(scale · q_h·k_t) in fp32 for one query against keys [L, Di]."""
    dots = torch.relu((k_idx.float() @ q_idx.float().T) * scale)  # [L, Hi]
    return dots @ w_idx.float()  # [L]


def dense_reference(x, cfg, idx_scale, attn_scale):
    """Per (b, p): selected positions (ordered as the tie rule orders them) and the [H, D_C] attention output."""
    K = cfg["topk"]
    B, total = x["kv"].shape[:2]
    heads = x["q"].shape[2]
    out = torch.zeros(B, total, heads, D_C, dtype=torch.float64)
    selected = {}
    for b in range(B):
        for p in range(total):
            cand = [t for t in range(p + 1) if not x["pad"][b, t]]
            if cand:
                scores = fp32_scores(x["q_idx"][b, p], x["w_idx"][b, p], x["k_idx"][b, cand], idx_scale).tolist()
                # Magnitude of the summed terms: fp32 rounding of a score is a small multiple of eps times this.
                mags = fp32_scores(x["q_idx"][b, p], x["w_idx"][b, p].abs(), x["k_idx"][b, cand], idx_scale).tolist()
                order = sorted(range(len(cand)), key=lambda j: (-scores[j], cand[j]))
                sel = [cand[j] for j in order[:K]]
                if len(cand) > K:
                    s_k, s_k1 = scores[order[K - 1]], scores[order[K]]
                    noise = 1e-5 * max(mags[order[K - 1]], mags[order[K]]) + 1e-30  # ~100x fp32 rounding
                    assert s_k - s_k1 > noise, (
                        f"seq {b} pos {p}: K-th/K+1-th indexer scores {s_k}, {s_k1} too close for an unambiguous "
                        "selection; change the seed"
                    )
            else:
                sel = []
            selected[b, p] = sel
            if sel:
                rows = x["kv"][b, sel]  # [n, D_K]
                logits = attn_scale * torch.einsum("hd,nd->hn", x["q"][b, p], rows)
                probs = torch.softmax(logits, dim=-1)
                out[b, p] = probs @ rows[:, :D_C]
    return selected, out


# --- one rank ---------------------------------------------------------------------------------------------------
IDX_SCALE, ATTN_SCALE = D_IDX**-0.5, D_K**-0.5


def reference_for(cfg, world, seed):
    """Computed once in the parent process and handed to every rank."""
    return dense_reference(make_inputs(cfg, world, seed), cfg, IDX_SCALE, ATTN_SCALE)


def _check_config(rank, world, cfg, seed, group, ref):
    layout = DCPLayout(world, cfg["interleave"], cfg["page_size"])
    P, K = cfg["page_size"], cfg["topk"]
    total = sum(cfg["chunks"])
    x = make_inputs(cfg, world, seed)
    idx_scale, attn_scale = IDX_SCALE, ATTN_SCALE
    selected, ref_out = ref

    # Storage: a ShardedPagedCache, or our own pools with random distinct page ids.
    if cfg["random_pages"]:
        g = torch.Generator().manual_seed(1000 + rank)
        pages_per_seq = layout.pages(total, rank)
        num_pages = BATCH * pages_per_seq + 5
        ids = torch.randperm(num_pages, generator=g)[: BATCH * pages_per_seq].view(BATCH, pages_per_seq)
        # Wide enough for every local index below local_bound (as the cache's table is); unused pages are -1.
        width = max(1, -(-layout.local_bound(total) // P))
        block_table = torch.full((BATCH, width), -1, dtype=torch.int32)
        block_table[:, :pages_per_seq] = ids.to(torch.int32)
        # Unwritten rows hold a finite sentinel: reading one as a key would break parity. (Non-finite garbage
        # is covered by test_ops.test_sparse_mla_attn_ignores_rows_past_counts.)
        latent_pool = torch.full((num_pages * P, D_K), 7.0, dtype=torch.float64)
        index_pool = torch.full((num_pages * P, D_IDX), 7.0, dtype=torch.float64)
        cache = None
    else:
        from dcp_compile.cache import CacheFormat, ShardedPagedCache  # here: only these ranks pay for transformers

        spec = CacheFormat((0,), D_K, D_IDX, torch.float64, torch.float64)
        cache = ShardedPagedCache(spec, layout, rank, num_pages=BATCH * layout.pages(total, 0), batch_size=BATCH)
        cache.start_request(BATCH, total)
        cache.latent[0].fill_(7.0)  # a finite sentinel: reading a row that was not written breaks parity
        cache.index_keys[0].fill_(7.0)

    attention = DCPSparseMLA(AttentionConfig(
        heads=H_LOCAL, nope_dim=D_C, rope_dim=D_ROPE, latent_dim=D_C, v_dim=D_C, topk=K, attn_scale=attn_scale,
        index_scale=idx_scale, layout=layout, rank=rank, group_name=group,
    ))
    stats = dict(max_err=0.0, one_rank_queries=0, few_queries=0, none_queries=0, queries=0)
    past = 0
    for steps in cfg["chunks"]:
        if cache is not None:  # the cache's own step: static widths for short steps, exact ones for long
            cache.begin_step(steps)
            state = cache.layer_state(0)
            latent_pool, index_pool, block_table = state.latent_pool, state.index_pool, state.block_table
            assert state.query_positions.tolist() == list(range(past, past + steps))
            at = StepPositions(state.query_positions, state.key_positions, state.key_slots)
        else:
            at = StepPositions.of(layout, rank, block_table, past, steps, BATCH)
            state = LayerCacheState(latent_pool, index_pool, block_table, at.new, at.keys, at.key_slots)
        cur = past + steps

        # 1-3. The rewritten layer's own steps: owner-only paged writes, then the indexer over this rank's keys
        # and the exact distributed top-k, compacted to this rank's rows.
        rows = x["kv"][:, past:cur]
        attention.write_new_rows(rows[..., :D_C].unsqueeze(1), rows[..., D_C:].unsqueeze(1), x["k_idx"][:, past:cur], state, at)
        not_pad = (~x["pad"][:, :cur])[:, None, None, :].expand(BATCH, 1, steps, cur)  # HF's 4-D bool mask
        slots, counts = attention.selection.select(not_pad, state, at, index_q=x["q_idx"][:, past:cur],
                                                   index_w=x["w_idx"][:, past:cur])
        assert slots.shape == (BATCH * steps, K) and counts.shape == (BATCH * steps,)

        # The rank's share of the selection is exactly the owned part of the reference's selection.
        for t in range(BATCH * steps):
            b, p = t // steps, past + t % steps
            mine = [q for q in selected[b, p] if layout.owner(q) == rank]
            expect = sorted(
                int(layout.slot(block_table[b], torch.tensor([layout.local_index(q)]))) for q in mine
            )
            n = int(counts[t])
            assert n == len(mine), f"seq {b} pos {p}: rank {rank} count {n}, expected {len(mine)}"
            assert sorted(slots[t, :n].tolist()) == expect, f"seq {b} pos {p}: slots {slots[t].tolist()} vs {expect}"
            assert (slots[t, n:] == -1).all()

        # 4. All-gather the query heads.
        q_all = x["q"][:, past:cur].reshape(BATCH * steps, H_LOCAL * world, D_K)
        q_mine = q_all[:, rank * H_LOCAL : (rank + 1) * H_LOCAL].contiguous()
        q_g = all_gather_heads(q_mine, group, world)
        assert tuple(q_g.shape) == (BATCH * steps, H_LOCAL * world, D_K)
        assert torch.equal(torch.as_tensor(q_g), q_all)

        # 5. Sparse attention over owned rows; 6. LSE merge back to this rank's heads.
        out, lse = torch.ops.dcp.sparse_mla_attn(q_g, latent_pool, slots, counts, attn_scale, D_C)
        assert not out.isnan().any() and not lse.isnan().any()
        empty = counts == 0
        assert (out[empty] == 0).all() and (lse[empty] == NEG_INF).all()
        merged = torch.as_tensor(lse_merge(out, lse, group, world))
        assert tuple(merged.shape) == (BATCH * steps, H_LOCAL, D_C)
        assert merged.dtype == torch.float64
        assert not merged.isnan().any()

        ref = ref_out[:, past:cur, rank * H_LOCAL : (rank + 1) * H_LOCAL].reshape(BATCH * steps, H_LOCAL, D_C)
        err = (merged - ref).abs().max().item() if merged.numel() else 0.0
        stats["max_err"] = max(stats["max_err"], err)

        for t in range(BATCH * steps):
            b, p = t // steps, past + t % steps
            sel = selected[b, p]
            stats["queries"] += 1
            if not sel:
                stats["none_queries"] += 1
                assert (merged[t] == 0).all()
            n_cand = sum(1 for q in range(p + 1) if not x["pad"][b, q])
            if 0 < n_cand < K:
                stats["few_queries"] += 1
            owners = {int(layout.owner(q)) for q in sel}
            if world > 1 and len(sel) == K and len(owners) == 1:
                stats["one_rank_queries"] += 1
                if rank not in owners:
                    assert int(counts[t]) == 0 and (lse[t] == NEG_INF).all() and (out[t] == 0).all()
        if cache is not None:
            cache.end_step()
        past = cur
    assert past == total
    return stats


def _check_ties(rank, world, group):
    """Exactly representable scores with many ties: the distributed top-k must follow the tie rule."""
    for interleave, P, K in ((1, 4, 5), (3, 2, 4)):
        layout = DCPLayout(world, interleave, P)
        total, T = 29, 6
        g = torch.Generator().manual_seed(77)
        global_scores = torch.randint(0, 3, (T, total), generator=g).float()  # values 0, 1, 2: many ties
        global_scores[torch.rand(T, total, generator=g) < 0.2] = NEG_INF
        width = max(1, -(-layout.local_bound(total) // P))
        block_table = (torch.arange(width, dtype=torch.int32) * 3 + 1).flip(0)[None]  # distinct, odd order
        local = torch.arange(layout.local_bound(total))
        key_pos = layout.global_position(local, rank)
        in_seq = key_pos < total
        scores = torch.full((T, local.numel()), NEG_INF)
        scores[:, in_seq] = global_scores[:, key_pos[in_seq]]
        slots, counts = distributed_topk(
            scores, key_pos, torch.zeros(T, dtype=torch.long), block_table, K, rank, world, interleave, P, group
        )
        for t in range(T):
            cands = [(float(global_scores[t, p]), p) for p in range(total) if global_scores[t, p] > NEG_INF]
            cands.sort(key=lambda sp: (-sp[0], sp[1]))
            mine = [p for _, p in cands[:K] if layout.owner(p) == rank]
            expect = sorted(int(layout.slot(block_table[0], torch.tensor([layout.local_index(p)]))) for p in mine)
            n = int(counts[t])
            assert sorted(slots[t, :n].tolist()) == expect, (
                f"ties (I={interleave}, P={P}, K={K}) query {t}: rank {rank} got slots {slots[t, :n].tolist()}, "
                f"expected {expect} (higher score, then lower position)"
            )


# Pools, block tables and step lengths from ShardedPagedCache (on world sizes 2 and 4 only, so the other
# spawns skip importing transformers).
CACHE_CONFIG = dict(interleave=1, page_size=4, topk=6, chunks=(21, 1, 2, 1), random_pages=False)
SEED = 1234


def configs_for(world):
    return CONFIGS + ([CACHE_CONFIG] if world in (2, 4) else [])


def _rank_main(rank, world, refs, group=None):
    torch.manual_seed(0)
    if group is None:
        group = dist.group.WORLD.group_name
    parity = [_check_config(rank, world, cfg, SEED + i, group, refs[i]) for i, cfg in enumerate(configs_for(world))]
    try:
        _check_ties(rank, world, group)
        ties = None
    except AssertionError as exc:  # reported by its own test, so parity still reports separately
        ties = str(exc)
    return parity, ties


_RUNS: dict[int, list] = {}


def run_world(world):
    """One spawn per world size, shared by the parity and the tie tests."""
    if world not in _RUNS:
        refs = [reference_for(cfg, world, SEED + i) for i, cfg in enumerate(configs_for(world))]
        if world == 1:
            # A group of one does no communication: run in this process and save a spawn.
            _RUNS[world] = [_rank_main(0, 1, refs, group="")]
        else:
            _RUNS[world] = run_ranks(_rank_main, world, refs, timeout=300)
    return _RUNS[world]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_dcp_pipeline_parity(world):
    results = run_world(world)
    assert len(results) == world
    for i, cfg in enumerate(configs_for(world)):
        per_rank = [r[0][i] for r in results]
        worst = max(s["max_err"] for s in per_rank)
        assert worst <= TOL, f"N={world}, config {cfg}: max |distributed - dense reference| = {worst:.3e} > {TOL}"
        s0 = per_rank[0]
        assert all(s["queries"] == s0["queries"] for s in per_rank)
        assert s0["few_queries"] > 0, "no query with fewer candidates than K"
        assert s0["none_queries"] > 0, "no query without candidates"
        if world > 1:
            assert s0["one_rank_queries"] > 0, "no query whose whole selection lives on one rank"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_topk_tie_rule(world):
    """Exact score ties: the selected set is the one of the rule "higher score, then lower position"."""
    failures = [f"rank {r}: {ties}" for r, (_, ties) in enumerate(run_world(world)) if ties]
    assert not failures, "\n".join(failures)
