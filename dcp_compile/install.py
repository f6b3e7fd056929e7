"""Install: make a rewritten layer graph the layer's ``forward``.

The installed forward takes the layer's usual arguments (as HF's decoder layer passes them), pulls the
tensors the graph needs out of them by the paths recorded at capture, adds the layer's live parameters
and the cache state (pools, block table, past length), runs the graph, and returns the layer's usual output
structure. It is plain Python over tensors, so eager runs it and Dynamo traces straight through it.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .cache import ShardedPagedCache


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
    """The forward of one rewritten attention layer."""

    def __init__(self, module: nn.Module, gm: GraphModule, layer_idx: int, arg_names: tuple[str, ...],
                 cache_path: tuple, step_path: tuple, step_dim: int, out_spec: Any):
        self.module, self.gm, self.layer_idx = module, gm, layer_idx
        self.arg_names, self.cache_path, self.step_path, self.step_dim = arg_names, cache_path, step_path, step_dim
        self.out_spec = out_spec
        self.inputs = [n.meta["dcp_input"] for n in gm.graph.nodes if n.op == "placeholder"]

    def __call__(self, *args, **kwargs):
        cache = _lookup(args, kwargs, self.cache_path, self.arg_names)
        if not isinstance(cache, ShardedPagedCache):
            raise TypeError(
                f"layer {self.layer_idx} runs decode context parallelism and needs the ShardedPagedCache made by "
                f"dcp_compile (generate() makes one; or pass cache=model.dcp.new_cache(batch, tokens)); got "
                f"{type(cache).__name__}"
            )
        steps = _lookup(args, kwargs, self.step_path, self.arg_names).shape[self.step_dim]
        latent, index, table, past = cache.layer_state(self.layer_idx, steps)
        state = {"latent_pool": latent, "index_pool": index, "block_table": table, "past_length": past}
        flat = []
        for kind, what in self.inputs:
            if kind == "param":
                flat.append(self.module.get_parameter(what))
            elif kind == "buffer":
                flat.append(self.module.get_buffer(what))
            elif kind == "input":
                flat.append(_lookup(args, kwargs, what, self.arg_names))
            else:
                flat.append(state[what])
        out = self.gm(*flat)
        cache.advance(self.layer_idx, steps)
        return pytree.tree_unflatten(list(out), self.out_spec)


def install(module: nn.Module, forward: DCPLayerForward) -> None:
    module.dcp_graph = forward.gm  # a submodule: shows in print(model), moves with .to()
    module.forward = forward
