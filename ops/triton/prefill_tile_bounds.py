"""Host wrapper of the prefill indexer kernels' pass over the mask (``kernels/prefill_tile_bounds.py``): for each
(sequence, block of queries, run of key tiles) program of a prefill indexer kernel, which tiles it scores. Both
prefill kernels (the Triton one and the Hopper warp-specialised one) read its output instead of scanning the
mask in their own prologue, where the scan held up the program's first dot."""
from __future__ import annotations

import torch
import triton

from . import common
from .kernels.prefill_tile_bounds import prefill_tile_bounds_kernel

# Keys a step of the pass: [block_s, SCAN_L] mask bytes, a whole run of the table's 64 tiles × 64 keys in one step
SCAN_L = 4096


def tile_bounds(allowed_u8: torch.Tensor, block_s: int, block_l: int, tiles: int) -> torch.Tensor:
    """[B, n_sb, n_lc, 4] int32: for each (sequence, block of ``block_s`` queries, run of ``tiles`` key tiles of
    ``block_l`` keys) its first and last tile holding an allowed pair and its run of fully allowed tiles
    [mid_lo, mid_hi) (definitions in the kernel's docstring). allowed [B, S, L] uint8, last dim contiguous."""
    B, S, L = allowed_u8.shape
    n_sb, n_lc = triton.cdiv(S, block_s), triton.cdiv(triton.cdiv(L, block_l), tiles)
    bounds = common.empty((B, n_sb, n_lc, 4), torch.int32, allowed_u8.device)
    # the interpreter: 2 tiles a step, so that a run spans several steps at test sizes
    scan_l = 2 * block_l if common.fixed_launch(allowed_u8.device) else max(SCAN_L, block_l)
    launch = {} if common.fixed_launch(allowed_u8.device) else dict(num_warps=4)
    common.launch(prefill_tile_bounds_kernel)[(B * n_sb * n_lc,)](
        allowed_u8, bounds, S, L, n_sb, n_lc, tiles, allowed_u8.stride(0), allowed_u8.stride(1),
        BLOCK_S=block_s, BLOCK_L=block_l, SCAN_L=scan_l, **launch)
    return bounds
