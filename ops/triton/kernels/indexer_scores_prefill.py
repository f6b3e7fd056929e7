"""DSA lightning-indexer scores, prefill (several queries a sequence): the kernel (host wrapper:
``ops/triton/indexer_scores.py``; decode, S = 1, has its own kernel, ``kernels/indexer_scores.py``).

Prefill is bound by the dot (2·S·Hi·Di flops a key), so the layout is chosen for it:

- A program owns one sequence b and BLOCK_S queries (all their heads: N = BLOCK_S × BLOCK_HI columns) and
  loops over a run of key tiles. Its queries are loaded once, before the loop; each iteration gathers one
  tile of BLOCK_L key rows through ``key_slots``, and Triton software-pipelines those loads (``num_stages``).
- The dot is transposed, keys × (query, head): [BLOCK_L, D] · [D, BLOCK_S·BLOCK_HI]. The head sum then runs
  along the dot's N axis, which the tensor-core accumulator keeps inside one warp (a thread's registers,
  then shuffles among the four lanes of a quad): no shared-memory round trip of the [M, N] scores, which
  the M-side head sum of the decode kernel needs.
- relu(scale·x)·w = relu(±x)·(|scale|·w): the scale is folded into the per-column weights, so the epilogue
  is a max and a multiply-add per score. Products and sums stay fp32 (no tf32: bf16 × bf16 is exact in fp32;
  fp32 operands use IEEE dots).
- Key tiles before the first and after the last tile holding an allowed (query, key) pair load no key and
  do no dot; they store -inf (causal prefill skips about half). A tile between them is scored in full; the
  tiles where every pair is allowed (a chunk's earlier context) skip the per-tile ``allowed`` load and its
  layout conversion (through shared memory, with a barrier): that mask cost 15 % of the kernel at 8 × 512
  queries × 32K keys (benchmarks/bench_prefill_indexer_probe.py, RESULTS.md session 9). Which tiles those are
  comes from ``kernels/prefill_tile_bounds.py``, run before this kernel (as for the warp-specialised one).

Loads of input pointers stay in this body (no ``@triton.jit`` helper), so Inductor's mutation analysis sees
only OUT written (tests/test_kernel_access.py).
"""
import triton
import triton.language as tl


