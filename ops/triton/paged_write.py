"""Paged write of new cache rows (Triton host wrapper; kernel in ``kernels/paged_write.py``).

Replaces boolean-mask indexing on CUDA, which would sync the host (and so break CUDA-graph capture)."""
import torch
import triton

from . import common
from .kernels.paged_write import paged_write_kernel


def paged_write(pool: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """``pool[slots[i]] = rows[i]`` for every ``slots[i] >= 0``."""
    if rows.shape[0] == 0 or pool.shape[0] == 0:  # nothing to write (an empty pool owns no row: slots are -1)
        return
    rows = common.unit_stride(rows)
    width = pool.shape[1]
    block = min(1024, triton.next_power_of_2(width))
    common.launch(paged_write_kernel)[(rows.shape[0],)](pool, rows, slots.contiguous(), width, pool.stride(0),
                                                       rows.stride(0), BLOCK=block)
