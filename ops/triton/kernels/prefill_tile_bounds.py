"""Which key tiles a prefill indexer program scores, from the mask: one program a (sequence, block of queries, run
of key tiles), the same programs as the prefill kernels (``indexer_scores_prefill.py``, the warp-specialised
``indexer_scores_prefill_ws.py``), which read the four numbers this writes instead of scanning the mask.

Why a kernel of its own: the warp-specialised kernel runs one program an SM, so a pass over the mask in its
prologue (4 queries ×
every key of the run, step after dependent step) left the SM's tensor cores idle; it cost 7-8 % at 8 × 512
queries × 8K-32K keys (RESULTS.md, session 10). Here the pass runs on every SM at once, many programs an SM,
bound by the mask's bytes (one read of [B, S, L]: ~1 % of the indexer's time at those shapes).

Per program, tiles of BLOCK_L keys in its run [t_lo, t_hi):
  first, last     the first and last tile holding an allowed (query, key) pair of its queries (t_hi, t_lo - 1
                  when none: no live tile);
  mid_lo, mid_hi  the run [mid_lo, mid_hi) ⊆ [first, last] of tiles where every pair is allowed, starting at
                  the first such tile (a chunk's earlier context; empty when there is none).
Padded queries (past S) and keys past the run count as allowed for "every", not for "any".
"""
import triton
import triton.language as tl


@triton.jit
def prefill_tile_bounds_kernel(
    ALLOWED, BOUNDS,
    S, L, n_sb, n_lc, tiles_per_program,
    stride_ab, stride_as,              # allowed [B, S, L] (uint8), last dim contiguous
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
    SCAN_L: tl.constexpr,              # keys a step: a whole number of tiles
):
    pid = tl.program_id(0)             # = (b · n_sb + sb) · n_lc + lc: BOUNDS [B, n_sb, n_lc, 4]
    lc = pid % n_lc
    rest = pid // n_lc
    sb = rest % n_sb
    b = (rest // n_sb).to(tl.int64)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    row_allowed = ALLOWED + b * stride_ab + offs_s.to(tl.int64) * stride_as

    n_lt = tl.cdiv(L, BLOCK_L)
    t_lo = lc * tiles_per_program
    t_hi = tl.minimum(t_lo + tiles_per_program, n_lt)
    l_end = tl.minimum(t_hi * BLOCK_L, L)
    offs_c = tl.arange(0, SCAN_L)
    TILES_A_STEP: tl.constexpr = SCAN_L // BLOCK_L
    offs_ct = tl.arange(0, TILES_A_STEP)
    first = t_hi
    last = t_lo - 1
    full_lo = t_hi
    full_hi = t_hi
    for c in range(t_lo * BLOCK_L, l_end, SCAN_L):
        offs = c + offs_c
        in_run = (offs < l_end)[None, :] & mask_s[:, None]
        a = tl.load(row_allowed[:, None] + offs[None, :], mask=in_run, other=1)
        key_any = tl.max(tl.where(in_run, a, 0), 0)                   # [SCAN_L]: some query of the block
        key_all = tl.min(a, 0)                                         # [SCAN_L]: every query of the block
        tile_any = tl.max(tl.reshape(key_any, (TILES_A_STEP, BLOCK_L)), 1) != 0
        tile_full = (tl.min(tl.reshape(key_all, (TILES_A_STEP, BLOCK_L)), 1) != 0) & tile_any
        t_idx = c // BLOCK_L + offs_ct
        first = tl.minimum(first, tl.min(tl.where(tile_any, t_idx, t_hi), 0))
        last = tl.maximum(last, tl.max(tl.where(tile_any, t_idx, t_lo - 1), 0))
        # steps come in key order, so full_lo is final once a step has set it
        full_lo = tl.minimum(full_lo, tl.min(tl.where(tile_full, t_idx, t_hi), 0))
        breaks_run = ~tile_full & (t_idx > full_lo) & (t_idx < t_hi)     # a tile after full_lo, not full
        full_hi = tl.minimum(full_hi, tl.min(tl.where(breaks_run, t_idx, t_hi), 0))
    mid_lo = tl.minimum(tl.maximum(full_lo, first), last + 1)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), last + 1)
    k = tl.arange(0, 4)
    bounds = tl.where(k == 0, first, tl.where(k == 1, last, tl.where(k == 2, mid_lo, mid_hi)))
    tl.store(BOUNDS + pid.to(tl.int64) * 4 + k, bounds)
