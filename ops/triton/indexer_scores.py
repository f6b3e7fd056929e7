"""DSA lightning-indexer scores against this rank's own index-key rows (Triton host wrapper). Three kernels, by
shape class: decode (S = 1, memory-bound: the gather of the keys) either ``kernels/indexer_scores.py``, one
key tile a program (fp32 operands), or ``kernels/indexer_scores_decode.py``, one sequence's run of key tiles a
program with the grid sized to the SMs (bf16/fp16: its prefetch path, ``DecodeConfig.prefetch``; optionally only
the tiles from the first to the last allowed key, ``DecodeConfig.live_scan``; which kernel: ``DECODE_TABLE``,
``choose_decode_config``); prefill
(S > 1, bound by the dot) ``kernels/indexer_scores_prefill.py``, a block of queries a program looping over
pipelined key tiles, with the head sum inside a warp; on an H100/H200 at DeepSeek-V3.2's indexer dims in
bf16/fp16 the warp-specialised Gluon kernel ``kernels/indexer_scores_prefill_ws.py`` instead
(``indexer_scores_ws.py``: the epilogue of one tile beside the dots of the next). Both prefill kernels take
their tiles from one pass over the mask (``prefill_tile_bounds.py``). Their designs are in the kernels'
docstrings. The local top-k that follows is ``dcp::local_topk`` (ties to the lower position: a radix select on CUDA,
``ops/triton/local_topk.py``; a stable sort elsewhere).

Precision: products and sums in fp32. bf16/fp16 operands go to the tensor cores as they are (every such
product is exact in fp32); fp32 operands (or mixed dtypes, cast to fp32) use IEEE fp32 dots, so no tf32
rounding.

Launch configs come from a fixed table by shape class (``choose_config``), not from run-time autotuning:
torch.compile traces this wrapper (``dcp::indexer_scores`` is a ``triton_op``), which rules out a choice made
by timing the data, and a new process must not pay an autotuning sweep on its first prefill (the old
autotune over six configs cost ~115 s in the fp32 GPU tests, benchmarks/RESULTS.md run 6). ``tune=True``
(benchmarks only, not traceable; decode only) runs Triton's autotuner over ``_configs()`` instead, with its
results kept on disk across processes (``cache_results``) where the installed Triton has it, so the table
can be checked against it on a new GPU. The prefill configs are swept by ``benchmarks/tune_indexer.py``.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import triton

from . import common, indexer_scores_pdl, indexer_scores_ws
from .prefill_tile_bounds import tile_bounds
from .kernels.indexer_scores import indexer_scores_kernel
from .kernels.indexer_scores_decode import indexer_scores_decode_kernel
from .kernels.indexer_scores_prefill import indexer_scores_prefill_kernel


def _configs():
    return [
        triton.Config({"BLOCK_L": bl}, num_warps=w, num_stages=s)
        for bl, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (64, 4, 4), (128, 4, 4)]
    ]


# cache_results (Triton >= 3.2) keeps each key's winner on disk; without it the sweep reruns in every process.
_CACHE_RESULTS = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)
indexer_scores_tuned = triton.autotune(
    configs=_configs(),
    key=["D", "BLOCK_HI", "BLOCK_S", "CAST_F32", "DOT_PRECISION", "TUNE_BUCKET"],
    **_CACHE_RESULTS,
)(indexer_scores_kernel)


def choose_config(block_s: int, block_hi: int, fp32_dots: bool) -> tuple[int, int, int]:
    """The one-tile kernel's (S = 1, or any S given a 3-number ``config``: how prefill ran before the prefill
    kernel) (BLOCK_L, num_warps, num_stages) by shape class. The kernel has no loop (one key tile a program),
    so stages barely matter; the tile is bounded by registers: the M = BLOCK_S·BLOCK_HI query rows of the dot,
    the BLOCK_L gathered key rows and the [M, BLOCK_L] fp32 scores.
    - tensor-core operands (bf16/fp16), M ≤ 64 (decode, 64 index heads): 128 keys, 4 warps (a wgmma tile;
      the decode benchmark, 16 × 8K keys, runs at 86–104 % of the memory floor on the autotuned kernel,
      whose candidates all had 64–256 keys: the gather of the keys, not the tile, is the cost);
    - tensor-core operands, M = 128 (prefill: 2 queries × 64 heads): 128 keys, 8 warps (the same register
      load per thread as decode);
    - IEEE fp32 dots (FMA, fp32 or mixed operands; tests and float32 models): 32 keys, so the fp32 q and key
      tiles stay in registers (q alone is M·Di/threads = 64 registers at M = 64, Di = 128, 4 warps).
    The bf16 rows are the autotuner's own candidates; benchmarks/RESULTS.md records no per-shape winner, so
    ``tune=True`` is there to check them on a GPU."""
    rows = block_s * block_hi
    if fp32_dots:
        return 32, (8 if rows > 64 else 4), 2
    return 128, (8 if rows > 64 else 4), 3


class DecodeConfig(NamedTuple):
    """Launch config of the decode kernel's key-tile loop (``kernels/indexer_scores_decode.py``, S = 1)."""
    block_l: int          # keys a tile: the dot's N
    num_warps: int
    num_stages: int       # key tiles in flight (Triton software-pipelines the loop's slot and key loads)
    programs_per_sm: int  # the grid: about this many programs an SM, one wave if they fit (``decode_tiles``)
    tiles: int = 0        # key tiles a program, overriding programs_per_sm (tests, sweeps); 0: from the SMs
    # > 0: each program first finds its sequence's live tiles (first to last tile with an allowed key) by a
    # scan of ``allowed`` in steps of this many keys (a power of two ≥ 16), and the sequence's runs share the
    # live tiles only (the tiles outside get -inf stores, no load); the grid is then the runs of
    # ``decode_runs`` (or ceil(tiles of L / tiles)). 0: fixed runs of ``decode_tiles`` over every tile.
    live_scan: int = 0
    # True: the kernel itself issues tile i + 1's key rows (and tile i + 2's slots) into registers before
    # scoring tile i (``PREFETCH`` in the kernel); run it at num_stages = 1 (Triton's pipeliner off).
    prefetch: bool = False


