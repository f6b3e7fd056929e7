"""Install: make a rewritten layer graph the layer's ``forward``.

The installed forward takes the layer's usual arguments (as HF's decoder layer passes them), pulls the
tensors the graph needs out of them by the paths recorded at capture, adds the layer's live parameters
and the cache state (pools, block table, the step's positions), runs the graph, and returns the layer's usual
output structure. It is plain Python over tensors, so eager runs it and Dynamo traces straight through it.

The step's host bookkeeping (capacity check, the length's device copy, the widths; ``ShardedPagedCache.begin_step``
/ ``end_step``) is done by the model's forward hooks, outside any compiled forward. A layer run without them (the
base model or a layer called directly, eagerly) brackets the step itself: the first DCP layer opens it, the last
closes it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .cache import ShardedPagedCache
from .capture import CapturedLayer
from .contract import InputKind, graph_input, placeholders


def _lookup(args: tuple, kwargs: dict, path: tuple, arg_names: tuple[str, ...]):
    """Value at ``path`` of (args, kwargs); a kwarg recorded by name may arrive positionally and vice versa."""
    head, *rest = path
    if head == 1 and rest[0] not in kwargs:
        head, rest = 0, [arg_names.index(rest[0]), *rest[1:]]
    elif head == 0 and rest[0] >= len(args):
        head, rest = 1, [arg_names[rest[0]], *rest[1:]]
    value = (args, kwargs)[head]
    for k in rest:
        value = value[k]
    return value


class DCPLayerForward:
    """The forward of one rewritten attention layer: called like the original, it feeds each placeholder of the
    graph what its ``GraphInput`` names (``contract.py``)."""

    def __init__(self, module: nn.Module, captured: CapturedLayer, layer_idx: int, arg_names: tuple[str, ...]):
        self.module, self.gm, self.layer_idx, self.arg_names = module, captured.graph_module, layer_idx, arg_names
        self.cache_path, self.step_path, self.step_dim = captured.cache_path, captured.step_path, captured.step_dim
        self.out_tree = captured.out_tree
        self.inputs = [graph_input(n) for n in placeholders(self.gm)]

    def __call__(self, *args, **kwargs):
        cache = _lookup(args, kwargs, self.cache_path, self.arg_names)
        if not isinstance(cache, ShardedPagedCache):
            raise TypeError(
                f"layer {self.layer_idx} runs decode context parallelism and needs the ShardedPagedCache made by "
                f"dcp_compile (generate() makes one; or pass cache=model.dcp.new_cache(batch, tokens)); got "
                f"{type(cache).__name__}"
            )
        steps = _lookup(args, kwargs, self.step_path, self.arg_names).shape[self.step_dim]
        if cache.step_tokens is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "a DCP layer ran inside torch.compile without the model's forward hooks (they bracket each step on "
                    "the host): compile the forward of the model dcp_compile.apply was given, "
                    "model.forward = torch.compile(model.forward, ...), and call the model"
                )
            cache.begin_step(steps, owner="layers")
        state = cache.layer_state(self.layer_idx)
        flat = []
        for item in self.inputs:
            if item.kind is InputKind.PARAM:
                flat.append(self.module.get_parameter(item.what))
            elif item.kind is InputKind.BUFFER:
                flat.append(self.module.get_buffer(item.what))
            elif item.kind is InputKind.INPUT:
                flat.append(_lookup(args, kwargs, item.what, self.arg_names))
            else:
                flat.append(getattr(state, item.what))
        out = self.gm(*flat)
        if self.layer_idx == cache.last_layer and cache.step_owner == "layers":
            cache.end_step()
        return pytree.tree_unflatten(list(out), self.out_tree)


def install(module: nn.Module, forward: DCPLayerForward) -> None:
    module.dcp_graph = forward.gm  # a submodule: shows in print(model), moves with .to()
    module.forward = forward
