"""Triton implementations of the ``dcp`` ops for CUDA tensors: host wrappers here (one per kernel: checks,
tiles, launch), ``@triton.jit`` kernels in ``kernels/``, shared helpers in ``common``. Imported lazily by the
CUDA registrations in ``ops/__init__.py``."""
