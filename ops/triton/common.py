"""What the Triton host wrappers of ``ops/triton`` share: the interpreter flag, the launch hook, the output
allocation hook, the ``tl.dot`` input precision and the input normalisation.

Kernels are in ``ops/triton/kernels/`` (one ``@triton.jit`` kernel per file); the wrappers beside this file
check inputs, allocate outputs, choose tiles / configs and launch.

The wrappers are traced by torch.compile (the ``dcp`` ops are ``torch.library.triton_op``s, docs/design.md
"The ops layer"), so they must stay traceable: no ``.item()``, no branch on tensor data, no run-time
autotuning; choices may depend on shapes, dtypes and devices only. Every launch goes through ``launch``.
"""
from __future__ import annotations

import os

import torch

# Under the Triton interpreter (CPU, tests) every wrapper launches one fixed small config, never autotunes.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fixed_launch(device: torch.device) -> bool:
    """True where the kernels run with a fixed small config: the interpreter, or a tensor not on CUDA."""
    return INTERPRET or device.type != "cuda"


def launch(kernel):
    """``kernel`` made traceable (``torch.library.wrap_triton``): under torch.compile the launch is recorded
    as a graph node that Inductor emits itself; in eager a ``dcp`` op calls it directly (triton_op turns the
    wrapping off), a direct call of a host wrapper goes through the (slower to dispatch) wrapper node; under
    the Triton interpreter it is the interpreted kernel itself."""
    return torch.library.wrap_triton(kernel)


def empty(shape, dtype, device) -> torch.Tensor:
    """Allocation hook of every wrapper's outputs (the tests replace it with a NaN-filling one, so an output
    element a kernel forgets to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype):
    """The ``tl.dot`` input precision (a constexpr of the kernels) for operands of ``dtype``: IEEE fp32 for
    fp32 operands (no tf32 rounding), else Triton's default (None), which only matters for fp32 operands."""
    return "ieee" if dtype == torch.float32 else None


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dim (the kernels index it without a stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def int32_rows(t: torch.Tensor) -> torch.Tensor:
    """An index tensor as int32 with a contiguous last dim."""
    return t if t.dtype == torch.int32 and t.stride(-1) == 1 else t.to(torch.int32).contiguous()
