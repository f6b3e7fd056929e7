"""Paged write of new cache rows: the kernel (host wrapper: ``ops/triton/paged_write.py``). One program per
row; a row with a negative slot (another rank owns it) is skipped."""
import triton
import triton.language as tl


@triton.jit
def paged_write_kernel(pool_ptr, rows_ptr, slots_ptr, width, pool_stride, rows_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < width
            vals = tl.load(rows_ptr + row * rows_stride + cols, mask=mask)
            tl.store(pool_ptr + slot * pool_stride + cols, vals.to(pool_ptr.dtype.element_ty), mask=mask)
