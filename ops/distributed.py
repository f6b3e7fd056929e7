"""The collective steps of DCP attention, written with c10d *functional* collectives.

Why functional collectives and not ``dcp`` ops that call ``dist.*`` inside: Dynamo traces
``_c10d_functional.all_gather_into_tensor`` / ``reduce_scatter_tensor`` / ``wait_tensor`` as graph nodes,
so Inductor can start a collective early and wait late (overlapping it with the local top-k or the
absorbed-query matmul), and CUDA-graph capture records them like any other kernel. An opaque op would
hide them. The local math between the collectives is in ``dcp`` ops (``ops/__init__.py``).

Groups: every function takes the process group by name (``str``, as the c10d functional ops take it) and its
size. ``None`` means "no group", a single rank: a group of one does no communication and never reads the name
(so a caller may pass ``None`` there; the ``dcp`` custom ops themselves take no group). A group of more than
one rank needs its name (``ValueError`` otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .inference_only import collective

c10d = torch.ops._c10d_functional  # the traceable collectives (the same ops in torch 2.11 and 2.13)


def _named(group_name: str | None) -> str:
    if not group_name:
        raise ValueError(f"a group of more than one rank needs its process group name, got {group_name!r}")
    return group_name


def all_gather(x: Tensor, dim: int, group_name: str | None, world: int) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``."""
    if world == 1:
        return x
    group_name = _named(group_name)
    out = collective(
        lambda t: c10d.wait_tensor(c10d.all_gather_into_tensor(t.contiguous(), world, group_name)), x,
        "_c10d_functional.all_gather_into_tensor",
    )
    return out if dim == 0 else torch.cat(out.chunk(world, dim=0), dim=dim)


def reduce_scatter_sum(x: Tensor, group_name: str | None, world: int) -> Tensor:
    """Sum every rank's ``x`` and keep this rank's block of ``world`` along dim 0."""
    if world == 1:
        return x
    group_name = _named(group_name)
    return collective(
        lambda t: c10d.wait_tensor(c10d.reduce_scatter_tensor(t.contiguous(), "sum", world, group_name)), x,
        "_c10d_functional.reduce_scatter_tensor",
    )


def all_reduce_sum(x: Tensor, group_name: str | None) -> Tensor:
    """Sum every rank's ``x`` over the group (``None``: no group, ``x`` itself)."""
    if group_name is None:
        return x
    group_name = _named(group_name)
    return collective(
        lambda t: c10d.wait_tensor(c10d.all_reduce(t.contiguous(), "sum", group_name)), x, "_c10d_functional.all_reduce"
    )


def all_gather_heads(q: Tensor, group_name: str | None, world: int) -> Tensor:
    """[T, H, D] on each rank -> [T, world·H, D], rank r's heads at block r (docs/design.md §4.4)."""
    return all_gather(q, 1, group_name, world)


def local_topk_sorted(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row ([T, L], L >= k), ties to the lower column: one stable full sort. (torch.topk does not
    promise the tie rule; a topk + tie-fill version is slower on an H100 at k = 2048:
    benchmarks/bench_local_topk.py.) The CPU / float64 path of ``dcp::local_topk``; CUDA runs a radix
    select (ops/triton/local_topk.py)."""
    idx = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return torch.gather(scores, -1, idx), idx


def local_topk_padded(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``dcp::local_topk`` by the stable sort: the top k of each row padded with k -inf columns (any L >= 0).
    Contiguous outputs, as the op's fake promises (the sort's columns are a slice of a wider tensor)."""
    values, idx = local_topk_sorted(F.pad(scores, (0, k), value=float("-inf")), k)
    return values.contiguous(), idx.contiguous()


def distributed_topk(
    scores: Tensor, positions: Tensor, seq_index: Tensor, block_table: Tensor, k: int,
    rank: int, world: int, interleave: int, page_size: int, group_name: str | None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k over the whole DCP group (docs/design.md §4.2).

    scores [T, L] this rank's indexer scores of its own keys (-inf = not a candidate), positions [L] or
    [T, L] their global positions. Local top-k, all-gather (score, position), global top-k, keep the ones
    this rank owns as compacted local slots [T, k] and counts [T].
    """
    # dcp::local_topk pads each row with k -inf columns: the local top-k is then fixed-width k whatever this
    # rank holds, with no branch on the (growing) local length, so a decode graph compiles once. Their
    # positions are int32 max (never selected: -inf). Ties must go to the lower position (local order is
    # position order) so that the selection is the same whatever the number of ranks: plain torch.topk does
    # not promise that. CUDA: a radix select (ops/triton/local_topk.py); CPU / float64: a stable sort.
    positions = F.pad(positions, (0, k), value=torch.iinfo(torch.int32).max)  # [L + k] or [T, L + k]
    top_scores, top_idx = torch.ops.dcp.local_topk(scores, k)
    top_pos = positions[top_idx] if positions.dim() == 1 else torch.gather(positions, -1, top_idx)
    if world > 1:
        # One collective for both, 8 bytes per candidate: the fp32 score's bits and the int32 position side
        # by side (a bit view, so the exchange is exact; positions are < 2**31, the padding is int32 max).
        packed = torch.stack([top_scores.float().view(torch.int32), top_pos.to(torch.int32)], dim=0)  # [2, T, k]
        packed = all_gather(packed, 2, group_name, world)  # [2, T, world·k]
        top_scores, top_pos = packed[0].view(torch.float32), packed[1]
    return torch.ops.dcp.topk_select(
        top_scores, top_pos.long(), seq_index, block_table, k, rank, world, interleave, page_size
    )


def lse_merge(out: Tensor, lse: Tensor, group_name: str | None, world: int,
              lse_of_rank: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Merge the partial attention of all ranks of the DCP group (docs/design.md §4.6).

    out [T, world·H, D], lse [T, world·H] this rank's partial over its own rows, for every gathered head ->
    [T, H, D] exact attention for this rank's own H heads: all-gather lse, rescale (``dcp::lse_combine``),
    reduce-scatter heads. Returned in float32 (float64 for float64 inputs); the caller casts. (The split-K
    combine inside one rank's attention kernel is another thing: ``ops/triton/merge_partials.py``.)
    With ``lse_of_rank`` (this rank's index in the group) it also returns the merged lse of its own heads,
    [T, H] (natural log, -inf where no rank has rows), from the lse it gathered anyway.
    """
    if world == 1:
        return out if lse_of_rank is None else (out, lse)
    lse_all = all_gather(lse.unsqueeze(0), 0, group_name, world)  # [world, T, world·H]
    scaled = torch.ops.dcp.lse_combine(out, lse, lse_all)
    heads_first = scaled.transpose(0, 1).contiguous()  # [world·H, T, D]
    mine = reduce_scatter_sum(heads_first, group_name, world).transpose(0, 1)  # [T, H, D]
    if lse_of_rank is None:
        return mine
    heads = lse.shape[1] // world
    return mine, torch.logsumexp(lse_all[:, :, lse_of_rank * heads : (lse_of_rank + 1) * heads], dim=0)
