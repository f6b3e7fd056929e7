"""DSA lightning-indexer scores against this rank's own index-key rows (Triton host wrapper). Two kernels, by
shape class: decode (S = 1, memory-bound: the gather of the keys) ``kernels/indexer_scores.py``, one key
tile a program; prefill (S > 1, bound by the dot) ``kernels/indexer_scores_prefill.py``, a block of queries a
program looping over pipelined key tiles, with the head sum inside a warp. Their designs are in the kernels'
docstrings. The local top-k that follows is ``dcp::local_topk`` (ties to the
lower position: a radix select on CUDA, ``ops/triton/local_topk.py``; a stable sort elsewhere).

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

import inspect
from typing import NamedTuple

import torch
import triton

from . import common
from .kernels.indexer_scores import indexer_scores_kernel
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


class PrefillConfig(NamedTuple):
    """Launch config of the prefill kernel (``kernels/indexer_scores_prefill.py``)."""
    block_s: int      # queries a program: the dot's N is block_s × BLOCK_HI (query, head) columns
    block_l: int      # keys a tile: the dot's M
    num_warps: int
    num_stages: int   # key tiles in flight (Triton software-pipelines the loop's loads)
    tiles: int        # key tiles a program scores before the next program takes over; 0: all of L


# Keys a step of the prefill kernel's pass over ``allowed`` (finding the tiles to score): [block_s, SCAN_L] bytes.
SCAN_L = 512


def choose_prefill_config(block_hi: int, fp32_dots: bool) -> PrefillConfig:
    """Prefill kernel config by shape class (S > 1 takes it whatever S and L are, so a dynamic prefill
    length needs no guard). The candidates were picked from what the H200 build showed offline (sm_90a
    through ptxas: registers, shared memory, whether the key loads were pipelined); the table follows the
    winner of ``benchmarks/tune_indexer.py --cases prefill`` on an H200 (benchmarks/RESULTS.md, 2026-11-28,
    2 x H200 run 4: 2 stages won in all three prefill cases, 5 % over 3 stages; 58-63 % of the floor, 3.4x
    the one-tile kernel).
    - tensor-core operands (bf16/fp16), 64 index heads: 2 queries (N = 128 columns) × 128-key tiles on 8
      warps (two warpgroups, m64n128 wgmma each), 2 stages: the q block stays in shared memory with a key
      tile in flight, so two programs fit an SM, one's epilogue beside the other's dots. Fewer heads keep
      N = 128 columns with more queries a program.
    - IEEE fp32 dots (FMA; fp32 or mixed operands): N = 64 columns × 32 keys on 8 warps, 2 stages: under 64
      registers, no spill (4 warps or 64-key tiles spill the FMA dot's operands).
    - 32 key tiles a program (4096 keys at 128): a short prefill chunk at a long context still fills the GPU,
      and its q block (32 KB) is re-read once per 1 MB of keys."""
    if fp32_dots:
        return PrefillConfig(max(1, 64 // block_hi), 32, 8, 2, 128)
    return PrefillConfig(max(1, 128 // block_hi), 128, 8, 2, 32)


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
                   config: tuple | None = None, tune: bool = False):
    """DSA lightning-indexer scores of queries against this rank's own index-key rows.
    q [B, S, Hi, Di] (any float dtype), w [B, S, Hi] fp32 (per-head weights, may be negative), k_pool [P, Di],
    key_slots [B, L] int32 (row of k_pool for local key l of sequence b; -1 = no key), allowed [B, S, L] bool.
    out[b,s,l] = Σ_h w[b,s,h] * relu(scale * (q[b,s,h,:]·k_pool[key_slots[b,l],:])) computed in fp32,
    and -inf where not allowed[b,s,l] or key_slots[b,l] < 0. Returns [B, S, L] fp32. P may be 0 (every slot
    is then -1). S = 1 runs the decode kernel, S > 1 the prefill kernel. Keyword-only overrides (tests,
    benchmarks): ``block_l`` the key tile; ``config`` a ``PrefillConfig`` (5 numbers: the prefill kernel,
    whatever S) or (BLOCK_L, num_warps, num_stages) (the one-tile decode kernel, whatever S); ``tune``
    Triton's autotuner over the decode kernel instead of its table (S = 1 only; not traceable). Under the
    Triton interpreter the warps and stages of ``config`` are ignored."""
    if config is not None and len(config) not in (3, 5):
        raise ValueError(f"config {config!r}: (BLOCK_L, num_warps, num_stages) for the decode kernel or "
                         "PrefillConfig(block_s, block_l, num_warps, num_stages, tiles) for the prefill kernel")
    _check(q, w, k_pool, key_slots, allowed)
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    device = q.device
    prefill = len(config) == 5 if config is not None else S != 1
    if tune and prefill:
        raise ValueError(f"tune=True autotunes the decode kernel (S = 1), not S = {S}: "
                         "benchmarks/tune_indexer.py sweeps the prefill kernel's configs")
    out = common.empty((B, S, L), torch.float32, device)
    if out.numel() == 0:
        return out
    if k_pool.shape[0] == 0:  # an empty pool (a rank that owns no token yet): every slot is -1
        return out.fill_(float("-inf"))
    q, k_pool = common.unit_stride(q), common.unit_stride(k_pool)
    w = common.unit_stride(w.to(torch.float32))
    key_slots = common.int32_rows(key_slots)
    # A conversion, not a bool->uint8 bit view: Inductor cannot lower a view of a bool tensor as another dtype
    # (torch 2.11), and under compile the conversion fuses into the kernel that computes ``allowed``.
    allowed_u8 = common.unit_stride(allowed.to(torch.uint8))

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
        bl, warps, stages = config or choose_config(BLOCK_S, BLOCK_HI, fp32_dots)
        launch = dict(num_warps=warps, num_stages=stages)
    bl = block_l or bl
    common.launch(indexer_scores_kernel)[(B * n_sb * triton.cdiv(L, bl),)](
        *args, **meta, BLOCK_L=bl, TUNE_BUCKET=0, **launch)
    return out


def _launch_prefill(q, w, k_pool, key_slots, allowed_u8, out, scale, strides, meta, block_l, config):
    """The prefill kernel's launch: one program a (sequence, block of queries, run of key tiles)."""
    B, S, Hi, _ = q.shape
    L = key_slots.shape[1]
    if common.fixed_launch(q.device):
        # the interpreter: small tiles, several query blocks, key runs and scan steps even at test sizes
        cfg = PrefillConfig(*(config or (max(1, 32 // meta["BLOCK_HI"]), 16, 0, 0, 2)))
        launch, scan_l = {}, 16
    else:
        cfg = PrefillConfig(*(config or choose_prefill_config(meta["BLOCK_HI"], meta["DOT_PRECISION"] == "ieee")))
        launch, scan_l = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), SCAN_L
    bl = block_l or cfg.block_l
    _power_of_two("block_s", cfg.block_s, 1)
    _power_of_two("block_l", bl, 16)  # tl.dot needs 16 rows at least
    if cfg.tiles < 0:
        raise ValueError(f"tiles = {cfg.tiles}: key tiles a program, >= 0 (0: all)")
    n_sb = triton.cdiv(S, cfg.block_s)
    n_lt = triton.cdiv(L, bl)
    tiles = cfg.tiles or n_lt
    n_lc = triton.cdiv(n_lt, tiles)
    # relu(scale·x) = |scale|·relu(±x): the kernel folds |scale| into the head weights
    common.launch(indexer_scores_prefill_kernel)[(B * n_sb * n_lc,)](
        q, w, k_pool, key_slots, allowed_u8, out, abs(float(scale)), S, L, Hi, n_sb, n_lc, tiles, *strides,
        **meta, BLOCK_S=cfg.block_s, BLOCK_L=bl, NEG_SCALE=float(scale) < 0, SCAN_L=scan_l, **launch)
