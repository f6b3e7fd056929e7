"""dcp_compile: decode context parallelism for HF MLA sparse-attention models, by compiling them.

    model = dcp_compile.apply(model, mesh)   # rewrite MLA sparse attention for DCP over the mesh
    model.generate(input_ids, max_new_tokens=32)
"""
from . import ops  # noqa: F401  registers the dcp ops
from .api import DCPRuntime, UnsupportedModelError, apply, capture_and_match, shard_heads
from .cache import CachePoolExhausted, CacheSpec, ShardedPagedCache
from .layout import DCPLayout
from .match import MatchError

__all__ = [
    "apply", "DCPLayout", "ShardedPagedCache", "CacheSpec", "CachePoolExhausted", "MatchError",
    "UnsupportedModelError", "DCPRuntime", "capture_and_match", "shard_heads", "ops",
]
