"""What the Triton host wrappers of ``ops/triton`` share: the interpreter flag, the device's compute capability,
the launch hook, the output allocation hook, the ``tl.dot`` input precision and the input normalisation.

Kernels are in ``ops/triton/kernels/`` (one ``@triton.jit`` kernel per file); the wrappers beside this file
check inputs, allocate outputs, choose tiles / configs and launch.

The wrappers are traced by torch.compile (the ``dcp`` ops are ``torch.library.triton_op``s, docs/design.md
"The ops layer"), so they must stay traceable: no ``.item()``, no branch on tensor data, no run-time
autotuning; choices may depend on shapes, dtypes and devices only. Every launch goes through ``launch``.
"""
from __future__ import annotations

import functools
import os

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

# Under the Triton interpreter (CPU, tests) every wrapper launches one fixed small config, never autotunes.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fixed_launch(device: torch.device) -> bool:
    """True where the kernels run with a fixed small config: the interpreter, or a tensor not on CUDA."""
    return INTERPRET or device.type != "cuda"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (cached: the wrappers ask on every call)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


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


def uint8_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0 / 1 mask as uint8, which the kernels read as bytes. In eager a bool mask is reinterpreted (a view:
    bool and uint8 are both one byte of 0 or 1), since converting it costs a pass over the mask, 5-10 % of
    the prefill indexer at 8 x 512 queries x 8-32K keys (benchmarks/RESULTS.md, session 9). Traced for
    Inductor it stays a conversion: Inductor cannot lower a view of a bool tensor as another dtype (torch
    2.11), and the conversion fuses into the kernel that computes the mask."""
    if mask.dtype == torch.uint8:
        return mask
    # a plain tensor outside any tracing (fake, functional and proxied tensors take the conversion)
    eager = type(mask) is torch.Tensor and not torch.compiler.is_compiling() and get_proxy_mode() is None
    return mask.view(torch.uint8) if mask.dtype == torch.bool and eager else mask.to(torch.uint8)


def int32_rows(t: torch.Tensor) -> torch.Tensor:
    """An index tensor as int32 with a contiguous last dim."""
    return t if t.dtype == torch.int32 and t.stride(-1) == 1 else t.to(torch.int32).contiguous()
