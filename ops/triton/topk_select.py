"""``dcp::topk_select`` on CUDA (Triton host wrapper; kernel and algorithm in ``kernels/topk_select.py``).

Same selection as ``ops/reference.py: topk_select`` (the top k of the candidates by score desc, position asc,
-inf never selected; of those the ones this rank owns, as physical slots through the query's block table),
without its two full sorts and the sort that compacts. Order of the slots within a query: candidate order
(rank 0's block of k first, ...; within this rank's block, the order the local top-k left: column order,
which is position order, with ``ops/triton/local_topk.py``); the reference gives score order. The set and
the count are the same. Fixed config: one program per query row. Up to ONE_TILE_MAX candidates (world·k at k = 2048
and up to 4 ranks) the row is a single tile, loaded once and kept in registers through the passes; above it,
BLOCK = 2048 candidates per tile, reloaded in every pass. Measured in the CUDA-graph decode step on 2 x H200
(benchmarks/RESULTS.md, 2026-11-28 runs 2 and 3): 35.5 -> 33.4 µs a call at 8 x 4096 candidates, 68 -> 62 µs
at 64 x 4096, against 13 µs at 8 x 2048 (one rank). So the reloads were not the cost: the passes are (up to
five histogram + bin-pick rounds, each a serial step of one program per row); more programs per row (a
histogram kernel over (row, chunk), as ``local_topk`` has) is the next step.
"""
from __future__ import annotations

import torch
import triton

from . import common
from .kernels.topk_select import topk_select_kernel

BLOCK = 2048
NUM_WARPS = 8
# Up to this many candidates (world·k: 8192 for 4 ranks at k = 2048) a row is one tile held in registers
# across the passes (16 per thread at 16 warps), instead of 2048-candidate tiles reloaded in every pass.
ONE_TILE_MAX = 8192
INTERPRET_BLOCK = 64  # several tiles per row under the interpreter


def topk_select(cand_scores: torch.Tensor, cand_pos: torch.Tensor, seq_index: torch.Tensor, block_table: torch.Tensor,
                k: int, rank: int, world: int, interleave: int, page_size: int, *, block: int | None = None,
                num_warps: int | None = None):
    """cand_scores [T, C] fp32 (fp16/bf16 widened exactly; -inf = never selected), cand_pos [T, C] int
    (global positions < 2**31 - 1, unique per row except the padding sentinel with -inf), seq_index [T],
    block_table [B, pages] -> slots [T, k] int32 (owned first, -1 after), counts [T] int32. Keyword-only
    overrides (tests, benchmarks): ``block`` the candidates a tile (the row is one tile when C <= block),
    ``num_warps``."""
    if cand_scores.dim() != 2 or cand_pos.shape != cand_scores.shape:
        raise ValueError(f"topk_select: cand_scores and cand_pos must be the same [T, C], got "
                         f"{tuple(cand_scores.shape)} and {tuple(cand_pos.shape)}")
    if k < 1:
        raise ValueError(f"topk_select: k must be >= 1, got {k}")
    if not 0 <= rank < world:
        raise ValueError(f"topk_select: rank {rank} must be in [0, world = {world})")
    if interleave < 1 or page_size < 1:
        raise ValueError(f"topk_select: interleave ({interleave}) and page_size ({page_size}) must be >= 1")
    T, C = cand_scores.shape
    device = cand_scores.device
    slots = common.empty((T, k), torch.int32, device)
    counts = common.empty((T,), torch.int32, device)
    if T == 0:
        return slots, counts
    scores = common.unit_stride(cand_scores.float())
    pos = common.unit_stride(cand_pos)
    table = common.unit_stride(block_table)
    warps = 4 if common.fixed_launch(device) else NUM_WARPS
    if block is None:
        if common.fixed_launch(device):
            block = INTERPRET_BLOCK
        elif C <= ONE_TILE_MAX:  # decode: the whole row in registers, loaded once
            block = max(BLOCK // 4, triton.next_power_of_2(C))
            warps = max(NUM_WARPS, block // 512)
        else:
            block = BLOCK
    warps = num_warps or warps  # an override (benchmarks/tune_topk_select.py)
    common.launch(topk_select_kernel)[(T,)](
        scores, pos, seq_index.contiguous(), table, slots, counts,
        C, k, rank, world, interleave, page_size,
        scores.stride(0), pos.stride(0), table.stride(0), slots.stride(0),
        BLOCK=block, ONE_TILE=C <= block, num_warps=warps,
    )
    return slots, counts
