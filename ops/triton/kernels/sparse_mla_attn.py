"""Sparse MLA attention over compacted gathered latent rows: the kernel (host wrapper:
``ops/triton/sparse_mla_attn.py``).

One KV head (MQA after weight absorption, docs/design.md §2): every head of query t attends to the same
gathered rows ``kv[slots[t, j]]`` (``c ‖ k_rope``), j < counts[t]. A program owns one query, a block of
BLOCK_H heads and one split of the query's selected rows; it loads each gathered row once (BLOCK_N rows a
step), uses the whole row for the scores of all its heads (``q_c·c + q_r·k_rope``) and its first V_DIM
columns as V for the output (``p·c``). The loop bound is the query's count, so a DCP rank that owns 1/N of
the rows does 1/N of the work. With NSPLIT > 1 each split writes a partial (out, lse) that the host wrapper
combines (``merge_partials``).
"""
import triton
import triton.language as tl


@triton.jit
def sparse_mla_fwd_kernel(
    Q, KV, SLOTS, COUNTS, O, LSE,
    qk_scale,                      # scale * log2(e)
    H, NSPLIT,
    stride_qt, stride_qh,          # q [T, H, Dk], last dim contiguous
    stride_kv,                     # kv [S, Dk], last dim contiguous
    stride_st,                     # slots [T, K], last dim contiguous
    stride_ot, stride_os, stride_oh,   # out [T, (split,) H, V]
    stride_lt, stride_ls, stride_lh,   # lse [T, (split,) H]
    V_DIM: tl.constexpr, R_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_V: tl.constexpr,         # V_DIM rounded up to a power of two
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" for fp32 operands, else None (Triton's default)
):
    # fp32 whatever the launcher passed (Inductor's launch of a user kernel can type a Python float as fp64,
    # which would widen the softmax state to fp64)
    qk_scale32 = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    # program order: head block fastest, then row split, then query
    n_hb = tl.cdiv(H, BLOCK_H)
    hb = pid % n_hb
    rest = pid // n_hb
    split = rest % NSPLIT
    t = (rest // NSPLIT).to(tl.int64)

    # this program's share of the query's compacted rows: [lo, hi), BLOCK_N-aligned chunks
    count = tl.load(COUNTS + t)
    chunk = tl.cdiv(tl.cdiv(count, NSPLIT), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, count)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_v = tl.arange(0, BLOCK_V)
    mask_v = offs_v < V_DIM
    q_base = Q + t * stride_qt + offs_h[:, None] * stride_qh
    q_c = tl.load(q_base + offs_v[None, :], mask=mask_h[:, None] & mask_v[None, :], other=0.0)
    if R_DIM > 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R_DIM
        q_r = tl.load(q_base + V_DIM + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    slot_base = SLOTS + t * stride_st
    # every step holds at least one valid row (start < hi), so m_i turns finite on the first step
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = tl.load(slot_base + offs_n, mask=mask_n, other=0).to(tl.int64)
        row_ptr = KV + rows * stride_kv
        kc = tl.load(row_ptr[:, None] + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        s = tl.dot(q_c, tl.trans(kc), input_precision=DOT_PRECISION)
        if R_DIM > 0:
            kr = tl.load(row_ptr[:, None] + V_DIM + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                         other=0.0)
            s = tl.dot(q_r, tl.trans(kr), acc=s, input_precision=DOT_PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale32, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(kc.dtype), kc, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptr = O + t * stride_ot + split * stride_os + offs_h[:, None] * stride_oh + offs_v[None, :]
    # an empty split (lse = -inf) need not write its partial: the merge never reads it
    n_rows = tl.zeros([BLOCK_H], tl.int32) + (hi - lo)   # (vector: the interpreter rejects scalar-bool masks)
    write_o = (n_rows > 0) | (tl.full([BLOCK_H], NSPLIT, tl.int32) == 1)
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(mask_h & write_o)[:, None] & mask_v[None, :])
    tl.store(LSE + t * stride_lt + split * stride_ls + offs_h * stride_lh, lse, mask=mask_h)