@triton.jit
def indexer_scores_prefill_kernel(
    Q, W, KP, KS, ALLOWED, OUT,
    BOUNDS,                            # [B, n_sb, n_lc, 4] int32: first, last, mid_lo, mid_hi (prefill_tile_bounds)
    scale_abs,                         # |scale|; its sign is NEG_SCALE
    S, L, HI, n_sb, n_lc, tiles_per_program,
    stride_qb, stride_qs, stride_qh,   # q [B, S, Hi, Di], last dim contiguous
    stride_wb, stride_ws,              # w [B, S, Hi], last dim contiguous
    stride_kp,                         # k_pool [P, Di], last dim contiguous
    stride_ksb,                        # key_slots [B, L], last dim contiguous
    stride_ab, stride_as,              # allowed [B, S, L] (uint8), last dim contiguous
    stride_ob, stride_os,              # out [B, S, L], last dim contiguous
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr, CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,       # "ieee" for fp32 operands, else None (Triton's default)
    NEG_SCALE: tl.constexpr,           # scale < 0: relu(scale·x) = |scale|·relu(-x)
):
    N: tl.constexpr = BLOCK_S * BLOCK_HI
    # fp32 whatever the launcher passed (Inductor's launch of a user kernel can type a Python float as fp64)
    scale32 = tl.cast(scale_abs, tl.float32)
    pid = tl.program_id(0)
    lc = pid % n_lc                    # key chunks fastest: programs running together share a sequence's keys
    rest = pid // n_lc
    # query blocks last to first: in a causal chunk the late queries see the most keys, so the longest programs
    # start first and the short ones fill in behind them (launched first to last, they made the tail)
    sb = n_sb - 1 - rest % n_sb
    b = (rest // n_sb).to(tl.int64)

    # column n of the dot = (query sb·BLOCK_S + n // BLOCK_HI, head n % BLOCK_HI)
    offs_n = tl.arange(0, N)
    col_s = sb * BLOCK_S + offs_n // BLOCK_HI
    col_h = offs_n % BLOCK_HI
    mask_n = (col_s < S) & (col_h < HI)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + b * stride_qb + col_s[:, None] * stride_qs + col_h[:, None] * stride_qh + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    q_t = tl.trans(q)                  # [BLOCK_D, N]
    # padded heads / queries: q = 0 and weight 0, so they add relu(0)·0 = 0
    w = tl.load(W + b * stride_wb + col_s * stride_ws + col_h, mask=mask_n, other=0.0).to(tl.float32)
    w_scaled = w * scale32

    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    # int64: S·L can pass 2^31 in a long prefill at a long context
    row_allowed = ALLOWED + b * stride_ab + offs_s.to(tl.int64) * stride_as
    row_out = OUT + b * stride_ob + offs_s.to(tl.int64) * stride_os

    # This program's run of key tiles, [t_lo, t_hi), narrowed to [first, last], the tiles holding an allowed
    # pair of its queries, and within it [mid_lo, mid_hi), the run of tiles where every pair is allowed (the
    # keys before a causal chunk: most of a long context): found by a pass over the mask before this kernel
    # (kernels/prefill_tile_bounds.py, every SM at once; in this prologue it held up the program's first dot).
    # A branch around the dot inside the scoring loop would keep Triton from pipelining the key loads, so loop
    # bounds carry the skip and the mask instead.
    n_lt = tl.cdiv(L, BLOCK_L)
    t_lo = lc * tiles_per_program
    t_hi = tl.minimum(t_lo + tiles_per_program, n_lt)
    row_bounds = BOUNDS + ((b * n_sb + sb) * n_lc + lc) * 4
    first = tl.load(row_bounds)
    last = tl.load(row_bounds + 1)
    mid_lo = tl.load(row_bounds + 2)
    mid_hi = tl.load(row_bounds + 3)

    offs_tile = tl.arange(0, BLOCK_L)
    no_score = tl.full([BLOCK_L, BLOCK_S], float("-inf"), tl.float32)
    for t in range(t_lo, first):
        offs_l = t * BLOCK_L + offs_tile
        tl.store(row_out[None, :] + offs_l[:, None], no_score, mask=(offs_l < L)[:, None] & mask_s[None, :])
    # [first, mid_lo) and [mid_hi, last] read the mask a tile; [mid_lo, mid_hi) does not: one loop body,
    # three pipelined loops
    for part in tl.static_range(3):
        if part == 0:
            t_start = first
            n_tiles = mid_lo - first
        elif part == 1:
            t_start = mid_lo
            n_tiles = mid_hi - mid_lo
        else:
            t_start = mid_hi
            n_tiles = last + 1 - mid_hi
        # counted from 0: Triton (3.9) does not pipeline this loop when its lower bound is a reduction's result
        for i in range(0, n_tiles):
            t = t_start + i
            offs_l = t * BLOCK_L + offs_tile
            mask_l = offs_l < L
            slot = tl.load(KS + b * stride_ksb + offs_l, mask=mask_l, other=-1)
            has_key = slot >= 0
            # unmasked rows: a key without a slot reads pool row 0 and its score is replaced by -inf below
            # (the masks cost ~10 % of the loop's instructions); the head dim is masked only when padded
            k_rows = KP + tl.maximum(slot, 0).to(tl.int64)[:, None] * stride_kp + offs_d[None, :]
            if BLOCK_D == D:
                k = tl.load(k_rows)
            else:
                k = tl.load(k_rows, mask=mask_d[None, :], other=0.0)
            if CAST_F32:
                k = k.to(tl.float32)
            x = tl.dot(k, q_t, input_precision=DOT_PRECISION)          # [BLOCK_L, N]: q·k per (key, column)
            if NEG_SCALE:
                x = -x
            x = tl.maximum(x, 0.0) * w_scaled[None, :]
            tot = tl.sum(tl.reshape(x, (BLOCK_L, BLOCK_S, BLOCK_HI)), 2)  # head sum, within a warp
            if part == 1:
                res = tl.where(has_key[:, None], tot, float("-inf"))
            else:
                # [BLOCK_L, BLOCK_S]: keys on the dot's M axis, queries after the head sum
                allowed = tl.load(row_allowed[None, :] + offs_l[:, None], mask=mask_l[:, None] & mask_s[None, :],
                                  other=0)
                res = tl.where((allowed != 0) & has_key[:, None], tot, float("-inf"))
            tl.store(row_out[None, :] + offs_l[:, None], res, mask=mask_l[:, None] & mask_s[None, :])
    for t in range(tl.maximum(last + 1, first), t_hi):
        offs_l = t * BLOCK_L + offs_tile
        tl.store(row_out[None, :] + offs_l[:, None], no_score, mask=(offs_l < L)[:, None] & mask_s[None, :])
