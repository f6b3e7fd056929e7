"""Paged write of new cache rows: one program per row, rows with a negative slot skipped.

Replaces boolean-mask indexing on CUDA, which would sync the host (and so break CUDA-graph capture)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _paged_write_kernel(pool_ptr, rows_ptr, slots_ptr, width, pool_stride, rows_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < width
            vals = tl.load(rows_ptr + row * rows_stride + cols, mask=mask)
            tl.store(pool_ptr + slot * pool_stride + cols, vals.to(pool_ptr.dtype.element_ty), mask=mask)


def paged_write(pool: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    if rows.shape[0] == 0 or pool.shape[0] == 0:  # nothing to write (an empty pool owns no row: slots are -1)
        return
    rows = rows.contiguous() if rows.stride(-1) != 1 else rows
    width = pool.shape[1]
    block = min(1024, triton.next_power_of_2(width))
    _paged_write_kernel[(rows.shape[0],)](pool, rows, slots.contiguous(), width, pool.stride(0), rows.stride(0), BLOCK=block)
