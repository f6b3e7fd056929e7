"""DSA lightning-indexer scores against this rank's own index-key rows: the kernel (host wrapper:
``ops/triton/indexer_scores.py``). Gather of the key rows through ``key_slots`` + dot with every index head
+ relu + weighted head sum + mask, fused.

A program owns one sequence b, BLOCK_S queries and BLOCK_L local keys. The queries' heads are flattened into
the M side of one ``tl.dot`` (M = BLOCK_S × BLOCK_HI), so each gathered key row is read once per program and
scored against all heads of all its queries; the per-head scores never reach memory. A key tile with no
allowed (query, key) pair is skipped (causal prefill skips about half).
"""
import triton
import triton.language as tl


@triton.jit
def indexer_scores_kernel(
    Q, W, KP, KS, ALLOWED, OUT,
    scale,
    S, L, HI, n_sb,
    stride_qb, stride_qs, stride_qh,   # q [B, S, Hi, Di], last dim contiguous
    stride_wb, stride_ws,              # w [B, S, Hi], last dim contiguous
    stride_kp,                         # k_pool [P, Di], last dim contiguous
    stride_ksb,                        # key_slots [B, L], last dim contiguous
    stride_ab, stride_as,              # allowed [B, S, L] (uint8 view), last dim contiguous
    stride_ob, stride_os,              # out [B, S, L], last dim contiguous
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr, CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,       # "ieee" for fp32 operands, else None (Triton's default)
    TUNE_BUCKET: tl.constexpr,         # autotune key only (the host wrapper's decode / prefill bucket)
):
    # fp32 whatever the launcher passed (Inductor's launch of a user kernel can type a Python float as fp64,
    # which would widen the scores to fp64)
    scale32 = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    n_lb = tl.cdiv(L, BLOCK_L)
    lb = pid % n_lb
    rest = pid // n_lb
    sb = rest % n_sb
    b = (rest // n_sb).to(tl.int64)

    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    slot = tl.load(KS + b * stride_ksb + offs_l, mask=mask_l, other=-1)
    has_key = slot >= 0
    allowed = tl.load(ALLOWED + b * stride_ab + offs_s[:, None] * stride_as + offs_l[None, :],
                      mask=mask_s[:, None] & mask_l[None, :], other=0)
    ok = (allowed != 0) & has_key[None, :]

    res = tl.full([BLOCK_S, BLOCK_L], float("-inf"), tl.float32)
    if tl.max(ok.to(tl.int32)) > 0:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        offs_h = tl.arange(0, BLOCK_HI)
        mask_h = offs_h < HI
        k = tl.load(KP + slot.to(tl.int64)[:, None] * stride_kp + offs_d[None, :],
                    mask=has_key[:, None] & mask_d[None, :], other=0.0)
        q = tl.load(Q + b * stride_qb + offs_s[:, None, None] * stride_qs + offs_h[None, :, None] * stride_qh
                    + offs_d[None, None, :],
                    mask=mask_s[:, None, None] & mask_h[None, :, None] & mask_d[None, None, :], other=0.0)
        q = tl.reshape(q, (BLOCK_S * BLOCK_HI, BLOCK_D))
        if CAST_F32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        sc = tl.maximum(sc * scale32, 0.0)
        w = tl.load(W + b * stride_wb + offs_s[:, None] * stride_ws + offs_h[None, :],
                    mask=mask_s[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        sc = sc * tl.reshape(w, (BLOCK_S * BLOCK_HI,))[:, None]
        tot = tl.sum(tl.reshape(sc, (BLOCK_S, BLOCK_HI, BLOCK_L)), 1)
        res = tl.where(ok, tot, float("-inf"))
    tl.store(OUT + b * stride_ob + offs_s[:, None] * stride_os + offs_l[None, :], res,
             mask=mask_s[:, None] & mask_l[None, :])
