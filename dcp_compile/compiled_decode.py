"""``compile_decode(model)``: compile the decode steps of a DCP model, with CUDA graphs by default.

    model = dcp_compile.apply(model, mesh)
    dcp_compile.compile_decode(model)                 # torch.compile(mode="reduce-overhead", dynamic=False)
    model.generate(input_ids, max_new_tokens=256)     # prefill eager, every decode step one CUDA-graph replay

Why a dispatcher rather than ``model.forward = torch.compile(model.forward, mode="reduce-overhead")`` (which works
too): prefill and decode want different compilation. A decode step (at most ``STATIC_STEP_TOKENS`` tokens per
sequence after the request's first step, whose prompt is a prefill however short) has fixed shapes
(``cache.py``: static key and mask widths, the length on the device), so it is compiled with ``dynamic=False`` —
one static graph, and one CUDA graph, per (batch size, capacity bucket), replayed at every length. Prefill chunks have a new shape each request; compiled, each would be a new graph (and with CUDA
graphs a new recording holding its activations in the graph pool). So, as HF's generate does for its own
compileable caches, long steps run the uncompiled forward, or a forward compiled with ``prefill_options`` (e.g.
``{"backend": "inductor", "dynamic": True}``).

Per-request caches (no ``cache_budget_tokens``) are then sized by capacity bucket (at most 25 % above the request),
so that requests of one bucket have pools of one shape; each new pool is a new address, which CUDA graphs
re-record (cheap) but Dynamo does not recompile. A fixed pool (``cache_budget_tokens``) keeps one address:
what a server wants.

The step's host bookkeeping (capacity check, the length's device copy, padding the mask to the static width)
is in the model's forward hooks, outside the compiled graph; the compiled forward sees device tensors only.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .cache import STATIC_STEP_TOKENS
from .runtime import DCPRuntime


def _step_tokens(args: tuple, kwargs: dict) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[1]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[1]
    return None


def _first_step(kwargs: dict) -> bool:
    """A request's first step (its cache holds no position yet: the forward hooks have opened the step, the
    length is read on the host). A short prompt is a prefill, not a decode or verification step: compiled, each
    prompt length of at most ``STATIC_STEP_TOKENS`` tokens would be a static graph of its own."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return getattr(cache, "seq_length", None) == 0


def compile_decode(model: nn.Module, *, mode: str | None = "reduce-overhead", prefill_options: dict | None = None,
                   **options) -> nn.Module:
    """Compile ``model``'s decode steps (``torch.compile(model.forward, mode=mode, dynamic=False, **options)``)
    and run its longer steps eagerly, or compiled with ``prefill_options``. ``model`` must have been given to
    ``dcp_compile.apply``. Returns the model; ``model.forward`` keeps its signature (HF generate reads it)."""
    if not isinstance(getattr(model, "dcp", None), DCPRuntime):
        raise TypeError("compile_decode needs a model rewritten by dcp_compile.apply (model.dcp is missing)")
    eager = model.forward
    # Per-request pools sized by capacity bucket: requests of one bucket then reuse the decode graph. (A fixed
    # pool, apply(..., cache_budget_tokens=...), has one shape anyway, and one address: no CUDA-graph re-record.)
    model.dcp.bucket_pools = True
    options.setdefault("dynamic", False)
    decode = torch.compile(eager, mode=mode, **options)
    prefill = eager if prefill_options is None else torch.compile(eager, **prefill_options)
    cuda_graphs = mode in ("reduce-overhead", "max-autotune")

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        steps = _step_tokens(args, kwargs)
        if steps is not None and steps <= STATIC_STEP_TOKENS and not _first_step(kwargs):
            if cuda_graphs:
                # A new replay may overwrite the previous step's outputs: HF copies the logits it keeps.
                torch.compiler.cudagraph_mark_step_begin()
            return decode(*args, **kwargs)
        return prefill(*args, **kwargs)

    forward.dcp_decode = decode  # the compiled callable (tests, benchmarks)
    forward.dcp_eager = eager  # what release_decode restores
    model.forward = forward
    return model


def release_decode(model: nn.Module) -> nn.Module:
    """Undo ``compile_decode``: the eager forward back, every compiled graph and recorded CUDA graph dropped.

    Call it before ``torch.distributed.destroy_process_group()`` in a process that replayed decode steps as CUDA
    graphs: a CUDA graph that captured NCCL collectives keeps the communicator in use, and destroying the group
    then waits forever in ``ncclCommDestroy`` (pytorch/pytorch#115388). Seen on 4 × H200: the CUDA-graph demo
    finished its generation with every token equal to HF's and did not exit. ``torch._dynamo.reset()`` drops
    Dynamo's caches and Inductor's CUDA-graph trees (global state: other compiled models of the process go too)."""
    import gc

    eager = getattr(model.forward, "dcp_eager", None)
    if eager is not None:
        model.forward = eager
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model


__all__ = ["compile_decode", "release_decode"]
