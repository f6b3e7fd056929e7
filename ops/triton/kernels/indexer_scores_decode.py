"""DSA lightning-indexer scores, decode (S = 1) with a loop over key tiles: the kernel (host wrapper:
``ops/triton/indexer_scores.py``; the one-tile decode kernel is ``kernels/indexer_scores.py``, prefill
``kernels/indexer_scores_prefill.py``).

Why a second decode kernel: the one-tile kernel (one program per 128-key tile) was measured at 85-99 % of the
memory floor from 64 sequences × 10K keys up (against a torch copy that session 8 found 35 % under the real
copy ceiling: it is at 66-68 % of the true floor there; see "Prefetch" below), but at the model's small batches
(8 × 10240 local keys: 640 programs) it is at ~42 %: every program waits on its slot load, then on the
dependent gather of its key rows, with nothing else of its own in flight; it reloads the query (16 KB) for
every 32 KB of keys; and 640 programs of ~48 KB of shared memory make about two partial waves on 132 SMs. Here
a program owns one sequence b and a run of ``tiles_per_program`` consecutive key tiles; the host sizes the runs
so the grid is about a fixed number of programs per SM (one wave; ``choose_decode_config`` / ``decode_tiles``).
The query and head weights are loaded once, before the loop, and Triton software-pipelines the loop's loads
(``num_stages``): the slots of tile i + 2 and the gathered key rows of tile i + 1 are in flight while tile i is
scored.

Without ``PREFETCH`` the arithmetic of a tile is the one-tile kernel's, op for op and in the same shapes (the
[1, BLOCK_HI] weight view, the [1, BLOCK_HI, BLOCK_L] head sum), so that at the same tile and warps the compiled
dot and reduction orders match and the scores are bit-identical (checked on GPU by tests/test_triton_kernels.py and
benchmarks/tune_indexer_decode.py): bf16 × bf16 products exact in fp32, fp32 accumulation, IEEE fp32 dots for
fp32 operands.

Differences from the one-tile kernel that do not change a score: no branch around a tile without an allowed
key (a branch inside the loop would stop the pipelining); instead the key rows are loaded under a mask, so a
masked key moves no bytes, and its column of the dot (columns are independent) is discarded as -inf. With
fixed runs the mask is (allowed, slot ≥ 0); on the live-range path below it is slot ≥ 0 alone, as in the
one-tile kernel (why: the last point below).

Live range (``LIVE_SCAN`` > 0). With fixed runs, a program whose run lies past its sequence's last allowed key
still walks it (slot and allowed loads, an empty dot), and the runs inside the sequence are as long as ever: at
the recorded decode call (20 % of each sequence's slots past its end) the loop kernel took about the time of
the all-live call. Instead each program first reads its sequence's whole ``allowed`` row (a byte a key; L2
hits for all but the first of the sequence's programs), in steps of ``LIVE_SCAN`` keys, the first step loaded
beside the query, and takes the key tiles [t_first, t_end) from the first to the last tile holding an allowed
key. Only ``allowed`` is read: a key outside the range is never scored whatever its slot, so the range is
conservative for any mask and any slots, and a tile inside it without a live key is handled by the masks.
The sequence's ``n_chunks`` programs split the live tiles into equal runs, and split the tiles outside the
range, which only store -inf (no load), the same way in a separate store loop. The grid stays B × n_chunks
whatever the data; the scoring loop's body is the same, so the scores stay bit-identical.
- The scan reduces 16-key groups (a thread's 16-byte load; a key tile holds whole groups, so the tile range
  is exact): a max over a thread's own bytes, then one index compare a group. Comparing every key's index
  took ~220 registers at 8192 keys a step (offline sm_90a build, Triton 3.9) and ptxas then issued the
  query's loads only after the scan's bytes had arrived; by groups it is ~125 (as without the scan) and the
  query's loads issue first. At 16384 keys a step (4 warps) ptxas again starts on the scan's bytes first.
- Keys masked by the slots alone: Triton 3.9 pipelines the key copy one tile ahead and waits for every copy
  in flight at the top of each iteration; the allowed bytes are a plain load inside the loop, so a key copy
  masked by them waited for that load too. In decode a key with a slot is allowed unless it is masked (left
  padding), so the extra bytes are rare (the one-tile kernel loads the same rows).

Prefetch (``PREFETCH``; the decode default for bf16/fp16 operands, ``DECODE_TABLE``). Session 8 measured
the one-tile kernel and this loop at 65-68 % of the copy floor at 64 × 40960 and 64 × 163840 keys, where a
kernel with the same loads and no arithmetic (benchmarks/bench_gather_ceiling.py) reached 98 %: the memory
system gives the gather pattern its full bandwidth, the kernels did not ask for it. Two causes, both fixed
here:
- The heads × keys dot puts the heads on M, which the tensor-core accumulator spreads over the four warps,
  so the head sum went through shared memory: ~950 instructions a thread a tile (offline sm_90a build,
  Triton 3.6), ~100 of them shuffles. ``_score_tile_keys_on_m`` takes the dot as keys × heads, so the head
  sum runs along N, inside a thread and its quad: ~640 instructions at 128 keys, ~380 at 64.
- Triton's pipeliner kept one key tile in flight, and a program then waited for its slots, then its keys.
  Here the kernel holds tile i + 1's key rows in registers, loaded (with its slots two tiles ahead) before
  tile i is scored, at num_stages = 1 (no pipeliner): the gather of the next tile is in flight during the
  store to shared memory, the dot and the epilogue of this one (checked in the SASS: the next tile's 16
  LDG.128 a thread come before the tile's HGMMAs).
At 64 keys × 4 warps (125 registers, 4 programs an SM) it runs 98-102 % of the copy floor from 64 × 40K keys
up, 81 % at 8 × 40960, and 84-91 % of the no-arithmetic kernel at the model's small decode calls, where that
kernel itself is at 54-81 % of the floor (launch and the first round trip). Its scores equal the one-tile
kernel's to fp32 rounding (another head-sum order), not bit for bit; the mask, -inf pattern and every
product are the same. The live-range scan composes with it (``LIVE_SCAN``) but measured 3-18 % slower.

PDL (``PDL``: launched with ``launch_pdl`` by ``ops/triton/indexer_scores_pdl.py``, an opt-in). The programs
may start before the previous kernel of the stream has finished, so the body begins with ``gdc_wait``
(``griddepcontrol.wait``: the previous kernel complete, its writes visible) before any load; the scores are the
plain launch's, bit for bit. (Session 11 also tried prefetching each program's first key rows into L2 before
the wait, from the slots as they stood: slower at every depth, 1-4 tiles; removed, commit 433409c has it.)

Loads of input pointers stay in this body (the ``@triton.jit`` helpers take values only), so Inductor's
mutation analysis sees only OUT written (tests/test_kernel_access.py).
"""
import triton
import triton.language as tl


