from .ops.layout import DCPLayout  # noqa: F401  (the ownership arithmetic lives in the op layer: ops/layout.py)
