"""The decode indexer as a programmatic dependent launch (PDL; compute capability >= 9; an opt-in): which calls
take it, and its launch.

Why it was tried. At the model's small decode calls (8 sequences × 10-20K local keys, 20-40 MB) the decode loop
kernel (``kernels/indexer_scores_decode.py``) runs at 45-60 % of bytes / bandwidth, and a kernel moving the
same bytes with no arithmetic at 54-71 % (benchmarks/NOTES.md, session 8): about 4 µs a call go to the launch,
the first round trip (slots, then the key rows they point at) and the tail, whatever the kernel does. A
dependent launch lets the kernel's programs start while the previous kernel of the stream drains (at its
trigger, or as its blocks exit); the kernel then waits (``griddepcontrol.wait``) for the previous kernel's
writes before its first load. In a CUDA graph the dependency is captured as a programmatic edge.

Measured (benchmarks/RESULTS.md, session 11, one H200): no gain worth a default, and a loss beside kernels that
are not dependent launches themselves.
- ``bench_decode_indexer_pdl.py``, a compiled layer (Inductor's query kernel, then the indexer) in CUDA-graph
  replays: with Inductor's kernels as dependent launches too (``triton.enable_pdl``) the layer took 0.9-1.1 µs
  less at 8 × 10-40K keys (11.5 vs 12.4 µs at the recorded call); without them, 0.2-0.5 µs more. Prefetching
  each program's first key rows into L2 before the wait was slower at every depth (removed; commit 433409c).
- ``bench_e2e``'s decode step (one H200, 4 layers, 8 × 16K, CUDA graphs): 1.313 ms with it alone against
  1.238-1.250 ms without (three runs); with Inductor's dependent launches as well, 1.238 ms, within that spread.
So it is off by default.

How a call gets here. With ``DCP_DECODE_INDEXER_PDL=on`` (read at import; ``trace_choices.set(
"decode_indexer_pdl", "on")`` in a process; pair it with ``TORCHINDUCTOR_ENABLE_PDL=1``), ``indexer_scores``
(``indexer_scores.py``) sends a decode call (S = 1, no explicit config) to the opaque op
``dcp::indexer_scores_decode_pdl`` (ops/__init__.py) when ``serves`` holds: a CUDA device of compute capability
>= 9, bf16/fp16 query and keys (the tensor-core row of ``DECODE_TABLE``, a ``DecodeConfig`` with fixed runs).
Inductor launches a traced user kernel without launch attributes, so under torch.compile the launch stays one
extern node: under CUDA graphs (``compile_decode``'s decode step) its host dispatch is not replayed.
"""
from __future__ import annotations

import torch
import triton

from .. import trace_choices
from . import common


def enabled() -> bool:
    """The trace choice ``decode_indexer_pdl`` is on (off by default)."""
    return trace_choices.get("decode_indexer_pdl") == "on"


def _decode_config(B: int, L: int, hi: int):
    """The decode table's config for this call's tensor-core operands (``choose_decode_config``)."""
    from .indexer_scores import choose_decode_config

    return choose_decode_config(B, L, max(16, triton.next_power_of_2(hi)), fp32_dots=False)


def serves(q: torch.Tensor, k_pool: torch.Tensor, L: int) -> bool:
    """True where a decode call (S = 1, L local keys) takes the dependent launch (shapes, dtypes, device and the
    trace choice only, so the choice traces)."""
    if common.fixed_launch(q.device) or not enabled():
        return False
    B, _, hi, _ = q.shape
    if not (q.dtype == k_pool.dtype and q.dtype in (torch.bfloat16, torch.float16)):
        return False
    if common.capability(q.device)[0] < 9:
        return False
    from .indexer_scores import DecodeConfig

    return isinstance(_decode_config(B, L, hi), DecodeConfig)


def run(q, w, k_pool, key_slots, allowed_u8, scale: float) -> torch.Tensor:
    """Scores [B, 1, L] fp32 (``indexer_scores``' contract) by the decode table's loop kernel, launched as a
    dependent launch. Inputs as the wrapper normalised them (last dims contiguous, w fp32, key_slots int32,
    allowed uint8)."""
    from .indexer_scores import indexer_scores

    B, _, hi, _ = q.shape
    return indexer_scores(q, w, k_pool, key_slots, allowed_u8, scale,
                          config=_decode_config(B, key_slots.shape[1], hi), pdl=True)
