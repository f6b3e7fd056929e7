"""Plain-PyTorch implementations of the ``dcp`` ops: the CPU kernels, and the meaning of each op.

They are written for clarity and exactness (float64 stays float64), not speed; the CUDA kernels in
``ops/triton`` must agree with them.
"""
from __future__ import annotations

import torch

from .distributed import owned_slots


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


# --- the top-k exchange's order keys (docs/design.md §4.2) ---------------------------------------------------
# A candidate (score, global position) travels as one int64 whose signed order is the selection order: higher
# score first, then lower position. High word: the fp32 score's order image (an int32 whose signed order is
# the float order; -0.0 and +0.0 equal, as a sort sees them); low word: 2**31 - 1 - position. Live candidates
# (score > -inf) have distinct keys (positions are unique in a query's candidates), so "the top k" needs no
# tie rule of its own; -inf candidates (masked keys, padding) are never selected.
NEG_INF_IMAGE = -2139095041  # the order image of -inf (0xFF800000 with every bit below the sign flipped)
POSITION_BITS = 31


def float_image(scores: torch.Tensor) -> torch.Tensor:
    """fp32 (wider types rounded to fp32) -> int32 whose signed order is the float order (no NaN)."""
    x = scores.float().contiguous()
    bits = torch.where(x == 0, torch.zeros((), dtype=torch.int32), x.view(torch.int32))
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def order_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(score, position) -> int64 order keys (positions of live candidates in [0, 2**31 - 1))."""
    live = scores > float("-inf")
    low = (2**POSITION_BITS - 1) - torch.where(live, positions.long(), torch.zeros((), dtype=torch.long))
    return (float_image(scores).long() << 32) | low


def key_positions(keys: torch.Tensor) -> torch.Tensor:
    return (2**POSITION_BITS - 1) - (keys & 0xFFFFFFFF)


def key_live(keys: torch.Tensor) -> torch.Tensor:
    return (keys >> 32) > NEG_INF_IMAGE


def candidate_keys(scores, positions):
    """A rank's local top-k candidates -> their order keys [T, k] int64, best first (what each rank sends)."""
    return torch.sort(order_keys(scores, positions), dim=-1, descending=True).values


def topk_select(cand_keys, seq_index, block_table, k: int, rank: int, world: int, interleave: int, page_size: int):
    """Exact global top-k of the gathered candidates' order keys [N, T, C] (N blocks a query, any N, C and
    order here; the op's contract, N = world blocks of C = k keys, block r = rank r's keys best first, is
    what the CUDA kernel relies on), then this rank's share of it as compacted physical slots: slots [T, k]
    int32 (best first, -1 after) and counts [T] int32. Dead keys (score -inf) are never selected."""
    cand_keys = cand_keys.permute(1, 0, 2).reshape(cand_keys.shape[1], -1)  # [T, N·C]
    if cand_keys.shape[-1] < k:  # fewer candidates than k: pad with dead keys
        pad = k - cand_keys.shape[-1]
        cand_keys = torch.nn.functional.pad(cand_keys, (0, pad), value=NEG_INF_IMAGE << 32)
    top = torch.sort(cand_keys, dim=-1, descending=True).values[:, :k]
    positions = torch.where(key_live(top), key_positions(top), -1)
    # the key-gather selection's last step too: the owned positions as physical slots, compacted (order kept)
    return owned_slots(positions, seq_index, block_table, rank, world, interleave, page_size)


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
