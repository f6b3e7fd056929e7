"""The decode indexer as a programmatic dependent launch (PDL; compute capability >= 9): which calls take it,
how many key tiles it prefetches into L2 before its wait, and its launch.

Why. At the model's small decode calls (8 sequences × 10-20K local keys, 20-40 MB) the decode loop kernel
(``kernels/indexer_scores_decode.py``) runs at 45-60 % of bytes / bandwidth, and a kernel moving the same bytes
with no arithmetic at 54-71 % (benchmarks/NOTES.md, session 8): about 4 µs a call go to the launch, the first
round trip (slots, then the key rows they point at) and the tail, whatever the kernel does. A dependent launch
lets the kernel's programs start while the previous kernel of the stream drains (at its trigger, or as its
blocks exit); each program prefetches its first key rows into L2 from the slots as they stand, then waits
(``griddepcontrol.wait``) for the previous kernel's writes before it reads anything that reaches a score
(the kernel's docstring, "PDL", says why the early reads cannot change a score). In a CUDA graph the dependency
is captured as a programmatic edge.

Measured (benchmarks/RESULTS.md, session 11, ``bench_decode_indexer_pdl.py``, one H200): no gain. Behind the
Inductor kernel that makes its query, in CUDA-graph replays, the dependent launch changed the indexer's share of
a layer by 0.0-0.3 µs at 8 × 10-40K keys (11.6-25.3 µs; the floor 4.2-16.7 µs), with or without Inductor's own
kernels as dependent launches, and the prefetch before the wait by nothing better; so it is off by default,
kept as an opt-in for the measurement's sake and for a step whose previous kernel triggers early.

How a call gets here. With ``DCP_DECODE_INDEXER_PDL=on`` (or a number: the key tiles prefetched before the
wait, 0 the wait alone; read at import, ``trace_choices.set("decode_indexer_pdl", ...)`` in a process),
``indexer_scores`` (``indexer_scores.py``) sends a decode call (S = 1, no explicit config) to the opaque op
``dcp::indexer_scores_decode_pdl`` (ops/__init__.py) when ``serves`` holds: a CUDA device of compute capability
>= 9, bf16/fp16 query and keys (the tensor-core row of ``DECODE_TABLE``, a ``DecodeConfig`` with fixed runs),
rows of >= 64 elements. Inductor launches a traced user kernel without launch attributes, so under
torch.compile the launch stays one extern node: under CUDA graphs (``compile_decode``'s decode step) its host
dispatch is not replayed.
"""
from __future__ import annotations

import functools

import torch
import triton

from .. import trace_choices
from . import common

# Key tiles each program prefetches into L2 before its wait with ``DCP_DECODE_INDEXER_PDL=on`` (a power of
# two; 0: the wait alone).
PREFETCH_TILES = 1


def prefetch_tiles() -> int | None:
    """The key tiles prefetched before the wait (the trace choice ``decode_indexer_pdl``: ``on`` is
    ``PREFETCH_TILES``, a number that many), or None where the dependent launch is off (the default)."""
    setting = trace_choices.get("decode_indexer_pdl")
    if setting == "off":
        return None
    return PREFETCH_TILES if setting == "on" else int(setting)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _decode_config(B: int, L: int, hi: int):
    """The decode table's config for this call's tensor-core operands (``choose_decode_config``)."""
    from .indexer_scores import choose_decode_config

    return choose_decode_config(B, L, max(16, triton.next_power_of_2(hi)), fp32_dots=False)


def serves(q: torch.Tensor, k_pool: torch.Tensor, L: int) -> bool:
    """True where a decode call (S = 1, L local keys) takes the dependent launch (shapes, dtypes, device and
    environment only, so the choice traces)."""
    if common.fixed_launch(q.device) or prefetch_tiles() is None:
        return False
    B, _, hi, di = q.shape
    if not (q.dtype == k_pool.dtype and q.dtype in (torch.bfloat16, torch.float16) and di >= 64):
        return False
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())[0] < 9:
        return False
    from .indexer_scores import DecodeConfig

    cfg = _decode_config(B, L, hi)
    return isinstance(cfg, DecodeConfig) and not cfg.live_scan


def run(q, w, k_pool, key_slots, allowed_u8, scale: float) -> torch.Tensor:
    """Scores [B, 1, L] fp32 (``indexer_scores``' contract) by the decode table's loop kernel, launched as a
    dependent launch. Inputs as the wrapper normalised them (last dims contiguous, w fp32, key_slots int32,
    allowed uint8)."""
    from .indexer_scores import indexer_scores

    B, _, hi, _ = q.shape
    return indexer_scores(q, w, k_pool, key_slots, allowed_u8, scale,
                          config=_decode_config(B, key_slots.shape[1], hi), pdl=prefetch_tiles())