@triton.jit
def indexer_scores_decode_kernel(
    Q, W, KP, KS, ALLOWED, OUT,
    scale,
    L, HI, n_chunks, tiles_per_program,  # runs a sequence; tiles a run (LIVE_SCAN = 0 only)
    stride_qb, stride_qh,              # q [B, 1, Hi, Di], last dim contiguous
    stride_wb,                         # w [B, 1, Hi], last dim contiguous
    stride_kp,                         # k_pool [P, Di], last dim contiguous
    stride_ksb,                        # key_slots [B, L], last dim contiguous
    stride_ab,                         # allowed [B, 1, L] (uint8), last dim contiguous
    stride_ob,                         # out [B, 1, L], last dim contiguous
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_L: tl.constexpr,
    CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,       # "ieee" for fp32 operands, else None (Triton's default)
    LIVE_SCAN: tl.constexpr,           # keys a step of the live-range scan over ``allowed``; 0: fixed runs
    PREFETCH: tl.constexpr,            # the next tile's loads issued by hand before a tile is scored
    PDL: tl.constexpr,                 # launched as a dependent launch: wait for the previous kernel first
):
    # fp32 whatever the launcher passed (Inductor's launch of a user kernel can type a Python float as fp64)
    scale32 = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    chunk = pid % n_chunks             # a sequence's runs are neighbours: they share its query in L2
    b = (pid // n_chunks).to(tl.int64)

    row_slots = KS + b * stride_ksb
    row_allowed = ALLOWED + b * stride_ab
    row_out = OUT + b * stride_ob
    if PDL:
        # the previous kernel may still be running: nothing is read before its writes are visible
        tl.extra.cuda.gdc_wait()
    if LIVE_SCAN > 0:
        # The live-range scan's first step is loaded before the query: both round trips in flight together
        # (the query's copy to shared memory for the dot waits for its load, before any later load issues).
        # Keys in groups of 16 (a thread's 16-byte load): a group's max is a thread's own bytes, and only the
        # groups' indices are compared; a key tile (BLOCK_L ≥ 16, a power of two) holds whole groups.
        offs_g = tl.arange(0, LIVE_SCAN // 16)
        offs_c = offs_g[:, None] * 16 + tl.arange(0, 16)[None, :]
        allowed_head = tl.load(row_allowed + offs_c, mask=offs_c < L, other=0)

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
    offs_tile = tl.arange(0, BLOCK_L)
    if LIVE_SCAN > 0:
        # The first and last group of 16 keys holding an allowed key (L // 16 + 1 and -1 where none does),
        # reduced a step at a time (vectors carried across the steps would cost registers a key a thread);
        # the steps after the first only where L > LIVE_SCAN.
        hit = tl.max(allowed_head, 1) != 0
        first_group = tl.min(tl.where(hit, offs_g, L // 16 + 1), 0)
        last_group = tl.max(tl.where(hit, offs_g, -1), 0)
        for c in range(LIVE_SCAN, L, LIVE_SCAN):
            offs = c + offs_c
            hit = tl.max(tl.load(row_allowed + offs, mask=offs < L, other=0), 1) != 0
            first_group = tl.minimum(first_group, tl.min(tl.where(hit, c // 16 + offs_g, L // 16 + 1), 0))
            last_group = tl.maximum(last_group, tl.max(tl.where(hit, c // 16 + offs_g, -1), 0))
        t_end = (last_group * 16 + BLOCK_L) // BLOCK_L        # 0 where no key is allowed
        t_first = tl.minimum(first_group * 16 // BLOCK_L, t_end)
        n_live = t_end - t_first
        run = tl.cdiv(n_live, n_chunks)                       # 0 where no key is allowed
        t_lo = t_first + chunk * run
        n_tiles = tl.maximum(tl.minimum(run, t_end - t_lo), 0)
        # The tiles outside [t_first, t_end), numbered 0 .. n_dead - 1 (those before t_first first), split
        # into runs the same way: -inf stores only, no load. Before the scoring loop, so that they are issued
        # while its first loads are in flight.
        n_dead = n_lt - n_live
        dead_run = tl.cdiv(n_dead, n_chunks)
        d_lo = chunk * dead_run
        no_score = tl.full([BLOCK_L], float("-inf"), tl.float32)
        for j in range(d_lo, tl.minimum(d_lo + dead_run, n_dead)):
            offs_l = tl.where(j < t_first, j, j + n_live) * BLOCK_L + offs_tile
            tl.store(row_out + offs_l, no_score, mask=offs_l < L)
    else:
        t_lo = chunk * tiles_per_program
        n_tiles = tl.minimum(tiles_per_program, n_lt - t_lo)   # the last run of a sequence may be shorter
    if PREFETCH:
        # Registers, not Triton's pipeliner, keep the next tile in flight (module docstring, "Prefetch"): tile
        # i's slots, allowed bytes and key rows were issued an iteration earlier, tile i + 1's slots two.
        q_t = tl.trans(q)                                    # [BLOCK_D, BLOCK_HI]: keys on the dot's M axis
        w_row = tl.reshape(w, (BLOCK_HI,))[None, :]
        run_end = tl.minimum((t_lo + n_tiles) * BLOCK_L, L)   # keys past it: masked (another run's, or none)
        offs_l = t_lo * BLOCK_L + offs_tile
        mask_l = offs_l < run_end
        slot = tl.load(row_slots + offs_l, mask=mask_l, other=-1)
        allowed = tl.load(row_allowed + offs_l, mask=mask_l, other=0)
        k = tl.load(KP + slot.to(tl.int64)[:, None] * stride_kp + offs_d[None, :],
                    mask=(slot >= 0)[:, None] & mask_d[None, :], other=0.0)
        mask_n = offs_l + BLOCK_L < run_end
        slot_n = tl.load(row_slots + offs_l + BLOCK_L, mask=mask_n, other=-1)
        allowed_n = tl.load(row_allowed + offs_l + BLOCK_L, mask=mask_n, other=0)
        for i in range(0, n_tiles):
            k_n = tl.load(KP + slot_n.to(tl.int64)[:, None] * stride_kp + offs_d[None, :],
                          mask=(slot_n >= 0)[:, None] & mask_d[None, :], other=0.0)
            mask_nn = offs_l + 2 * BLOCK_L < run_end
            slot_nn = tl.load(row_slots + offs_l + 2 * BLOCK_L, mask=mask_nn, other=-1)
            allowed_nn = tl.load(row_allowed + offs_l + 2 * BLOCK_L, mask=mask_nn, other=0)
            res = _score_tile_keys_on_m(q_t, k, w_row, (allowed != 0) & (slot >= 0), scale32, CAST_F32,
                                        DOT_PRECISION)
            tl.store(row_out + offs_l, res, mask=mask_l)
            offs_l += BLOCK_L
            mask_l = offs_l < run_end
            slot, allowed, k = slot_n, allowed_n, k_n
            slot_n, allowed_n = slot_nn, allowed_nn
    else:
        # counted from 0: Triton (3.9) does not pipeline a loop whose lower bound is a reduction's result (the
        # live range's); an upper bound from one is pipelined (kernels/indexer_scores_prefill.py does the same)
        for i in range(0, n_tiles):
            offs_l = (t_lo + i) * BLOCK_L + offs_tile
            mask_l = offs_l < L
            slot = tl.load(row_slots + offs_l, mask=mask_l, other=-1)
            has_key = slot >= 0
            ok = (tl.load(row_allowed + offs_l, mask=mask_l, other=0) != 0) & has_key
            k = tl.load(KP + slot.to(tl.int64)[:, None] * stride_kp + offs_d[None, :],
                        mask=(has_key if LIVE_SCAN > 0 else ok)[:, None] & mask_d[None, :], other=0.0)
            res = _score_tile(q, k, w_col, ok, scale32, CAST_F32, DOT_PRECISION, BLOCK_HI, BLOCK_L)
            tl.store(row_out + offs_l[None, :], res, mask=mask_l[None, :])


@triton.jit
def _score_tile_keys_on_m(q_t, k, w_row, ok, scale32, CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_L] scores of one key tile with the dot transposed, keys × heads: the head sum runs along the
    accumulator's N axis, inside a warp (a thread's registers, then the four lanes of a quad), where the
    heads × keys dot of ``_score_tile`` sums across warps through shared memory (module docstring)."""
    if CAST_F32:
        k = k.to(tl.float32)
    sc = tl.dot(k, q_t, input_precision=DOT_PRECISION)             # [BLOCK_L, BLOCK_HI]
    sc = tl.maximum(sc * scale32, 0.0)
    sc = sc * w_row
    return tl.where(ok, tl.sum(sc, 1), float("-inf"))


@triton.jit
def _score_tile(q, k, w_col, ok, scale32, CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_HI: tl.constexpr, BLOCK_L: tl.constexpr):
    """[1, BLOCK_L] scores of one key tile: the one-tile kernel's arithmetic in its shapes (module docstring);
    -inf where not ``ok``. Values only (no pointers), so the kernel's loads and stores stay in its body."""
    if CAST_F32:
        k = k.to(tl.float32)
    sc = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)     # [BLOCK_HI, BLOCK_L]
    sc = tl.maximum(sc * scale32, 0.0)
    sc = sc * w_col
    tot = tl.sum(tl.reshape(sc, (1, BLOCK_HI, BLOCK_L)), 1)         # [1, BLOCK_L]
    return tl.where(ok[None, :], tot, float("-inf"))
