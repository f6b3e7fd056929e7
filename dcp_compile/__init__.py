"""dcp_compile: decode context parallelism for HF MLA sparse-attention models, by compiling them.

    model = dcp_compile.apply(model, mesh)   # rewrite MLA sparse attention for DCP over the mesh
    model.generate(input_ids, max_new_tokens=32)
    dcp_compile.compile_decode(model)        # optional: decode steps compiled, replayed as CUDA graphs
    dcp_compile.warm_up(model, batch_sizes=(1, 8), contexts=(32768,))   # optional: compile before taking traffic
    dcp_compile.release_decode(model)        # before destroy_process_group (CUDA graphs hold NCCL)

    model = dcp_compile.from_pretrained(path, ep_size=8, dtype=torch.bfloat16)   # HF TP/EP load + apply, per rank
"""
from . import ops  # noqa: F401  registers the dcp ops
from .agreement import PeerRankFailed, RankMismatchError
from .api import UnsupportedModelError, apply, capture_and_match
from .cache import CachePoolExhausted, CacheFormat, ShardedPagedCache
from .compiled_decode import compile_decode, release_decode
from .hf_parallel import from_pretrained, tensor_parallel_mesh
from .layout import DCPLayout
from .match import MatchError
from .runtime import DCPRuntime
from .shard import shard_heads
from .warm_up import warm_up

__all__ = [
    "apply", "DCPLayout", "ShardedPagedCache", "CacheFormat", "CachePoolExhausted", "MatchError",
    "UnsupportedModelError", "RankMismatchError", "PeerRankFailed", "DCPRuntime", "capture_and_match", "shard_heads",
    "ops", "from_pretrained", "tensor_parallel_mesh", "compile_decode", "release_decode", "warm_up",
]
