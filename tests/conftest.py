"""Session-wide test setup, run before pytest imports any test module.

Without CUDA the Triton kernels run under the Triton interpreter (tests/test_triton_kernels.py). Triton reads
TRITON_INTERPRET when a ``@triton.jit`` function is defined, its own library functions (``tl.cdiv``) included,
which happens when triton is first imported; and importing ``dcp_compile.ops`` imports triton (registering a
``torch.library.triton_op`` scans for kernels). So the variable is set here, before any test module imports
the ops, whatever the order pytest collects them in.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
