"""The collective steps of DCP attention, written with c10d *functional* collectives.

Why functional collectives and not ``dcp`` ops that call ``dist.*`` inside: Dynamo traces
``_c10d_functional.all_gather_into_tensor`` / ``reduce_scatter_tensor`` / ``wait_tensor`` as graph nodes,
so Inductor can start a collective early and wait late (overlapping it with the local top-k or the
absorbed-query matmul), and CUDA-graph capture records them like any other kernel. An opaque op would
hide them. The local math between the collectives is in ``dcp`` ops (``ops/__init__.py``).

Every function takes the process group by name and its size; a group of one does no communication.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .inference_only import collective

c10d = torch.ops._c10d_functional  # the traceable collectives (the same ops in torch 2.11 and 2.13)


def all_gather(x: Tensor, dim: int, group_name: str, world: int) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``."""
    out = collective(
        lambda t: c10d.wait_tensor(c10d.all_gather_into_tensor(t.contiguous(), world, group_name)), x,
        "_c10d_functional.all_gather_into_tensor",
    )
    return out if dim == 0 else torch.cat(out.chunk(world, dim=0), dim=dim)


def reduce_scatter_sum(x: Tensor, group_name: str, world: int) -> Tensor:
    """Sum every rank's ``x`` and keep this rank's block of ``world`` along dim 0."""
    return collective(
        lambda t: c10d.wait_tensor(c10d.reduce_scatter_tensor(t.contiguous(), "sum", world, group_name)), x,
        "_c10d_functional.reduce_scatter_tensor",
    )


def all_reduce_sum(x: Tensor, group_name: str) -> Tensor:
    return collective(
        lambda t: c10d.wait_tensor(c10d.all_reduce(t.contiguous(), "sum", group_name)), x, "_c10d_functional.all_reduce"
    )


def all_gather_heads(q: Tensor, group_name: str, world: int) -> Tensor:
    """[T, H, D] on each rank -> [T, world·H, D], rank r's heads at block r (design §4.4)."""
    if world == 1:
        return q
    return all_gather(q, 1, group_name, world)


def local_topk_sorted(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, ties to the lower column: one stable full sort (the simple version)."""
    idx = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return torch.gather(scores, -1, idx), idx


def local_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row ([T, L], L >= k), ties to the lower column, without a full sort. Same result as
    ``local_topk_sorted`` but 1.5-4x slower on an H100 at k = 2048 (torch.topk's large-k select is slow);
    kept for the benchmark that shows it.

    ``torch.topk`` finds the k-th value; everything above it is in, and the ties *at* it are taken in column
    order (a cumulative count). A second ``topk`` over a key that is unique and decreasing in the column
    gathers exactly those k columns. Returned in column order (callers re-sort by score anyway).
    """
    cols = scores.shape[-1]
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]
    above = scores > kth
    at = scores == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (at & (torch.cumsum(at.to(torch.int32), dim=-1) <= room))
    key = torch.where(chosen, cols - torch.arange(cols, device=scores.device), 0)
    idx = torch.topk(key, k, dim=-1).indices
    return torch.gather(scores, -1, idx), idx


def distributed_topk(
    scores: Tensor, positions: Tensor, seq_index: Tensor, block_table: Tensor, k: int,
    rank: int, world: int, interleave: int, page_size: int, group_name: str,
) -> tuple[Tensor, Tensor]:
    """Exact top-k over the whole DCP group (design §4.2).

    scores [T, L] this rank's indexer scores of its own keys (-inf = not a candidate), positions [L] or
    [T, L] their global positions. Local top-k, all-gather (score, position), global top-k, keep the ones
    this rank owns as compacted local slots [T, k] and counts [T].
    """
    num_queries = scores.shape[0]
    positions = positions.expand(num_queries, -1) if positions.dim() == 1 else positions
    # Always k extra -inf columns: the local top-k is then fixed-width k whatever this rank holds, with no
    # branch on the (growing) local length, so a decode graph compiles once.
    scores = F.pad(scores, (0, k), value=float("-inf"))
    positions = F.pad(positions, (0, k), value=torch.iinfo(torch.int32).max)
    # Ties must go to the lower position (local order is position order) so that the selection is the
    # same whatever the number of ranks: plain torch.topk does not promise that. The stable sort is also
    # the faster of the two deterministic versions on an H100 (benchmarks/RESULTS.md, "local top-k").
    top_scores, top_idx = local_topk_sorted(scores, k)
    top_pos = torch.gather(positions, -1, top_idx)
    if world > 1:
        # One collective for both: float32 scores and positions < 2**53 are exact in float64.
        packed = torch.stack([top_scores.double(), top_pos.double()], dim=0)  # [2, T, k]
        packed = all_gather(packed, 2, group_name, world)  # [2, T, world·k]
        top_scores, top_pos = packed[0].float(), packed[1].long()
    return torch.ops.dcp.topk_select(
        top_scores, top_pos.long(), seq_index, block_table, k, rank, world, interleave, page_size
    )


def lse_merge(out: Tensor, lse: Tensor, group_name: str, world: int) -> Tensor:
    """Merge partial attention of all ranks (design §4.6).

    out [T, world·H, D], lse [T, world·H] this rank's partial over its own rows, for every gathered head ->
    [T, H, D] exact attention for this rank's own H heads: all-gather lse, rescale, reduce-scatter heads.
    Returned in float32 (float64 for float64 inputs); the caller casts.
    """
    if world == 1:
        return out
    lse_all = all_gather(lse.unsqueeze(0), 0, group_name, world)  # [world, T, world·H]
    scaled = torch.ops.dcp.lse_combine(out, lse, lse_all)
    heads_first = scaled.transpose(0, 1).contiguous()  # [world·H, T, D]
    mine = reduce_scatter_sum(heads_first, group_name, world)  # [H, T, D]
    return mine.transpose(0, 1)
