"""The ``dcp`` custom-op library (importable as ``dcp_compile.ops``).

Each op has a schema, a fake (meta) implementation for tracing, a plain-PyTorch implementation that serves
the CPU (``ops/reference.py``), and a Triton implementation for CUDA tensors where one pays (``ops/triton``).
Under torch.compile the Triton-backed ops are traced into the graph down to their kernel launches, and the
others down to their aten ops (see "how the ops lower" below and docs/design.md, "The ops layer").
The ops are local: collectives live in ``ops/distributed.py`` as c10d functional collectives, so Inductor
sees them and can schedule around them. The ownership arithmetic (``DCPLayout``, docs/design.md §3) is in
``ops/layout.py``. This package is the lower layer: it never imports the rest of dcp_compile.

    dcp::sparse_mla_attn(q, kv, slots, counts, scale, v_dim) -> (out, lse)
    dcp::paged_write(pool!, rows, slots) -> ()
    dcp::indexer_scores(q, w, k_pool, key_slots, allowed, scale) -> scores
    dcp::indexer_scores_prefill_ws(q, w, k_pool, key_slots, allowed, scale) -> scores  (Hopper, prefill)
    dcp::indexer_scores_decode_pdl(q, w, k_pool, key_slots, allowed, scale) -> scores  (sm_90+, decode)
    dcp::local_topk(scores, k) -> (values, columns)
    dcp::candidate_keys(scores, positions) -> keys
    dcp::topk_select(cand_keys, seq_index, block_table, k, rank, world, interleave, page_size) -> (slots, counts)
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

from . import inference_only, reference, trace_choices  # noqa: E402
from .distributed import all_gather_heads, all_reduce_sum, distributed_topk, local_topk_padded, lse_merge  # noqa: E402,F401
from .layout import DCPLayout  # noqa: E402,F401

LIB = "dcp"

# --- how the ops lower under torch.compile (docs/design.md, "The ops layer") -------------------------------
# The ops backed by Triton kernels are ``torch.library.triton_op``s: in eager they call their host wrapper
# (ops/triton), which launches the kernels directly; under torch.compile, AOTAutograd's functionalization
# (FunctionalTensorMode) replaces the op by a trace of that wrapper, whose launches (``wrap_triton``) become
# graph nodes that Inductor emits itself: no Python between the kernels, and the step can be captured as a
# CUDA graph. Where the Triton kernels do not serve the tensors (CPU, float64) the op stays one opaque node
# that runs ops/reference.py (``register_kernel("cpu")``, and the float64 branch of the CUDA impl). Ops
# whose reference is plain traceable tensor code are replaced by that code where no kernel serves them
# (lse_combine everywhere; local_topk and topk_select off the Triton devices), so Inductor fuses it.

# Devices whose tensors the Triton kernels serve (tests add "cpu" to trace the Triton path without a GPU).
TRITON_DEVICES = ("cuda",)


def _on_triton(*tensors: Tensor) -> bool:
    """True where the Triton kernels serve these tensors: on a Triton device and not float64 (no float64
    kernels: the reference is exact there, and fast enough for the float64 tests)."""
    return all(t.device.type in TRITON_DEVICES and t.dtype != torch.float64 for t in tensors)


def _always(*args, **kwargs) -> bool:
    return True


def _export_keeps_ops() -> bool:
    """torch.export keeps triton ops as ops (torch.library.triton_op does the same, for a serialisable
    program); older torch without the switch: never."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def _trace_under_compile(op, body, when) -> None:
    """Under AOTAutograd's functionalization (torch.compile), replace a call of ``op`` by a trace of
    ``body`` (same arguments) wherever ``when(*args)`` holds; elsewhere keep the op as one node (Inductor
    then calls it: the CPU / float64 path). For a triton_op this overrides the rule triton_op registers
    (which would trace its function on every device), so the device choice is made here, per call."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def rule(mode, func, types, args, kwargs):
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented  # another tensor subclass: let it handle the op first
        if _export_keeps_ops() or not when(*args, **kwargs):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            return body(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)


# --- sparse_mla_attn ---------------------------------------------------------------------------------------
def _triton_sparse_mla_attn(q, kv, slots, counts, scale, v_dim):
    from .triton.sparse_mla_attn import sparse_mla_attn as kernel

    return kernel(q, kv, slots, counts, scale, v_dim)


# Kernels for dcp::sparse_mla_attn on Triton devices, by name: ``use_attention_kernel(name)`` picks one for
# the process's next compiles (Inductor traces the chosen one into the graph; a compiled graph keeps the
# kernel it was traced with, and the choice is in torch.compile's cache key: ops/trace_choices.py).
# "reference" is the plain-PyTorch one. TRACED_ATTENTION_KERNELS: the ones torch.compile traces into the
# graph (host code made of wrap_triton launches); any other stays an opaque op.
ATTENTION_KERNELS = {"triton": _triton_sparse_mla_attn, "reference": reference.sparse_mla_attn}
TRACED_ATTENTION_KERNELS = {"triton"}


def use_attention_kernel(name: str) -> None:
    """The kernel for this process's next compiles and eager calls (and torch.compile's cache key with it:
    ops/trace_choices.py)."""
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; registered: {sorted(ATTENTION_KERNELS)}")
    trace_choices.set("attention_kernel", name)


def _sparse_mla_attn(q: Tensor, kv: Tensor, slots: Tensor, counts: Tensor, scale: float, v_dim: int) -> tuple[Tensor, Tensor]:
    """q [T, H, Dk], kv [S, Dk], slots [T, K] int32 (valid first), counts [T] int32 ->
    out [T, H, v_dim] (q's dtype), lse [T, H] float32 (float64 for float64 q; natural log, -inf where
    counts is 0, out exactly 0 there). S may be 0 (a rank that owns no token yet; every count is then 0)."""
    kernel = ATTENTION_KERNELS[trace_choices.get("attention_kernel")] if _on_triton(q) else reference.sparse_mla_attn
    return kernel(q, kv, slots, counts, scale, v_dim)


sparse_mla_attn = torch.library.triton_op(f"{LIB}::sparse_mla_attn", mutates_args=())(_sparse_mla_attn)
sparse_mla_attn.register_kernel("cpu")(reference.sparse_mla_attn)
_trace_under_compile(
    sparse_mla_attn, _sparse_mla_attn,
    when=lambda q, *rest: _on_triton(q) and trace_choices.get("attention_kernel") in TRACED_ATTENTION_KERNELS,
)


@sparse_mla_attn.register_fake
def _(q, kv, slots, counts, scale, v_dim):
    T, H, _ = q.shape
    return q.new_empty(T, H, v_dim), q.new_empty(T, H, dtype=reference._lse_dtype(q))


# --- paged_write -------------------------------------------------------------------------------------------
def _paged_write(pool: Tensor, rows: Tensor, slots: Tensor) -> None:
    """pool [S, D] <- rows [N, D] at slots [N] (int); slots < 0 are rows this rank does not own: skipped."""
    if pool.device.type in TRITON_DEVICES:  # any dtype (the kernel only copies); no boolean indexing there:
        from .triton.paged_write import paged_write as kernel  # it would sync the host (no CUDA graph)

        kernel(pool, rows, slots)
    else:
        reference.paged_write(pool, rows, slots)


paged_write = torch.library.triton_op(f"{LIB}::paged_write", mutates_args=("pool",))(_paged_write)
paged_write.register_kernel("cpu")(reference.paged_write)
_trace_under_compile(paged_write, _paged_write, when=lambda pool, *rest: pool.device.type in TRITON_DEVICES)


@paged_write.register_fake
def _(pool, rows, slots):
    return None


# --- indexer_scores ----------------------------------------------------------------------------------------
def _indexer_scores(q: Tensor, w: Tensor, k_pool: Tensor, key_slots: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """q [B, S, Hi, Di], w [B, S, Hi], k_pool [P, Di], key_slots [B, L] int32, allowed [B, S, L] bool ->
    [B, S, L] float32 scores, -inf where not allowed or slot < 0. P may be 0 (every slot is then -1)."""
    if _on_triton(q, k_pool):
        from .triton.indexer_scores import indexer_scores as kernel

        return kernel(q, w, k_pool, key_slots, allowed, scale)
    return reference.indexer_scores(q, w, k_pool, key_slots, allowed, scale)


indexer_scores = torch.library.triton_op(f"{LIB}::indexer_scores", mutates_args=())(_indexer_scores)
indexer_scores.register_kernel("cpu")(reference.indexer_scores)
_trace_under_compile(indexer_scores, _indexer_scores, when=lambda q, w, k_pool, *rest: _on_triton(q, k_pool))


@indexer_scores.register_fake
def _(q, w, k_pool, key_slots, allowed, scale):
    return q.new_empty(q.shape[0], q.shape[1], key_slots.shape[1], dtype=torch.float32)


# --- indexer_scores_prefill_ws, indexer_scores_decode_pdl -------------------------------------------------
# Two launches of dcp::indexer_scores' kernels that its host wrapper sends to opaque ops (not triton_ops), each
# with dcp::indexer_scores' contract (allowed as uint8) for the calls its module's ``serves`` takes:
# - prefill on Hopper, the warp-specialised Gluon kernel (ops/triton/indexer_scores_ws.py): Inductor re-emits
#   traced user kernels as @triton.jit source, which a Gluon kernel is not;
# - decode on sm_90+, the decode loop kernel as a programmatic dependent launch (ops/triton/indexer_scores_pdl.py):
#   Inductor launches traced user kernels without launch attributes.
# Under torch.compile each stays one extern node; under CUDA graphs its host dispatch is not replayed.
def _opaque_indexer_op(name: str, module: str):
    def impl(q: Tensor, w: Tensor, k_pool: Tensor, key_slots: Tensor, allowed: Tensor, scale: float) -> Tensor:
        import importlib

        return importlib.import_module(f".triton.{module}", __name__).run(q, w, k_pool, key_slots, allowed, scale)

    op = torch.library.custom_op(f"{LIB}::{name}", impl, mutates_args=(), device_types="cuda")

    @op.register_fake
    def _(q, w, k_pool, key_slots, allowed, scale):
        return q.new_empty(q.shape[0], q.shape[1], key_slots.shape[1], dtype=torch.float32)

    return op


indexer_scores_prefill_ws = _opaque_indexer_op("indexer_scores_prefill_ws", "indexer_scores_ws")
indexer_scores_decode_pdl = _opaque_indexer_op("indexer_scores_decode_pdl", "indexer_scores_pdl")


# --- local_topk --------------------------------------------------------------------------------------------
def _local_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores [T, L] (-inf = not a candidate, no NaN), k >= 1 -> values [T, k], columns [T, k] int64: the k
    highest of each row padded with k -inf columns (so L may be < k: columns >= L are that padding), equal
    scores to the lower column. Order within a row is unspecified but deterministic: score order on CPU /
    float64 (one stable sort), the Triton kernel's documented order (ops/triton/local_topk.py); the set is the
    same."""
    if _on_triton(scores):
        from .triton.local_topk import choose_scheme, local_topk as kernel

        return kernel(scores, k, scheme=choose_scheme(*scores.shape))
    return local_topk_padded(scores, k)


