"""DSA lightning-indexer scores, decode (S = 1) with a loop over key tiles: the kernel (host wrapper:
``ops/triton/indexer_scores.py``; the one-tile decode kernel is ``kernels/indexer_scores.py``, prefill
``kernels/indexer_scores_prefill.py``).

Why a second decode kernel: the one-tile kernel (one program per 128-key tile) is at 85-99 % of the memory
floor from 64 sequences × 10K keys up, but at the model's small batches (8 × 10240 local keys: 640 programs)
it is at ~42 %: every program waits on its slot load, then on the dependent gather of its key rows, with
nothing else of its own in flight; it reloads the query (16 KB) for every 32 KB of keys; and 640 programs of
~48 KB of shared memory make about two partial waves on 132 SMs. Here a program owns one sequence b and a run
of ``tiles_per_program`` consecutive key tiles; the host sizes the runs so the grid is about a fixed number of
programs per SM (one wave; ``choose_decode_config`` / ``decode_tiles``). The query and head weights are loaded
once, before the loop, and Triton software-pipelines the loop's loads (``num_stages``): the slots of tile
i + 2 and the gathered key rows of tile i + 1 are in flight while tile i is scored.

The arithmetic of a tile is the one-tile kernel's, op for op and in the same shapes (the [1, BLOCK_HI] weight
view, the [1, BLOCK_HI, BLOCK_L] head sum), so that at the same tile and warps the compiled dot and reduction
orders match and the scores are bit-identical (checked on GPU by tests/test_triton_kernels.py and
benchmarks/tune_indexer_decode.py): bf16 × bf16 products exact in fp32, fp32 accumulation, IEEE fp32 dots for
fp32 operands.

Differences from the one-tile kernel that do not change a score: no branch around a tile without an allowed
key (a branch inside the loop would stop the pipelining); instead the key rows are loaded under the
(allowed, slot ≥ 0) mask, so a masked key moves no bytes, and its column of the dot (columns are independent)
is discarded as -inf.

Loads of input pointers stay in this body (no ``@triton.jit`` helper), so Inductor's mutation analysis sees
only OUT written (tests/test_kernel_access.py).
"""
import triton
import triton.language as tl


@triton.jit
def indexer_scores_decode_kernel(
    Q, W, KP, KS, ALLOWED, OUT,
    scale,
    L, HI, n_chunks, tiles_per_program,
    stride_qb, stride_qh,              # q [B, 1, Hi, Di], last dim contiguous
    stride_wb,                         # w [B, 1, Hi], last dim contiguous
    stride_kp,                         # k_pool [P, Di], last dim contiguous
    stride_ksb,                        # key_slots [B, L], last dim contiguous
    stride_ab,                         # allowed [B, 1, L] (uint8), last dim contiguous
    stride_ob,                         # out [B, 1, L], last dim contiguous
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_L: tl.constexpr,
    CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,       # "ieee" for fp32 operands, else None (Triton's default)
):
    # fp32 whatever the launcher passed (Inductor's launch of a user kernel can type a Python float as fp64)
    scale32 = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    chunk = pid % n_chunks             # a sequence's runs are neighbours: they share its query in L2
    b = (pid // n_chunks).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_h = tl.arange(0, BLOCK_HI)
    mask_h = offs_h < HI
    # [1, BLOCK_HI, BLOCK_D] -> [BLOCK_HI, BLOCK_D] and [1, BLOCK_HI] -> [BLOCK_HI]: the one-tile kernel's
    # shapes at BLOCK_S = 1 (see the module docstring: same shapes, same compiled order). Padded heads load
    # q = 0 and w = 0: relu(0)·0 = 0.
    q = tl.load(Q + b * stride_qb + offs_h[None, :, None] * stride_qh + offs_d[None, None, :],
                mask=mask_h[None, :, None] & mask_d[None, None, :], other=0.0)
    q = tl.reshape(q, (BLOCK_HI, BLOCK_D))
    if CAST_F32:
        q = q.to(tl.float32)
    w = tl.load(W + b * stride_wb + offs_h[None, :], mask=mask_h[None, :], other=0.0).to(tl.float32)
    w_col = tl.reshape(w, (BLOCK_HI,))[:, None]

    n_lt = tl.cdiv(L, BLOCK_L)
    t_lo = chunk * tiles_per_program
    n_tiles = tl.minimum(tiles_per_program, n_lt - t_lo)   # the last run of a sequence may be shorter
    offs_tile = tl.arange(0, BLOCK_L)
    row_slots = KS + b * stride_ksb
    row_allowed = ALLOWED + b * stride_ab
    row_out = OUT + b * stride_ob
    # counted from 0 (Triton pipelines a loop whose bounds are plain arithmetic of the program id)
    for i in range(0, n_tiles):
        offs_l = (t_lo + i) * BLOCK_L + offs_tile
        mask_l = offs_l < L
        slot = tl.load(row_slots + offs_l, mask=mask_l, other=-1)
        has_key = slot >= 0
        ok = (tl.load(row_allowed + offs_l, mask=mask_l, other=0) != 0) & has_key
        k = tl.load(KP + slot.to(tl.int64)[:, None] * stride_kp + offs_d[None, :],
                    mask=ok[:, None] & mask_d[None, :], other=0.0)
        if CAST_F32:
            k = k.to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)     # [BLOCK_HI, BLOCK_L]
        sc = tl.maximum(sc * scale32, 0.0)
        sc = sc * w_col
        tot = tl.sum(tl.reshape(sc, (1, BLOCK_HI, BLOCK_L)), 1)         # [1, BLOCK_L]
        res = tl.where(ok[None, :], tot, float("-inf"))
        tl.store(row_out + offs_l[None, :], res, mask=mask_l[None, :])