# The decode (S = 1) kernel by operand class: the one place to flip after benchmarks/tune_indexer_decode.py.
# A DecodeConfig runs the key-tile loop kernel (without ``prefetch``, its warps doubled above 64 index heads, as
# ``choose_config`` does); None the one-tile kernel at ``choose_config``'s config.
# - tensor cores (bf16/fp16 operands): the loop kernel's prefetch path, 64-key tiles, 4 warps, 4 programs an
#   SM (125 registers: 4 fit). Measured (benchmarks/RESULTS.md, session 8, bench_gather_ceiling.py --variants,
#   one H200, same run): 98-102 % of the copy floor (bytes / the best copy, 4.1-4.2 TB/s) at 64 x 40960 and
#   64 x 163840 keys where the one-tile kernel ran 65-67 %, 81 % at 8 x 40960 (55 %), 9.7 vs 11.9 us at the
#   recorded decode call (8 x 10240, 80 % live; there even a kernel moving the same bytes with no arithmetic
#   reaches only ~53 % of the copy floor). The one-tile kernel was bound by its own latency: the heads x keys
#   dot summed the heads across warps through shared memory (~950 instructions a tile) and each program
#   waited for its slots, then its keys, with nothing else in flight. Scores match the one-tile kernel's to
#   fp32 rounding (another head-sum order), not bit for bit.
# - IEEE fp32 dots (FMA: tests, float32 models): the one-tile kernel; not a performance target, and the
#   loop kernel's fp32 configs are not swept.
# - The live-range path (``live_scan`` > 0) skips tiles past the last allowed key: measured 3-18 % slower than
#   fixed runs with prefetch (the scan of ``allowed`` costs more than the dead tiles' masked loads).
DECODE_TABLE = {
    "tensor_cores": DecodeConfig(64, 4, 1, 4, prefetch=True),
    "fp32_dots": None,
}
# The loop kernel only while the batch has at most this many key tiles (B · ceil(L / block_l)); above, the
# one-tile kernel at ``choose_config``'s config. None: no limit. A bound on shapes only: under torch.compile
# a guard on B and L, never on data.
DECODE_LOOP_MAX_TILES: int | None = None


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """The SM count of a CUDA device (the loop kernel's grid is sized to it)."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_decode_config(B: int, L: int, block_hi: int, fp32_dots: bool):
    """The decode (S = 1) launch config by shape class: ``DECODE_TABLE``'s entry for the operands, or the
    one-tile kernel's ``choose_config`` where that entry is None or the batch has more than
    ``DECODE_LOOP_MAX_TILES`` key tiles. A ``DecodeConfig`` (loop kernel) or (BLOCK_L, num_warps,
    num_stages) (one-tile kernel)."""
    cfg = DECODE_TABLE["fp32_dots" if fp32_dots else "tensor_cores"]
    one_tile = choose_config(1, block_hi, fp32_dots)
    if cfg is None:
        return one_tile
    if DECODE_LOOP_MAX_TILES is not None and B * triton.cdiv(L, cfg.block_l) > DECODE_LOOP_MAX_TILES:
        return one_tile
    if block_hi > 64 and not cfg.prefetch:  # heads on M: 128 rows, the one-tile kernel's load a thread at 8 warps
        cfg = cfg._replace(num_warps=max(cfg.num_warps, 8))
    return cfg


def decode_tiles(B: int, n_lt: int, sms: int, programs_per_sm: int) -> int:
    """Key tiles a program of the loop kernel, for B sequences of n_lt tiles each: each sequence's tiles in
    max(1, ⌊programs_per_sm · sms / B⌋) runs of equal length (the last one shorter), so the grid, B runs a
    sequence, stays within programs_per_sm · sms programs (rounding the runs up instead would add a second
    wave of full-length runs) unless B alone is larger. Branch-free on B and L (torch.sym_max): no guard
    under torch.compile. E.g. 132 SMs, 2 a SM: 8 × 80 tiles -> 3 a program, 216 programs; 64 × 80 -> 20, 256."""
    runs = torch.sym_max(1, (programs_per_sm * sms) // B)
    return triton.cdiv(n_lt, runs)


def decode_runs(B: int, n_lt: int, sms: int, programs_per_sm: int) -> int:
    """Runs a sequence (programs) of the loop kernel's live-range path, for B sequences of n_lt tiles:
    max(1, ⌊programs_per_sm · sms / B⌋), at most n_lt. Each program takes an equal share of its sequence's
    live tiles, which the kernel counts, so the runs are not rounded to the tiles of L as in ``decode_tiles``
    (8 × 80 tiles at 132 SMs, 2 a SM: 33 runs a sequence, 2 live tiles each when 64 are live, where
    ``decode_tiles``' 27 runs of 3 tiles would leave 3 tiles a run). Branch-free on B and L (no guard)."""
    return torch.sym_min(n_lt, torch.sym_max(1, (programs_per_sm * sms) // B))


class PrefillConfig(NamedTuple):
    """Launch config of the prefill kernel (``kernels/indexer_scores_prefill.py``)."""
    block_s: int      # queries a program: the dot's N is block_s × BLOCK_HI (query, head) columns
    block_l: int      # keys a tile: the dot's M
    num_warps: int
    num_stages: int   # key tiles in flight (Triton software-pipelines the loop's loads)
    tiles: int        # key tiles a program scores before the next program takes over; 0: all of L


def choose_prefill_config(block_hi: int, fp32_dots: bool) -> PrefillConfig:
    """Prefill kernel config by shape class (S > 1 takes it whatever S and L are, so a dynamic prefill
    length needs no guard). The candidates were picked from what the H200 build showed offline (sm_90a
    through ptxas: registers, shared memory, whether the key loads were pipelined); the table follows the
    winner of ``benchmarks/tune_indexer.py --cases prefill`` on an H200 (benchmarks/RESULTS.md, session 9:
    best in all three prefill cases once the kernel stopped reading the mask in fully allowed tiles).
    - tensor-core operands (bf16/fp16): N = 256 (query, head) columns (4 queries of the model's 64 heads) ×
      64-key tiles on one warpgroup (m64n256 wgmma), 3 stages (slots, keys, dot): 64 KB of queries and two
      16 KB key tiles in shared memory and 240 registers a thread, so two programs fit an SM, one's
      epilogue beside the other's dots. N = 256 halves the shared-memory reads of the key tiles a flop
      against N = 128 (session 8's 2 × 128-key tiles on 8 warps: 65-68 % of the floor where this is 72-74 %).
      Fewer heads keep N = 256 with more queries a program.
    - IEEE fp32 dots (FMA; fp32 or mixed operands): N = 64 columns × 32 keys on 8 warps, 2 stages: under 64
      registers, no spill (4 warps or 64-key tiles spill the FMA dot's operands).
    - 64 key tiles a program (4096 keys): a short prefill chunk at a long context still fills the GPU, and
      its q block (64 KB) is re-read once per 1 MB of keys."""
    if fp32_dots:
        return PrefillConfig(max(1, 64 // block_hi), 32, 8, 2, 128)
    return PrefillConfig(max(1, 256 // block_hi), 64, 4, 3, 64)


def _check(q, w, k_pool, key_slots, allowed):
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    if k_pool.shape[1] != Di:
        raise ValueError(f"k_pool width {k_pool.shape[1]} != q width {Di}")
    if w.shape != (B, S, Hi) or key_slots.shape[0] != B or allowed.shape != (B, S, L):
        raise ValueError("shapes: w [B,S,Hi], key_slots [B,L], allowed [B,S,L]")


def _power_of_two(name, value, least):
    if value < least or value & (value - 1):
        raise ValueError(f"{name} = {value}: must be a power of two >= {least}")


def indexer_scores(q, w, k_pool, key_slots, allowed, scale: float, *, block_l: int | None = None,
                   config: tuple | None = None, tune: bool = False, pdl: bool = False):
    """DSA lightning-indexer scores of queries against this rank's own index-key rows.
    q [B, S, Hi, Di] (any float dtype), w [B, S, Hi] fp32 (per-head weights, may be negative), k_pool [P, Di],
    key_slots [B, L] int32 (row of k_pool for local key l of sequence b; -1 = no key), allowed [B, S, L] bool.
    out[b,s,l] = Σ_h w[b,s,h] * relu(scale * (q[b,s,h,:]·k_pool[key_slots[b,l],:])) computed in fp32,
    and -inf where not allowed[b,s,l] or key_slots[b,l] < 0. Returns [B, S, L] fp32. P may be 0 (every slot
    is then -1). S = 1 runs a decode kernel (``choose_decode_config``: the key-tile loop or the one-tile
    kernel), S > 1 the prefill kernel. Keyword-only overrides (tests, benchmarks): ``block_l`` the key tile;
    ``config`` a ``DecodeConfig`` (the decode loop kernel; S = 1 only), a ``PrefillConfig`` (5 numbers: the
    prefill kernel, whatever S) or (BLOCK_L, num_warps, num_stages[, maxnreg]) (the one-tile decode kernel,
    whatever S; maxnreg caps its registers a thread, None or 0 no cap);
    ``tune`` Triton's autotuner over the one-tile kernel instead of the table (S = 1 only; not traceable);
    ``pdl`` with a ``DecodeConfig``: launch it as a programmatic dependent launch (CUDA, compute capability
    >= 9; not traceable: ``indexer_scores_pdl.py``).
    Under the Triton interpreter the warps and stages of ``config`` are ignored."""
    loop_config = isinstance(config, DecodeConfig)
    if config is not None and not loop_config and len(config) not in (3, 4, 5):
        raise ValueError(f"config {config!r}: DecodeConfig(block_l, num_warps, num_stages, programs_per_sm, "
                         "tiles, live_scan) or (BLOCK_L, num_warps, num_stages[, maxnreg]) for a decode kernel, or "
                         "PrefillConfig(block_s, block_l, num_warps, num_stages, tiles) for the prefill kernel")
    _check(q, w, k_pool, key_slots, allowed)
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    device = q.device
    if loop_config and S != 1:
        raise ValueError(f"config {config!r} is the decode loop kernel's, which scores one query a sequence "
                         f"(S = 1), not S = {S}")
    if pdl and not loop_config:
        raise ValueError("pdl=True: a dependent launch of the decode loop kernel, which needs its DecodeConfig")
    if tune and loop_config:
        raise ValueError("tune=True autotunes the one-tile decode kernel; a DecodeConfig picks the loop kernel")
    prefill = (not loop_config and len(config) == 5) if config is not None else S != 1
    if tune and prefill:
        raise ValueError(f"tune=True autotunes the decode kernel (S = 1), not S = {S}: "
                         "benchmarks/tune_indexer.py sweeps the prefill kernel's configs")
    if (prefill and config is None and block_l is None and B * S * L and k_pool.shape[0]
            and indexer_scores_ws.serves(q, k_pool)):
        # Hopper, the model's indexer dims, bf16/fp16: the warp-specialised kernel (an opaque op)
        return torch.ops.dcp.indexer_scores_prefill_ws(
            common.unit_stride(q), w.to(torch.float32).contiguous(), common.unit_stride(k_pool),
            common.int32_rows(key_slots), common.uint8_mask(allowed).contiguous(), scale)
    if (not prefill and config is None and block_l is None and not tune and B * L and k_pool.shape[0]
            and indexer_scores_pdl.serves(q, k_pool, L)):
        # decode on Hopper and later, tensor-core operands: the loop kernel as a dependent launch (opaque op)
        return torch.ops.dcp.indexer_scores_decode_pdl(
            common.unit_stride(q), common.unit_stride(w.to(torch.float32)), common.unit_stride(k_pool),
            common.int32_rows(key_slots), common.unit_stride(common.uint8_mask(allowed)), scale)
    out = common.empty((B, S, L), torch.float32, device)
    if out.numel() == 0:
        return out
    if k_pool.shape[0] == 0:  # an empty pool (a rank that owns no token yet): every slot is -1
        return out.fill_(float("-inf"))
    q, k_pool = common.unit_stride(q), common.unit_stride(k_pool)
    w = common.unit_stride(w.to(torch.float32))
    key_slots = common.int32_rows(key_slots)
    allowed_u8 = common.unit_stride(common.uint8_mask(allowed))

    cast_f32 = q.dtype != k_pool.dtype
    BLOCK_HI = max(16, triton.next_power_of_2(Hi))
    BLOCK_D = max(16, triton.next_power_of_2(Di))
    meta = dict(D=Di, BLOCK_D=BLOCK_D, BLOCK_HI=BLOCK_HI, CAST_F32=cast_f32,
                DOT_PRECISION=common.dot_precision(torch.float32 if cast_f32 else q.dtype))
    fp32_dots = meta["DOT_PRECISION"] == "ieee"
    strides = (q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k_pool.stride(0),
               key_slots.stride(0), allowed_u8.stride(0), allowed_u8.stride(1), out.stride(0), out.stride(1))
    if prefill:
        _launch_prefill(q, w, k_pool, key_slots, allowed_u8, out, scale, strides, meta, block_l, config)
        return out

    if config is None and S == 1 and not tune:
        config = choose_decode_config(B, L, BLOCK_HI, fp32_dots)
    if isinstance(config, DecodeConfig):
        _launch_decode_loop(q, w, k_pool, key_slots, allowed_u8, out, scale, meta, block_l, config, pdl)
        return out

    # The one-tile kernel (decode by the table or a 3-number config; any S given a 3-number config).
    # M side of the dot = BLOCK_S × BLOCK_HI; ≤ 128 rows (registers), ≥ 1 query. Two shape classes, decode
    # (S = 1) and the rest, so a dynamic S (prefill under torch.compile) never needs a guard on its value.
    BLOCK_S = 1 if S == 1 else max(1, 128 // BLOCK_HI)
    n_sb = triton.cdiv(S, BLOCK_S)
    args = (q, w, k_pool, key_slots, allowed_u8, out, float(scale), S, L, Hi, n_sb, *strides)
    meta["BLOCK_S"] = BLOCK_S
    if tune and not common.fixed_launch(device):
        grid = lambda META: (B * n_sb * triton.cdiv(L, META["BLOCK_L"]),)  # noqa: E731
        indexer_scores_tuned[grid](*args, **meta, TUNE_BUCKET=0 if S == 1 else 1)
        return out
    if common.fixed_launch(device):
        bl, launch = 16, {}
    else:
        bl, warps, stages, *maxnreg = config or choose_config(BLOCK_S, BLOCK_HI, fp32_dots)
        launch = dict(num_warps=warps, num_stages=stages)
        if maxnreg and maxnreg[0]:  # a register cap a thread (ptxas .maxnreg): benchmarks' sweeps
            launch["maxnreg"] = maxnreg[0]
    bl = block_l or bl
    common.launch(indexer_scores_kernel)[(B * n_sb * triton.cdiv(L, bl),)](
        *args, **meta, BLOCK_L=bl, TUNE_BUCKET=0, **launch)
    return out


def _launch_decode_loop(q, w, k_pool, key_slots, allowed_u8, out, scale, meta, block_l, cfg: DecodeConfig,
                        pdl: bool = False):
    """The decode loop kernel's launch: one program a (sequence, run of ``tiles`` key tiles). ``pdl``: as a
    programmatic dependent launch (``indexer_scores_pdl.py``), launched directly: never traced (the op that
    asks for it is opaque)."""
    B, _, Hi, _ = q.shape
    L = key_slots.shape[1]
    if cfg.tiles < 0 or cfg.programs_per_sm < 1:
        raise ValueError(f"{cfg!r}: tiles >= 0 (0: from the SM count) and programs_per_sm >= 1")
    if cfg.live_scan:
        _power_of_two("live_scan", cfg.live_scan, 16)  # whole 16-key groups (the kernel's scan)
    if common.fixed_launch(q.device):
        # the interpreter: small tiles, several runs a sequence, short last runs even at test sizes
        bl, tiles, launch = block_l or 16, cfg.tiles or 2, {}
    else:
        bl, tiles = block_l or cfg.block_l, cfg.tiles
        launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _power_of_two("block_l", bl, 16)  # tl.dot needs 16 columns at least
    n_lt = triton.cdiv(L, bl)
    if tiles:
        n_chunks = triton.cdiv(n_lt, tiles)
    elif cfg.live_scan:  # the kernel sizes the runs from the live tiles it finds
        n_chunks = decode_runs(B, n_lt, num_sms(q.device), cfg.programs_per_sm)
    else:
        tiles = decode_tiles(B, n_lt, num_sms(q.device), cfg.programs_per_sm)
        n_chunks = triton.cdiv(n_lt, tiles)
    kernel = common.launch(indexer_scores_decode_kernel)
    if pdl:
        kernel = indexer_scores_decode_kernel
        launch["launch_pdl"] = True
    kernel[(B * n_chunks,)](
        q, w, k_pool, key_slots, allowed_u8, out, float(scale), L, Hi, n_chunks, tiles,
        q.stride(0), q.stride(2), w.stride(0), k_pool.stride(0), key_slots.stride(0), allowed_u8.stride(0),
        out.stride(0), **meta, BLOCK_L=bl, LIVE_SCAN=cfg.live_scan, PREFETCH=bool(cfg.prefetch), PDL=pdl,
        **launch)


def _launch_prefill(q, w, k_pool, key_slots, allowed_u8, out, scale, strides, meta, block_l, config):
    """The prefill kernel's launch: one program a (sequence, block of queries, run of key tiles)."""
    B, S, Hi, _ = q.shape
    L = key_slots.shape[1]
    if common.fixed_launch(q.device):
        # the interpreter: small tiles, several query blocks, key runs and scan steps even at test sizes
        cfg = PrefillConfig(*(config or (max(1, 32 // meta["BLOCK_HI"]), 16, 0, 0, 4)))
        launch = {}
    else:
        cfg = PrefillConfig(*(config or choose_prefill_config(meta["BLOCK_HI"], meta["DOT_PRECISION"] == "ieee")))
        launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bl = block_l or cfg.block_l
    _power_of_two("block_s", cfg.block_s, 1)
    _power_of_two("block_l", bl, 16)  # tl.dot needs 16 rows at least
    if cfg.tiles < 0:
        raise ValueError(f"tiles = {cfg.tiles}: key tiles a program, >= 0 (0: all)")
    tiles = cfg.tiles or triton.cdiv(L, bl)
    bounds = tile_bounds(allowed_u8, cfg.block_s, bl, tiles)      # [B, n_sb, n_lc, 4]: the grid's programs
    n_sb, n_lc = bounds.shape[1], bounds.shape[2]
    # relu(scale·x) = |scale|·relu(±x): the kernel folds |scale| into the head weights
    common.launch(indexer_scores_prefill_kernel)[(B * n_sb * n_lc,)](
        q, w, k_pool, key_slots, allowed_u8, out, bounds, abs(float(scale)), S, L, Hi, n_sb, n_lc, tiles,
        *strides, **meta, BLOCK_S=cfg.block_s, BLOCK_L=bl, NEG_SCALE=float(scale) < 0, **launch)
