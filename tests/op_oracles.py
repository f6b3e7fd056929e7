"""The one independent float64 oracle per op, for tests/test_ops.py (the CPU implementations) and
tests/test_triton_kernels.py (the Triton kernels). Written plainly from the ops' definitions
(docs/design.md §4), never calling ops/reference.py. Inputs may live on any device; results are float64
(or Python lists) on the CPU.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def sparse_mla_attn(q, kv, slots, counts, scale, v_dim):
    """Per query t: softmax over its first counts[t] rows ``kv[slots[t, j]]`` of ``scale · q[t, h]·row``;
    out = Σ p·row[:v_dim], lse = logsumexp (natural log). A query without rows: out 0, lse -inf."""
    q64, kv64 = q.double().cpu(), kv.double().cpu()
    slots, counts = slots.cpu(), counts.cpu()
    T, H, _ = q.shape
    out = torch.zeros(T, H, v_dim, dtype=torch.float64)
    lse = torch.full((T, H), NEG_INF, dtype=torch.float64)
    for t in range(T):
        n = int(counts[t])
        if n == 0:
            continue
        rows = kv64[slots[t, :n].long()]              # [n, Dk]
        s = scale * (q64[t] @ rows.T)                 # [H, n]
        lse[t] = torch.logsumexp(s, -1)
        out[t] = torch.softmax(s, -1) @ rows[:, :v_dim]
    return out, lse


def indexer_scores(q, w, k_pool, key_slots, allowed, scale):
    """score[b, s, l] = Σ_h w[b,s,h] · relu(scale · q[b,s,h]·k_pool[key_slots[b,l]]); -inf where the key is
    not allowed for the query or does not exist (slot < 0)."""
    q64, w64, k64 = q.double().cpu(), w.double().cpu(), k_pool.double().cpu()
    key_slots, allowed = key_slots.cpu(), allowed.cpu()
    B, S, Hi, _ = q.shape
    L = key_slots.shape[1]
    out = torch.full((B, S, L), NEG_INF, dtype=torch.float64)
    for b in range(B):
        for l in range(L):
            slot = int(key_slots[b, l])
            if slot < 0:
                continue
            dots = torch.relu(scale * (q64[b] @ k64[slot]))   # [S, Hi]
            total = (w64[b] * dots).sum(-1)                    # [S]
            out[b, :, l] = torch.where(allowed[b, :, l], total, torch.full_like(total, NEG_INF))
    return out


def topk_select(cand_scores, cand_pos, seq_index, block_table, k, rank, world, interleave, page_size):
    """Per query: candidates sorted by (score desc, position asc), -inf dropped, the first k kept; of those,
    the positions rank ``rank`` owns, as physical slots (a list per query, in no particular order)."""
    result = []
    for t in range(cand_scores.shape[0]):
        cands = [(float(s), int(p)) for s, p in zip(cand_scores[t].tolist(), cand_pos[t].tolist()) if s != NEG_INF]
        cands.sort(key=lambda sp: (-sp[0], sp[1]))
        table = block_table[int(seq_index[t])]
        slots = []
        for _, p in cands[:k]:
            if (p // interleave) % world != rank:
                continue
            local = (p // (world * interleave)) * interleave + p % interleave
            slots.append(int(table[local // page_size]) * page_size + local % page_size)
        result.append(slots)
    return result


def lse_merge(o_parts, lse_parts):
    """Merge P partial attention results over disjoint key sets: lse = log Σ_p exp(lse_p),
    o = Σ_p exp(lse_p - lse)·o_p. A part with lse_p = -inf has weight exactly 0 and its o_p is never read;
    if every part is empty, o = 0 and lse = -inf. Also the oracle of dcp::lse_combine: rank r's share is
    this merge with every other rank's o_p set to 0."""
    lse64 = lse_parts.double().cpu()
    live = lse64 > NEG_INF
    peak = torch.where(live.any(0), lse64.amax(0), torch.zeros(()).double())
    weight = torch.where(live, torch.exp(lse64 - peak), torch.zeros(()).double())
    o64 = torch.where(live[..., None], o_parts.double().cpu(), torch.zeros(()).double())
    den = weight.sum(0)
    some = den > 0
    out = (weight[..., None] * o64).sum(0) / torch.where(some, den, torch.ones(()).double())[..., None]
    lse = torch.where(some, peak + torch.log(torch.where(some, den, torch.ones(()).double())),
                      torch.full_like(den, NEG_INF))
    return out, lse


def lse_combine(out, lse_all, rank):
    """Rank ``rank``'s rescaled partial (its lse is ``lse_all[rank]``): ``lse_merge`` of its own out with every
    other rank's out set to 0."""
    parts = torch.zeros((lse_all.shape[0],) + tuple(out.shape), dtype=torch.float64)
    parts[rank] = out.double().cpu()
    return lse_merge(parts, lse_all)[0]