local_topk = torch.library.triton_op(f"{LIB}::local_topk", mutates_args=())(_local_topk)
local_topk.register_kernel("cpu")(local_topk_padded)
_trace_under_compile(local_topk, _local_topk, when=_always)  # kernel launches, or the sort's aten ops


@local_topk.register_fake
def _(scores, k):
    T = scores.shape[0]
    return scores.new_empty(T, k), scores.new_empty(T, k, dtype=torch.int64)


# --- candidate_keys ----------------------------------------------------------------------------------------
def _candidate_keys(scores: Tensor, positions: Tensor) -> Tensor:
    """A rank's local top-k (scores [T, k], global positions [T, k]) -> int64 order keys [T, k], best first:
    what the rank sends in the top-k exchange (encoding: ops/reference.py, "order keys"). Live keys are
    distinct, so the result is unique."""
    if _on_triton(scores):
        from .triton.candidate_keys import candidate_keys as kernel

        return kernel(scores, positions)
    return reference.candidate_keys(scores, positions)


candidate_keys = torch.library.triton_op(f"{LIB}::candidate_keys", mutates_args=())(_candidate_keys)
candidate_keys.register_kernel("cpu")(reference.candidate_keys)
# The kernel's launch on Triton devices; elsewhere one opaque node (the reference bit-views the scores).
_trace_under_compile(candidate_keys, _candidate_keys, when=lambda scores, *rest: _on_triton(scores))


