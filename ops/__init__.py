"""The ``dcp`` custom-op library (importable as ``dcp_compile.ops``).

Each op has a schema, a fake (meta) implementation for tracing, a plain-PyTorch implementation that serves
the CPU (``ops/reference.py``), and a Triton implementation for CUDA tensors where one pays (``ops/triton``).
The ops are local: collectives live in ``ops/distributed.py`` as c10d functional collectives, so Inductor
sees them and can schedule around them. The ownership arithmetic (``DCPLayout``, docs/design.md §3) is in
``ops/layout.py``. This package is the lower layer: it never imports the rest of dcp_compile.

    dcp::sparse_mla_attn(q, kv, slots, counts, scale, v_dim) -> (out, lse)
    dcp::paged_write(pool!, rows, slots) -> ()
    dcp::indexer_scores(q, w, k_pool, key_slots, allowed, scale) -> scores
    dcp::local_topk(scores, k) -> (values, columns)
    dcp::topk_select(cand_scores, cand_pos, seq_index, block_table, k, rank, world, interleave, page_size)
        -> (slots, counts)
    dcp::lse_combine(out, lse, lse_all) -> out_scaled
"""
from __future__ import annotations

if __name__ != "dcp_compile.ops":  # one module identity, so the ops are registered exactly once
    raise ImportError(
        f"ops/ is the package dcp_compile.ops (imported here as {__name__!r}): install the project "
        "(pip install -e .) and use it as dcp_compile.ops"
    )

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from . import inference_only, reference  # noqa: E402
from .distributed import all_gather_heads, all_reduce_sum, distributed_topk, local_topk_padded, lse_merge  # noqa: E402,F401
from .layout import DCPLayout  # noqa: E402,F401

LIB = "dcp"


# --- sparse_mla_attn ---------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::sparse_mla_attn", mutates_args=())
def sparse_mla_attn(q: Tensor, kv: Tensor, slots: Tensor, counts: Tensor, scale: float, v_dim: int) -> tuple[Tensor, Tensor]:
    """q [T, H, Dk], kv [S, Dk], slots [T, K] int32 (valid first), counts [T] int32 ->
    out [T, H, v_dim] (q's dtype), lse [T, H] float32 (float64 for float64 q; natural log, -inf where
    counts is 0, out exactly 0 there). S may be 0 (a rank that owns no token yet; every count is then 0)."""
    return reference.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)


@sparse_mla_attn.register_fake
def _(q, kv, slots, counts, scale, v_dim):
    T, H, _ = q.shape
    return q.new_empty(T, H, v_dim), q.new_empty(T, H, dtype=reference._lse_dtype(q))


def _triton_sparse_mla_attn(q, kv, slots, counts, scale, v_dim):
    from .triton.sparse_mla_attn import sparse_mla_attn as kernel

    return kernel(q, kv, slots, counts, scale, v_dim)


# CUDA kernels for dcp::sparse_mla_attn, by name: ``use_attention_kernel(name)`` picks one for the process
# (before the first compile: Inductor traces the op, not the choice). "reference" is the plain-PyTorch one.
ATTENTION_KERNELS = {"triton": _triton_sparse_mla_attn, "reference": reference.sparse_mla_attn}
_attention_kernel = {"name": "triton"}


def use_attention_kernel(name: str) -> None:
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; registered: {sorted(ATTENTION_KERNELS)}")
    _attention_kernel["name"] = name


@sparse_mla_attn.register_kernel("cuda")
def _(q, kv, slots, counts, scale, v_dim):
    if q.dtype == torch.float64:  # no float64 Triton path: the reference is exact and fine for tests
        return reference.sparse_mla_attn(q, kv, slots, counts, scale, v_dim)
    return ATTENTION_KERNELS[_attention_kernel["name"]](q, kv, slots, counts, scale, v_dim)


# --- paged_write -------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::paged_write", mutates_args=("pool",))
def paged_write(pool: Tensor, rows: Tensor, slots: Tensor) -> None:
    """pool [S, D] <- rows [N, D] at slots [N] (int); slots < 0 are rows this rank does not own: skipped."""
    reference.paged_write(pool, rows, slots)


@paged_write.register_fake
def _(pool, rows, slots):
    return None


@paged_write.register_kernel("cuda")
def _(pool, rows, slots):
    # No boolean indexing on CUDA: it would sync the host and break CUDA-graph capture.
    from .triton.paged_write import paged_write as kernel

    kernel(pool, rows, slots)


