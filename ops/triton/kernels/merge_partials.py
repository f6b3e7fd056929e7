"""Combine partial attention results over disjoint key sets by log-sum-exp: the kernel (host wrapper:
``ops/triton/merge_partials.py``, which documents the math)."""
import triton
import triton.language as tl


@triton.jit
def merge_partials_kernel(
    O_PART, LSE_PART, OUT, LSE_OUT,
    T, H, NPART,
    stride_op, stride_ot, stride_oh,      # O_PART [P, T, H, V] by strides; last dim contiguous
    stride_lp, stride_lt, stride_lh,      # LSE_PART [P, T, H]
    stride_out_t, stride_out_h,           # OUT [T, H, V]
    stride_lse_t, stride_lse_h,           # LSE_OUT [T, H]
    V_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_v = tl.program_id(1)
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    t = (pid // n_hb).to(tl.int64)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_DIM

    # pass 1: running max of the parts' lse
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for p in range(0, NPART):
        lse_p = tl.load(LSE_PART + p * stride_lp + t * stride_lt + offs_h * stride_lh,
                        mask=mask_h, other=float("-inf"))
        m = tl.maximum(m, lse_p)
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    # pass 2: weighted sum; a part with lse = -inf gets weight 0 and its rows are not even loaded (masked to
    # 0), so whatever they hold (NaN, inf, never written) cannot leak
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    den = tl.zeros([BLOCK_H], tl.float32)
    for p in range(0, NPART):
        lse_p = tl.load(LSE_PART + p * stride_lp + t * stride_lt + offs_h * stride_lh,
                        mask=mask_h, other=float("-inf"))
        live = lse_p > float("-inf")
        w = tl.where(live, tl.exp(lse_p - m_safe), 0.0)
        o_p = tl.load(O_PART + p * stride_op + t * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :],
                      mask=(mask_h & live)[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        acc += w[:, None] * o_p
        den += w

    nonempty = den > 0
    den_safe = tl.where(nonempty, den, 1.0)
    out = acc / den_safe[:, None]
    tl.store(OUT + t * stride_out_t + offs_h[:, None] * stride_out_h + offs_v[None, :],
             out.to(OUT.dtype.element_ty), mask=mask_h[:, None] & mask_v[None, :])
    if pid_v == 0:
        lse = tl.where(nonempty, m_safe + tl.log(den_safe), float("-inf"))
        tl.store(LSE_OUT + t * stride_lse_t + offs_h * stride_lse_h, lse, mask=mask_h)