@candidate_keys.register_fake
def _(scores, positions):
    return scores.new_empty(scores.shape, dtype=torch.int64)


# --- topk_select -------------------------------------------------------------------------------------------
def _topk_select(
    cand_keys: Tensor, seq_index: Tensor, block_table: Tensor,
    k: int, rank: int, world: int, interleave: int, page_size: int,
) -> tuple[Tensor, Tensor]:
    """Every rank's candidate keys [world, T, k] (block r = rank r's ``candidate_keys``, best first) -> this
    rank's share of the exact global top-k as physical slots [T, k] int32, best first, -1 after, and counts [T]
    int32. Fixed-width: no host sync, no data-dependent shape. The reference takes any C and any order; the
    Triton kernel (ops/triton/topk_select.py) relies on the contract."""
    if cand_keys.device.type in TRITON_DEVICES:
        from .triton.topk_select import topk_select as kernel

        return kernel(cand_keys, seq_index, block_table, k, rank, world, interleave, page_size)
    return reference.topk_select(cand_keys, seq_index, block_table, k, rank, world, interleave, page_size)


topk_select = torch.library.triton_op(f"{LIB}::topk_select", mutates_args=())(_topk_select)
topk_select.register_kernel("cpu")(reference.topk_select)
_trace_under_compile(topk_select, _topk_select, when=_always)  # kernel launches, or the reference's aten ops


