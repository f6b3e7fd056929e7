"""Host side of the warp-specialised prefill indexer (``kernels/indexer_scores_prefill_ws.py``, Gluon, sm_90a):
which calls it serves, how many key tiles a program takes, and its launch, after the pass over the mask that
finds each program's tiles (``kernels/prefill_tile_bounds.py``, a Triton kernel, also run by the CPU tests).

``indexer_scores`` (``ops/triton/indexer_scores.py``) sends a prefill call here when ``serves`` holds: an
H100/H200 (compute capability 9.0: the kernel is built on wgmma), DeepSeek-V3.2's indexer dims (64 heads ×
128), bf16 or fp16 query and keys, no explicit config. It reaches the kernel through the opaque op
``dcp::indexer_scores_prefill_ws`` (ops/__init__.py): Inductor re-emits a traced user kernel from its source as
a ``@triton.jit`` kernel, which a Gluon kernel is not, so under torch.compile the launch stays one extern node
(a prefill call is milliseconds of work: the node's dispatch does not show). ``DCP_PREFILL_INDEXER=triton``
in the environment (read at import; ``trace_choices.set("prefill_indexer", ...)`` in a process) sends every
call to the Triton kernel instead (A/B runs, bench_e2e).
"""
from __future__ import annotations

import functools

import torch
import triton

from .. import trace_choices
from . import common
from .prefill_tile_bounds import tile_bounds

HEADS, DIM, BLOCK_S, BLOCK_L = 64, 128, 4, 64


@functools.lru_cache(maxsize=None)
def _kernel():
    """The Gluon kernel, or None where this Triton has no Gluon Hopper support (imported on first use)."""
    try:
        from .kernels.indexer_scores_prefill_ws import indexer_scores_prefill_ws_kernel
    except ImportError:
        return None
    return indexer_scores_prefill_ws_kernel


def serves(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """True where the warp-specialised kernel takes this prefill call (shapes, dtypes and device only, so the
    choice traces)."""
    if trace_choices.get("prefill_indexer") == "triton" or common.fixed_launch(q.device):
        return False
    _, _, hi, di = q.shape
    return (hi == HEADS and di == DIM and q.dtype == k_pool.dtype and q.dtype in (torch.bfloat16, torch.float16)
            and common.capability(q.device) == (9, 0)
            and _kernel() is not None)


def choose_tiles(B: int, S: int, L: int, sms: int) -> int:
    """Key tiles a program: all of a sequence's keys when the (sequence, query block) programs fill the SMs
    four times over (a program's prologue, loading its queries into shared memory, is paid once), else the
    keys split into runs so that they do (a short chunk at a long context)."""
    n_lt = triton.cdiv(L, BLOCK_L)
    programs = B * triton.cdiv(S, BLOCK_S)
    runs = max(1, triton.cdiv(4 * sms, programs))
    return triton.cdiv(n_lt, runs)


def run(q, w, k_pool, key_slots, allowed_u8, scale: float, tiles: int | None = None) -> torch.Tensor:
    """Scores [B, S, L] fp32 (``indexer_scores``' contract) by the warp-specialised kernel. Inputs as the
    wrapper normalised them: q [B, S, 64, 128] last dim contiguous, w [B, S, 64] fp32, k_pool [P >= 1, 128],
    key_slots [B, L] int32, allowed [B, S, L] uint8. A key pool that is not 16-byte aligned, or whose row
    stride is not a multiple of 16 elements, takes the Triton kernel: the 16-byte cp.async copies need Triton
    to know the key rows' alignment, which it infers from its specialisation of the pointer and the stride."""
    B, S, _, _ = q.shape
    L = key_slots.shape[1]
    if k_pool.data_ptr() % 16 or k_pool.stride(0) % 16:
        from .indexer_scores import choose_prefill_config, indexer_scores

        return indexer_scores(q, w, k_pool, key_slots, allowed_u8, scale,
                              config=choose_prefill_config(HEADS, fp32_dots=False))
    w, allowed_u8 = w.contiguous(), allowed_u8.contiguous()
    out = common.empty((B, S, L), torch.float32, q.device)
    tiles = tiles or choose_tiles(B, S, L, torch.cuda.get_device_properties(q.device).multi_processor_count)
    bounds = tile_bounds(allowed_u8, BLOCK_S, BLOCK_L, tiles)
    n_sb, n_lc = bounds.shape[1], bounds.shape[2]
    _kernel()[(B * n_sb * n_lc,)](
        q, w, k_pool, key_slots, allowed_u8, out, bounds, abs(float(scale)), S, L, n_sb, n_lc, tiles,
        q.stride(0), q.stride(1), q.stride(2), w.stride(1), k_pool.stride(0), key_slots.stride(0),
        allowed_u8.stride(1), out.stride(1), NEG_SCALE=float(scale) < 0, num_warps=4, maxnreg=168)
    return out

