"""``dcp::candidate_keys`` on CUDA (Triton host wrapper; kernel in ``kernels/candidate_keys.py``).

Same result as ``ops/reference.py: candidate_keys`` (order keys sorted best first; live keys are distinct,
so the order is unique). Fixed config, no autotuning: one program per row, the row one tile of
next_power_of_2(k) keys, warps by the tile: 16 at k = 2048, the best of 1-16 at every decode shape on an H200
(``benchmarks/tune_topk_select.py``, session 5: 20-21 µs a call at 1-64 rows, 29-30 at 8 warps, 76 at 1).
``method="torch"`` (benchmarks) sorts with ``torch.sort`` instead: 180-300 µs there.
"""
from __future__ import annotations

import torch
import triton

from . import common
from .kernels.candidate_keys import candidate_keys_kernel

METHODS = ("triton", "torch")


def default_warps(block: int) -> int:
    return max(1, min(16, block // 128))


def candidate_keys(scores: torch.Tensor, positions: torch.Tensor, *, method: str = "triton",
                   num_warps: int | None = None) -> torch.Tensor:
    """scores [T, k] (fp32; fp16/bf16 widened exactly), positions [T, k] int (live ones in [0, 2**31 - 1))
    -> keys [T, k] int64, best first. Keyword-only overrides (benchmarks): ``method``, ``num_warps``."""
    if scores.dim() != 2 or positions.shape != scores.shape:
        raise ValueError(f"candidate_keys: scores and positions must be the same [T, k], got "
                         f"{tuple(scores.shape)} and {tuple(positions.shape)}")
    if method not in METHODS:
        raise ValueError(f"candidate_keys: method must be one of {METHODS}, got {method!r}")
    T, k = scores.shape
    if method == "torch" or T == 0 or k == 0:
        from .. import reference

        return reference.candidate_keys(scores, positions)
    keys = common.empty((T, k), torch.int64, scores.device)
    x = common.unit_stride(scores.float())
    pos = common.unit_stride(positions)
    block = triton.next_power_of_2(k)
    warps = 4 if common.fixed_launch(scores.device) else (num_warps or default_warps(block))
    common.launch(candidate_keys_kernel)[(T,)](
        x, pos, keys, k, x.stride(0), pos.stride(0), keys.stride(0), BLOCK=block, num_warps=warps,
    )
    return keys
