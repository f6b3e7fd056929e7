"""Plain-PyTorch implementations of the ``dcp`` ops: the CPU kernels, and the meaning of each op.

They are written for clarity and exactness (float64 stays float64), not speed; the CUDA kernels in
``ops/triton`` must agree with them.
"""
from __future__ import annotations

import torch

from .layout import DCPLayout


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """lse is float32, except for float64 queries, where it stays float64 (exact float64 parity)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def sparse_mla_attn(q, kv, slots, counts, scale: float, v_dim: int):
    """Softmax attention of every head of query t over the rows ``kv[slots[t, :counts[t]]]``."""
    acc = _acc_dtype(q)
    if kv.shape[0] == 0:  # an empty pool (a rank that owns no token yet): every count is 0
        kv = kv.new_zeros(1, kv.shape[1])
    num_slots = slots.shape[1]
    valid = torch.arange(num_slots, device=q.device)[None, :] < counts[:, None].long()  # [T, K]
    rows = kv[torch.where(valid, slots.long(), 0)].to(acc)  # [T, K, Dk]
    rows = torch.where(valid[..., None], rows, torch.zeros_like(rows))  # never let an unselected row in (NaN·0)
    scores = torch.einsum("thd,tkd->thk", q.to(acc), rows) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where the query has no rows
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.where(valid[:, None, :], torch.exp(scores - finite_lse[..., None]), torch.zeros_like(scores))
    out = torch.einsum("thk,tkv->thv", probs, rows[..., :v_dim])
    return out.to(q.dtype), lse.to(_lse_dtype(q))


def paged_write(pool, rows, slots) -> None:
    """``pool[slots[i]] = rows[i]`` for every ``slots[i] >= 0``; negative slots (rows another rank owns) are skipped."""
    keep = slots >= 0
    pool[slots[keep].long()] = rows[keep].to(pool.dtype)


def indexer_scores(q, w, k_pool, key_slots, allowed, scale: float, query_block: int = 256):
    """DSA indexer: ``Σ_h w_h · relu(scale · q_h·k_l)`` in float32 (as the HF indexer does), ``-inf`` where
    the key is not allowed for the query or does not exist (slot < 0).

    Every score is the same float32 function of its own (query, key) pair whatever else the call holds: the
    dot and the head sum are elementwise float32 ops in a fixed order (d = 0, 1, ...; then h = 0, 1, ...), each
    rounded once. A batched matmul would not do: on the CPU its rounding depends on the shapes (how many keys
    share the call), and the two selection schemes of docs/design.md §4.2 score a pair in calls of different
    shapes (this rank's keys for every query; every key for this rank's queries) and must agree to the bit."""
    if k_pool.shape[0] == 0:  # an empty pool (a rank that owns no token yet): every slot is -1
        k_pool = k_pool.new_zeros(1, k_pool.shape[1])
    keys = k_pool[key_slots.clamp(min=0).long()].float()  # [B, L, Di]
    valid = allowed & (key_slots >= 0)[:, None, :]
    keys_by_dim = keys.permute(2, 0, 1)[:, :, None, None, :]  # [Di, B, 1, 1, L]
    blocks = []
    # Bound the [B, S, H, L] intermediate on long prefills.
    for start in range(0, q.shape[1], query_block):
        qb = q[:, start : start + query_block].float().unsqueeze(-1)  # [B, s, H, Di, 1]
        dots = qb[:, :, :, 0] * keys_by_dim[0]
        for d in range(1, qb.shape[3]):
            dots = dots + qb[:, :, :, d] * keys_by_dim[d]  # [B, s, H, L]
        heads = torch.relu(dots * scale)
        wb = w[:, start : start + query_block].float().unsqueeze(-1)  # [B, s, H, 1]
        total = wb[:, :, 0] * heads[:, :, 0]
        for h in range(1, heads.shape[2]):
            total = total + wb[:, :, h] * heads[:, :, h]  # [B, s, L]
        blocks.append(total)
    scores = torch.cat(blocks, dim=1) if blocks else q.new_empty(q.shape[0], 0, key_slots.shape[1], dtype=torch.float32)
    return scores.masked_fill(~valid, float("-inf"))


def topk_select(cand_scores, cand_pos, seq_index, block_table, k: int, rank: int, world: int, interleave: int, page_size: int):
    """Exact global top-k of the gathered candidates, then this rank's share of it as compacted local slots.

    Order: higher score first, then lower position (deterministic on ties). Candidates with score -inf
    (masked, padding, or absent) are never selected. Returns slots [T, k] int32 (owned rows first, -1 after)
    and counts [T] int32.
    """
    layout = DCPLayout(world, interleave, page_size)
    if cand_scores.shape[-1] < k:  # fewer candidates than k: pad with never-selected ones
        pad = k - cand_scores.shape[-1]
        cand_scores = torch.nn.functional.pad(cand_scores, (0, pad), value=float("-inf"))
        cand_pos = torch.nn.functional.pad(cand_pos, (0, pad), value=torch.iinfo(torch.int32).max)
    by_pos = torch.argsort(cand_pos, dim=-1, stable=True)
    scores = torch.gather(cand_scores, -1, by_pos)
    pos = torch.gather(cand_pos, -1, by_pos)
    by_score = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    top_scores = torch.gather(scores, -1, by_score)
    top_pos = torch.gather(pos, -1, by_score)
    owned = (top_scores > float("-inf")) & (layout.owner(top_pos) == rank)
    local = torch.where(owned, layout.local_index(top_pos), torch.zeros_like(top_pos))
    slot = layout.slot(block_table[seq_index.long()], local)
    slot = torch.where(owned, slot, torch.full_like(slot, -1))
    to_front = torch.argsort((~owned).to(torch.int8), dim=-1, stable=True)
    slots = torch.gather(slot, -1, to_front).to(torch.int32)
    return slots, owned.sum(-1).to(torch.int32)


def lse_combine(out, lse, lse_all):
    """Rescale this rank's partial attention ``out`` by ``exp(lse - logsumexp_r lse_all[r])``. A rank with no
    rows (lse = -inf) contributes exactly 0 whatever its ``out`` holds (NaN, inf: it is selected away, never
    multiplied by 0), and so does every rank of a query no rank has rows for."""
    acc = _acc_dtype(out)
    peak = lse_all.amax(dim=0)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = peak + torch.log(torch.exp(lse_all - peak).sum(dim=0))
    live = (lse > float("-inf"))[..., None]
    weight = torch.exp(lse - total).to(acc)[..., None]
    return torch.where(live, out.to(acc) * weight, torch.zeros((), dtype=acc, device=out.device))
