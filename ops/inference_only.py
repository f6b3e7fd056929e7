"""dcp_compile is inference-only: a backward through any ``dcp`` op or DCP collective raises a clear error.

Every functional ``dcp`` op gets an autograd formula that raises (``register``); the collectives of
``ops/distributed.py`` run through ``collective``, which adds a node that raises in backward only when grad
mode is on and the input requires grad, so the no-grad path (generate, compiled decode) is unchanged.
Without it, the c10d functional collectives either fail in forward with an unrelated view error or, in
backward, warn that they have no autograd kernel and silently give wrong (or no) gradients.

``dcp::paged_write`` mutates its pool, and torch refuses an autograd formula for a mutating op; nothing
differentiable flows out of it (the pool never requires grad), and every read of the pool goes through an op
that raises here.
"""
from __future__ import annotations

import torch
from torch import Tensor


def message(name: str) -> str:
    return (
        f"{name}: dcp_compile is inference-only: run generate/forward under torch.no_grad() or "
        "torch.inference_mode(); dcp_compile does not support training or backward"
    )


def register(op) -> None:
    """Give the custom op ``op`` (a ``torch.library`` CustomOpDef) a backward that raises."""
    name = op._qualname

    def backward(ctx, *grads):
        raise RuntimeError(message(name))

    torch.library.register_autograd(name, backward, setup_context=lambda ctx, inputs, output: None)


class _InferenceOnly(torch.autograd.Function):
    """Runs a collective on a tensor that requires grad (as autograd.Function forwards run: without grad),
    and raises the inference-only error in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, collective, name: str) -> Tensor:
        ctx.name = name
        return collective(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError(message(ctx.name))


def collective(fn, x: Tensor, name: str) -> Tensor:
    """``fn(x)``; when grad mode is on and ``x`` requires grad, behind a node whose backward raises the
    inference-only error. (Run directly there, the c10d functional collectives fail in forward with an
    unrelated view/in-place error, or warn in backward and give wrong gradients.) The inference path (no grad:
    generate, the compiled decode step) calls ``fn`` directly: no extra node, nothing more for Dynamo."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _InferenceOnly.apply(x, fn, name)
    return fn(x)
