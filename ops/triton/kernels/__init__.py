"""The ``@triton.jit`` kernels of ``ops/triton``, one per module; their host wrappers are in ``ops/triton``."""
