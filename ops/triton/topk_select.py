"""``dcp::topk_select`` on CUDA (Triton host wrapper; kernel and algorithm in ``kernels/topk_select.py``).

Same result as ``ops/reference.py: topk_select`` (this rank's share of the global top-k as physical slots,
best first, -1 after, and the count) for inputs under the op's contract: [world, T, k] keys, block r =
rank r's ``candidate_keys`` (sorted best first). Fixed config, no autotuning: BLOCK = 128 lanes a program
(127 keys of this rank's block plus the key before them; k = 2048: 17 programs a row) at 4 warps, within
10 % of the best of six configs at every decode shape on an H200 (``benchmarks/tune_topk_select.py``,
session 5: 3.7-5.5 µs at 8 rows for 1-4 ranks, 10.4 µs at 64 rows and 4 ranks, 17 µs at 64 rows and 8;
256 lanes at 4 warps spills and was 2 × slower).

History: the previous kernel took unsorted (score, position) candidates and ran a radix select over all
world·k of them in one program per row: 50 µs a call at 8 × 8192 candidates and 83 µs at 64 × 8192 on
4 × H200 (benchmarks/RESULTS.md, session 5), the largest cost DCP added to a decode step.
"""
from __future__ import annotations

import torch
import triton

from . import common
from .kernels.topk_select import topk_select_kernel

BLOCK = 128
NUM_WARPS = 4
INTERPRET_BLOCK = 8  # several shares a row under the interpreter


def topk_select(cand_keys: torch.Tensor, seq_index: torch.Tensor, block_table: torch.Tensor,
                k: int, rank: int, world: int, interleave: int, page_size: int, *, block: int | None = None,
                num_warps: int | None = None):
    """cand_keys [world, T, k] int64 (block r = rank r's keys, best first), seq_index [T], block_table
    [B, pages] -> slots [T, k] int32 (best first, -1 after), counts [T] int32. Keyword-only overrides
    (tests, benchmarks): ``block`` lanes a program (a power of two >= 2), ``num_warps``."""
    if cand_keys.dim() != 3 or cand_keys.dtype != torch.int64:
        raise ValueError(f"topk_select: cand_keys must be [world, T, k] int64, got {cand_keys.dtype} "
                         f"{tuple(cand_keys.shape)}")
    if k < 1:
        raise ValueError(f"topk_select: k must be >= 1, got {k}")
    if not 0 <= rank < world:
        raise ValueError(f"topk_select: rank {rank} must be in [0, world = {world})")
    if interleave < 1 or page_size < 1:
        raise ValueError(f"topk_select: interleave ({interleave}) and page_size ({page_size}) must be >= 1")
    blocks, T, C = cand_keys.shape
    if (blocks, C) != (world, k):
        raise ValueError(f"topk_select: cand_keys is [{blocks}, T, {C}], expected [world, T, k] = [{world}, T, {k}] "
                         f"(every rank's sorted local top-k)")
    device = cand_keys.device
    slots = common.empty((T, k), torch.int32, device)
    counts = common.empty((T,), torch.int32, device)
    if T == 0:
        return slots, counts
    keys = common.unit_stride(cand_keys)
    table = common.unit_stride(block_table)
    if block is None:
        block = INTERPRET_BLOCK if common.fixed_launch(device) else min(BLOCK, triton.next_power_of_2(k + 1))
    if block < 2 or block & (block - 1):
        raise ValueError(f"topk_select: block must be a power of two >= 2, got {block}")
    warps = 4 if common.fixed_launch(device) else (num_warps or NUM_WARPS)
    grid = (T, triton.cdiv(k, block - 1))
    common.launch(topk_select_kernel)[grid](
        keys, seq_index.contiguous(), table, slots, counts,
        k, rank, world, interleave, page_size, k.bit_length(),
        keys.stride(0), keys.stride(1), table.stride(0), slots.stride(0),
        BLOCK=block, WORLD=triton.next_power_of_2(world), num_warps=warps,
    )
    return slots, counts