@topk_select.register_fake
def _(cand_keys, seq_index, block_table, k, rank, world, interleave, page_size):
    T = cand_keys.shape[1]
    return cand_keys.new_empty(T, k, dtype=torch.int32), cand_keys.new_empty(T, dtype=torch.int32)


# --- lse_combine -------------------------------------------------------------------------------------------
# Elementwise + a reduction over ranks: traced into the graph on every device, where Inductor fuses it with
# its neighbours (the op stays, for its schema, its fake and its inference-only backward).
def _lse_combine(out: Tensor, lse: Tensor, lse_all: Tensor) -> Tensor:
    """out [T, H, D] partial attention of this rank, lse [T, H], lse_all [N, T, H] of every rank ->
    out · exp(lse - logsumexp(lse_all)) in float32 (float64 for float64); exactly 0 where this rank is empty
    (lse = -inf), whatever ``out`` holds there (NaN, inf). out / lse may carry a leading [N] too (every
    rank's part at once, as the all-to-all merge passes them: ``lse`` = ``lse_all``)."""
    return reference.lse_combine(out, lse, lse_all)


lse_combine = torch.library.custom_op(f"{LIB}::lse_combine", mutates_args=())(_lse_combine)
_trace_under_compile(lse_combine, _lse_combine, when=_always)


@lse_combine.register_fake
def _(out, lse, lse_all):
    return out.new_empty(out.shape, dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)


# Inference only: a backward through any functional dcp op raises a clear error (paged_write mutates its pool,
# and torch allows no autograd formula there; see ops/inference_only.py).
for _op in (sparse_mla_attn, indexer_scores, local_topk, candidate_keys, topk_select, lse_combine):
    inference_only.register(_op)

__all__ = [
    "sparse_mla_attn", "paged_write", "indexer_scores", "local_topk", "candidate_keys", "topk_select", "lse_combine",
    "all_gather_heads", "all_reduce_sum", "distributed_topk", "lse_merge", "DCPLayout", "reference",
    "ATTENTION_KERNELS", "TRACED_ATTENTION_KERNELS", "use_attention_kernel",
]
