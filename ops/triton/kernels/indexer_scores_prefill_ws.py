"""DSA lightning-indexer scores, prefill, warp-specialised for Hopper (sm_90a): a Gluon kernel (host side:
``ops/triton/indexer_scores_ws.py``). Same result as ``indexer_scores_prefill.py`` (the portable Triton
kernel), which serves every other case.

Why a second kernel: the Triton kernel runs at its maskless probe, 77-81 % of the math floor; its dots and
gathers alone run at 96-100 %. What is left is the fp32 epilogue of each 64-key × 256-column tile (relu, weight,
head sum, the store's layout conversion through shared memory behind a CTA barrier), which two programs an
SM overlap with each other's dots only in part (benchmarks/RESULTS.md, session 9). Plain ``tl.dot`` cannot put
the epilogue beside the dots inside a program; warp specialisation can (FlashAttention-3's ping-pong):

- one program an SM (128 KB of shared memory: the queries and a ring of NUM_BUF key tiles), three partitions:
  two consumer warpgroups take alternate key tiles, each an m64n256 wgmma into its own accumulator then its
  epilogue, so one's epilogue runs beside the other's dots; a producer warpgroup gathers the key rows through
  the slots with cp.async into the ring and arrives on the tile's "ready" barrier as its copies land; a
  consumer arrives on the tile's "empty" barrier once its wgmma has read it. Registers: 232 a consumer thread,
  40 a producer thread (setmaxnreg);
- no CTA-wide barrier in the loop (mbarriers only), and the scores are stored from the head sum's own layout
  (Gluon inserts no conversion through shared memory);
- the mask as in the Triton kernel, with the pass over it in a kernel of its own (``prefill_tile_bounds.py``,
  run just before on every SM: in this kernel's prologue it left the tensor cores idle, 7-8 %): the tiles with
  an allowed pair [first, last] and the run of fully allowed tiles [mid_lo, mid_hi); tiles outside [first,
  last] store -inf (no gather, no dot), tiles of [first, last] outside the full run read their mask bytes (a
  load in the head sum's layout, behind a branch uniform across the program).

Measured (H200, RESULTS.md session 10): 84-90 % of the math floor at the model's 4096-token chunks over 8-32K
keys, where the Triton kernel runs at 76-82 % in the same runs.

Fixed shape class: 64 index heads of 128 dims, 4 queries a program (N = 256 columns (query, head)), 64-key tiles:
DeepSeek-V3.2's indexer; the host side sends every other shape to the Triton kernel. The partitions read these
as module constants: Triton 3.6's ``warp_specialize`` hands a partition its arguments as values, so a constexpr
argument would reach it as a tensor.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier,
                                                              warpgroup_mma, warpgroup_mma_wait)

BLOCK_L = gl.constexpr(64)       # keys a tile: the wgmma's M
BLOCK_S = gl.constexpr(4)        # queries a program
HI = gl.constexpr(64)            # index heads: N = BLOCK_S × HI = 256
D = gl.constexpr(128)            # index head dim
NUM_BUF = gl.constexpr(4)        # key tiles in the ring (16 KB each)
NUM_THREADS_PRODUCER = gl.constexpr(128)

# the cp.async gather (Triton 3.6: async_copy_global_to_shared; later releases renamed it async_load)
gather_rows = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _gather_keys(KP, KS, ALLOWED, OUT, W, L, S, b, sb, stride_kp, stride_ksb, stride_as, stride_os, stride_ws,
                 scale_abs, first, n_live, mid_lo, mid_hi, key_bufs, ready_bars, empty_bars, q_smem, parity):
    """Producer: live tile i (key tile first + i) into ring slot i % NUM_BUF once a consumer has released it."""
    # 128 threads over a 64 × 128 tile: 16 B (8 bf16) a copy, 8 copies a thread
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, rows_layout))
    offs_r = gl.arange(0, BLOCK_L, layout=gl.SliceLayout(1, rows_layout))
    for i in range(n_live):
        s = i % NUM_BUF
        mbarrier.wait(empty_bars.index(s), ((i // NUM_BUF) & 1) ^ 1)   # a fresh barrier counts as released
        offs_l = (first + i) * BLOCK_L + offs_r
        slot = gl.load(KS + b * stride_ksb + offs_l, mask=offs_l < L, other=-1)
        # a key without a slot reads pool row 0; the consumer scores it -inf
        rows = KP + gl.maximum(slot, 0).to(gl.int64)[:, None] * stride_kp + offs_d[None, :]
        gather_rows(key_bufs.index(s), rows)
        # each thread arrives once its own copies have landed: "ready" counts NUM_THREADS_PRODUCER arrivals
        async_copy.mbarrier_arrive(ready_bars.index(s), increment_count=False)


@gluon.jit
def _score_tiles(KP, KS, ALLOWED, OUT, W, L, S, b, sb, stride_kp, stride_ksb, stride_as, stride_os, stride_ws,
                 scale_abs, first, n_live, mid_lo, mid_hi, key_bufs, ready_bars, empty_bars, q_smem, parity):
    """Consumer: live tiles parity, parity + 2, ...: relu(q·k)·|scale|·w summed over the heads, -inf where a key
    has no slot or (outside the fully allowed run) the pair is not allowed. One loop with a branch around the
    mask load (three loops as in the Triton kernel measured no faster, session 10)."""
    N: gl.constexpr = BLOCK_S * HI
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, N, 16])
    offs_n = gl.arange(0, N, layout=gl.SliceLayout(0, mma_layout))
    col_s = sb * BLOCK_S + offs_n // HI
    # padded queries: weight 0 (their scores are not stored)
    w_scaled = gl.load(W + b * stride_ws * S + col_s * stride_ws + offs_n % HI, mask=col_s < S, other=0.0) * scale_abs
    q_t = q_smem.permute((1, 0))                                      # [D, N]: the wgmma's B
    zero = gl.zeros([BLOCK_L, N], gl.float32, mma_layout)
    for i in range(parity, n_live, 2):
        s = i % NUM_BUF
        mbarrier.wait(ready_bars.index(s), (i // NUM_BUF) & 1)
        fence_async_shared()                                          # cp.async writes before the wgmma reads
        k_tile = key_bufs.index(s)
        acc = warpgroup_mma(k_tile, q_t, zero, use_acc=False, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc, k_tile, q_t])[0]
        mbarrier.arrive(empty_bars.index(s), count=1)
        x = gl.maximum(acc, 0.0) * w_scaled[None, :]
        tot = gl.sum(gl.reshape(x, [BLOCK_L, BLOCK_S, HI]), axis=2)   # [BLOCK_L, BLOCK_S]: keys × queries
        row_layout: gl.constexpr = gl.SliceLayout(1, tot.type.layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, tot.type.layout)
        t = first + i
        offs_l = t * BLOCK_L + gl.arange(0, BLOCK_L, layout=row_layout)
        offs_q = sb * BLOCK_S + gl.arange(0, BLOCK_S, layout=col_layout)
        slot = gl.load(KS + b * stride_ksb + offs_l, mask=offs_l < L, other=-1)
        res = gl.where((slot >= 0)[:, None], tot, float("-inf"))
        in_tile = (offs_l < L)[:, None] & (offs_q < S)[None, :]
        if (t < mid_lo) | (t >= mid_hi):
            # outside the fully allowed run: the tile's mask bytes (a branch uniform across the program)
            allowed = gl.load(ALLOWED + b * stride_as * S + offs_q.to(gl.int64)[None, :] * stride_as + offs_l[:, None],
                              mask=in_tile, other=0)
            res = gl.where(allowed != 0, res, float("-inf"))
        gl.store(OUT + b * stride_os * S + offs_q.to(gl.int64)[None, :] * stride_os + offs_l[:, None], res,
                 mask=in_tile)


@gluon.jit
def indexer_scores_prefill_ws_kernel(
    Q, W, KP, KS, ALLOWED, OUT,
    BOUNDS,                            # [B, n_sb, n_lc, 4] int32: first, last, mid_lo, mid_hi (prefill_tile_bounds)
    scale_abs,                         # |scale| (fp32); its sign is NEG_SCALE
    S, L, n_sb, n_lc, tiles_per_program,
    stride_qb, stride_qs, stride_qh,   # q [B, S, 64, 128], last dim contiguous
    stride_ws,                         # w [B, S, 64] fp32, contiguous: row stride (= 64)
    stride_kp,                         # k_pool [P, 128], last dim contiguous
    stride_ksb,                        # key_slots [B, L] int32, last dim contiguous
    stride_as,                         # allowed [B, S, L] uint8, contiguous: row stride (= L)
    stride_os,                         # out [B, S, L] fp32, contiguous: row stride (= L, as allowed's)
    NEG_SCALE: gl.constexpr,           # scale < 0: relu(scale·x) = |scale|·relu(-x), and -x = k·(-q)
):
    N: gl.constexpr = BLOCK_S * HI
    pid = gl.program_id(0)
    lc = pid % n_lc                    # key runs fastest: programs running together share a sequence's keys
    rest = pid // n_lc
    sb = n_sb - 1 - rest % n_sb        # late (causal: longest) query blocks first, as the Triton kernel
    b = (rest // n_sb).to(gl.int64)

    # the program's queries [N, D] (column n = query n // HI, head n % HI) into shared memory, once
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    offs_n = gl.arange(0, N, layout=gl.SliceLayout(1, q_layout))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    col_s = sb * BLOCK_S + offs_n // HI
    q = gl.load(Q + b * stride_qb + col_s[:, None] * stride_qs + (offs_n % HI)[:, None] * stride_qh
                + offs_d[None, :], mask=(col_s < S)[:, None], other=0.0)
    if NEG_SCALE:
        q = -q
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_smem = gl.allocate_shared_memory(Q.dtype.element_ty, [N, D], smem_layout, q)

    # This program's run of key tiles [t_lo, t_hi), narrowed to [first, last] (tiles holding an allowed pair of
    # its queries) and [mid_lo, mid_hi) inside it (tiles where every pair is allowed): kernels/prefill_tile_bounds.py
    # found them, on every SM at once (a pass over the mask here left the tensor cores idle: 7-8 %)
    n_lt = gl.cdiv(L, BLOCK_L)
    t_lo = lc * tiles_per_program
    t_hi = gl.minimum(t_lo + tiles_per_program, n_lt)
    row_bounds = BOUNDS + ((b * n_sb + sb) * n_lc + lc) * 4
    first = gl.load(row_bounds)
    last = gl.load(row_bounds + 1)
    mid_lo = gl.load(row_bounds + 2)
    mid_hi = gl.load(row_bounds + 3)
    n_live = gl.maximum(last + 1 - first, 0)

    # tiles outside [first, last]: -inf, no gather, no dot
    dead_layout: gl.constexpr = gl.BlockedLayout([2, 1], [32, 1], [1, 4], [0, 1])
    offs_dl = gl.arange(0, BLOCK_L, layout=gl.SliceLayout(1, dead_layout))
    offs_dq = sb * BLOCK_S + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(0, dead_layout))
    row_out = OUT + b * stride_os * S + offs_dq.to(gl.int64)[None, :] * stride_os
    no_score = gl.full([BLOCK_L, BLOCK_S], float("-inf"), gl.float32, dead_layout)
    for t in range(t_lo, first):
        offs_l = t * BLOCK_L + offs_dl
        gl.store(row_out + offs_l[:, None], no_score, mask=(offs_l < L)[:, None] & (offs_dq < S)[None, :])
    for t in range(gl.maximum(last + 1, first), t_hi):
        offs_l = t * BLOCK_L + offs_dl
        gl.store(row_out + offs_l[:, None], no_score, mask=(offs_l < L)[:, None] & (offs_dq < S)[None, :])

    key_bufs = gl.allocate_shared_memory(KP.dtype.element_ty, [NUM_BUF, BLOCK_L, D], smem_layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(ready_bars.index(i), count=NUM_THREADS_PRODUCER)   # every producer thread's cp.async arrival
        mbarrier.init(empty_bars.index(i), count=1)                      # the consumer that read the tile
    fence_async_shared()
    args = (KP, KS, ALLOWED, OUT, W, L, S, b, sb, stride_kp, stride_ksb, stride_as, stride_os, stride_ws,
            scale_abs, first, n_live, mid_lo, mid_hi, key_bufs, ready_bars, empty_bars, q_smem)
    even = pid * 0                                                    # partition arguments are IR values
    gl.warp_specialize([(_score_tiles, args + (even,)), (_score_tiles, args + (even + 1,)),
                        (_gather_keys, args + (even,))], [4, 4], [232, 40])