# --- indexer_scores ----------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::indexer_scores", mutates_args=())
def indexer_scores(q: Tensor, w: Tensor, k_pool: Tensor, key_slots: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """q [B, S, Hi, Di], w [B, S, Hi], k_pool [P, Di], key_slots [B, L] int32, allowed [B, S, L] bool ->
    [B, S, L] float32 scores, -inf where not allowed or slot < 0. P may be 0 (every slot is then -1)."""
    return reference.indexer_scores(q, w, k_pool, key_slots, allowed, scale)


@indexer_scores.register_fake
def _(q, w, k_pool, key_slots, allowed, scale):
    return q.new_empty(q.shape[0], q.shape[1], key_slots.shape[1], dtype=torch.float32)


@indexer_scores.register_kernel("cuda")
def _(q, w, k_pool, key_slots, allowed, scale):
    if q.dtype == torch.float64 or k_pool.dtype == torch.float64:
        return reference.indexer_scores(q, w, k_pool, key_slots, allowed, scale)
    from .triton.indexer_scores import indexer_scores as kernel

    return kernel(q, w, k_pool, key_slots, allowed, scale)


# --- local_topk --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::local_topk", mutates_args=())
def local_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores [T, L] (-inf = not a candidate, no NaN), k >= 1 -> values [T, k], columns [T, k] int64: the k
    highest of each row padded with k -inf columns (so L may be < k: columns >= L are that padding), equal
    scores to the lower column. Order within a row is unspecified: score order on CPU / float64 (one stable
    sort), column order from the CUDA kernel (ops/triton/local_topk.py); the set is the same."""
    return local_topk_padded(scores, k)


@local_topk.register_fake
def _(scores, k):
    T = scores.shape[0]
    return scores.new_empty(T, k), scores.new_empty(T, k, dtype=torch.int64)


@local_topk.register_kernel("cuda")
def _(scores, k):
    if scores.dtype == torch.float64:  # no float64 kernel: the stable sort is exact
        return local_topk_padded(scores, k)
    from .triton.local_topk import local_topk as kernel

    return kernel(scores, k)


# --- topk_select -------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::topk_select", mutates_args=())
def topk_select(
    cand_scores: Tensor, cand_pos: Tensor, seq_index: Tensor, block_table: Tensor,
    k: int, rank: int, world: int, interleave: int, page_size: int,
) -> tuple[Tensor, Tensor]:
    """Global top-k of gathered (score, position) candidates [T, C] -> this rank's compacted slots [T, k]
    int32 and counts [T] int32. Fixed-width: no host sync, no data-dependent shape. The order of the slots
    within a query is unspecified (the set and the count are exact): score order on CPU (the sort-based
    reference), candidate order from the CUDA kernel (ops/triton/topk_select.py)."""
    return reference.topk_select(cand_scores, cand_pos, seq_index, block_table, k, rank, world, interleave, page_size)


@topk_select.register_fake
def _(cand_scores, cand_pos, seq_index, block_table, k, rank, world, interleave, page_size):
    T = cand_scores.shape[0]
    return cand_scores.new_empty(T, k, dtype=torch.int32), cand_scores.new_empty(T, dtype=torch.int32)


@topk_select.register_kernel("cuda")
def _(cand_scores, cand_pos, seq_index, block_table, k, rank, world, interleave, page_size):
    if cand_scores.dtype == torch.float64:
        return reference.topk_select(cand_scores, cand_pos, seq_index, block_table, k, rank, world, interleave, page_size)
    from .triton.topk_select import topk_select as kernel

    return kernel(cand_scores, cand_pos, seq_index, block_table, k, rank, world, interleave, page_size)


# --- lse_combine -------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::lse_combine", mutates_args=())
def lse_combine(out: Tensor, lse: Tensor, lse_all: Tensor) -> Tensor:
    """out [T, H, D] partial attention of this rank, lse [T, H], lse_all [N, T, H] of every rank ->
    out · exp(lse - logsumexp(lse_all)) in float32 (float64 for float64); exactly 0 where this rank is empty
    (lse = -inf), whatever ``out`` holds there (NaN, inf)."""
    return reference.lse_combine(out, lse, lse_all)


@lse_combine.register_fake
def _(out, lse, lse_all):
    return out.new_empty(out.shape, dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)


# Inference only: a backward through any functional dcp op raises a clear error (paged_write mutates its pool,
# and torch allows no autograd formula there; see ops/inference_only.py).
for _op in (sparse_mla_attn, indexer_scores, local_topk, topk_select, lse_combine):
    inference_only.register(_op)

__all__ = [
    "sparse_mla_attn", "paged_write", "indexer_scores", "local_topk", "topk_select", "lse_combine",
    "all_gather_heads", "all_reduce_sum", "distributed_topk", "lse_merge", "DCPLayout", "reference",
    "ATTENTION_KERNELS", "use_attention_kernel",
]
