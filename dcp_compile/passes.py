"""Graph passes over one captured attention layer, run in order by a ``PassManager``.

Each pass is a small class with ``__call__(gm)`` and a ``uuid()`` that hashes its own source (so a cache of
compiled artefacts keyed on the pass pipeline is invalidated when a pass changes), in the style of
Inductor's ``CustomGraphPass``. Placeholders carry ``meta["dcp_input"]``: what the installer must feed
them (("param", fqn), ("input", path), ("past", i) or ("state", name)).
"""
from __future__ import annotations

import hashlib
import inspect

import torch
from torch.fx import GraphModule, Node

from .attention import DCPAttentionSpec, DCPSparseMLA, tp_all_reduce
from .match import MLASparseAttentionMatch

aten = torch.ops.aten
STATE_INPUTS = ("latent_pool", "index_pool", "block_table", "past_length")


class GraphPass:
    def __call__(self, gm: GraphModule) -> None:
        raise NotImplementedError

    def uuid(self) -> str:
        return hashlib.sha256(inspect.getsource(type(self)).encode()).hexdigest()

    def __repr__(self) -> str:
        return type(self).__name__


class PassManager:
    def __init__(self, passes: list[GraphPass]):
        self.passes = passes

    def __call__(self, gm: GraphModule) -> GraphModule:
        for p in self.passes:
            p(gm)
            gm.graph.lint()
        gm.recompile()
        return gm

    def uuid(self) -> str:
        return hashlib.sha256("".join(p.uuid() for p in self.passes).encode()).hexdigest()


def _last_placeholder(gm: GraphModule) -> Node:
    return [n for n in gm.graph.nodes if n.op == "placeholder"][-1]


class InsertDCPAttention(GraphPass):
    """Replace the layer's cache update, per-head expansion, indexer top-k and masked attention by one
    ``DCPSparseMLA`` call that reads the sharded paged cache; the output projection now reads its result."""

    def __init__(self, match: MLASparseAttentionMatch, spec: DCPAttentionSpec):
        self.match, self.spec = match, spec

    def __call__(self, gm: GraphModule) -> None:
        m, g = self.match, gm.graph
        with g.inserting_after(_last_placeholder(gm)):
            state = []
            for name in reversed(STATE_INPUTS):
                ph = g.placeholder(name)
                ph.meta["dcp_input"] = ("state", name)
                state.insert(0, ph)
        gm.add_submodule("dcp_attention", DCPSparseMLA(self.spec))
        with g.inserting_before(m.attention.out_proj):
            call = g.call_module("dcp_attention", args=(
                m.attention.query_nope, m.attention.query_rope,
                m.latent_cache.latent_new, m.latent_cache.rope_new,
                m.indexer.key_new, m.indexer.query, m.indexer.weights,
                m.mask, m.kv_expansion.weight, *state,
            ))
        m.attention.out_proj.replace_input_with(m.attention.output, call)


class RowParallelOutputProjection(GraphPass):
    """The output projection has only this rank's head columns: all-reduce its product over the TP group
    (before the bias, which is added once)."""

    def __init__(self, match: MLASparseAttentionMatch, group_name: str):
        self.match, self.group_name = match, group_name

    def __call__(self, gm: GraphModule) -> None:
        proj, g = self.match.attention.out_proj, gm.graph
        x, weight, bias = (list(proj.args) + [None])[:3]
        with g.inserting_after(proj):
            partial = g.call_function(aten.linear.default, (x, weight))
            with g.inserting_after(partial):
                summed = g.call_function(tp_all_reduce, (partial, self.group_name))
            result = summed
            if bias is not None:
                with g.inserting_after(summed):
                    result = g.call_function(aten.add.Tensor, (summed, bias))
        proj.replace_all_uses_with(result)
        g.erase_node(proj)
        self.match.attention.out_proj = partial


class KeepLayerOutputOnly(GraphPass):
    """Outputs other than the layer output (e.g. eager attention probabilities) no longer exist: None."""

    def __init__(self, match: MLASparseAttentionMatch):
        self.match = match

    def __call__(self, gm: GraphModule) -> None:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        downstream = _descendants(self.match.attention.out_proj)
        leaves = [v if isinstance(v, Node) and v in downstream else None for v in out.args[0]]
        out.args = (leaves,)


def _descendants(node: Node) -> set[Node]:
    seen, todo = {node}, [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


class EliminateDeadCode(GraphPass):
    """Dead-code elimination that also drops in-place writes into buffers nothing live reads (HF builds
    its expanded keys with ``new_empty`` + ``copy_``); writes into graph inputs (the cache pools) stay."""

    MUTATING = {aten.copy_.default}

    def __call__(self, gm: GraphModule) -> None:
        g = gm.graph
        nodes = list(g.nodes)
        live: set[Node] = set()

        def mark(n: Node):
            todo = [n]
            while todo:
                x = todo.pop()
                if x in live:
                    continue
                live.add(x)
                todo.extend(x.all_input_nodes)

        # Only the output is a root: a captured layer is functional apart from writes into fresh buffers
        # (grad-mode toggles and dropout(p=0) of the replaced attention die with it).
        mark(next(n for n in nodes if n.op == "output"))
        changed = True
        while changed:  # a write is live if the buffer it writes is live or is a graph input
            changed = False
            for n in nodes:
                root = _root(n.args[0]) if n.target in self.MUTATING else None
                if root is not None and n not in live and (root in live or root.op == "placeholder"):
                    mark(n)
                    changed = True
        for n in reversed(nodes):
            if n not in live and n.op != "placeholder":
                g.erase_node(n)


def _root(node: Node) -> Node:
    while node.op == "call_function" and node.target in (aten.slice.Tensor, aten.select.int, aten.view.default, aten.transpose.int):
        node = node.args[0]
    return node


class DropUnusedInputs(GraphPass):
    """Remove placeholders nothing reads (the capture's past-cache inputs, position ids, ...)."""

    def __call__(self, gm: GraphModule) -> None:
        for n in list(gm.graph.nodes):
            if n.op == "placeholder" and not n.users and n.meta.get("dcp_input", ("",))[0] != "state":
                gm.graph.erase_node(n)


def flat_codegen(gm: GraphModule) -> None:
    """make_fx wraps inputs/outputs in pytrees; the installer calls the graph with a flat argument list."""
    gm.graph._codegen = torch.fx.graph.CodeGen()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], (list, tuple)):
        out.args = ([out.args[0]],)


def dcp_passes(match: MLASparseAttentionMatch, spec: DCPAttentionSpec, tp_group: str | None) -> PassManager:
    passes: list[GraphPass] = [InsertDCPAttention(match, spec)]
    if tp_group:
        passes.append(RowParallelOutputProjection(match, tp_group))
    passes += [KeepLayerOutputOnly(match), EliminateDeadCode(), DropUnusedInputs()]
    return PassManager(passes)


__all__ = [
    "GraphPass", "PassManager", "InsertDCPAttention", "RowParallelOutputProjection", "KeepLayerOutputOnly",
    "EliminateDeadCode", "DropUnusedInputs", "dcp_passes", "flat_codegen", "readable",
]


def readable(gm: GraphModule) -> str:
    """One line per node — what graph snapshots and error reports show. Inputs carry their role."""

    def fmt(a):
        if isinstance(a, Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in a) + "]"
        if isinstance(a, float):
            return f"{a:.6g}"
        return repr(a)

    def name(target):
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._opname}"
        return getattr(target, "__name__", str(target))

    lines = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            kind, what = n.meta.get("dcp_input", ("input", "?"))
            lines.append(f"{n.name} <- {kind} {'.'.join(map(str, what)) if isinstance(what, tuple) else what}")
        elif n.op == "output":
            lines.append(f"return {fmt(n.args[0])}")
        else:
            args = [fmt(a) for a in n.args] + [f"{k}={fmt(v)}" for k, v in n.kwargs.items()]
            target = n.target if n.op == "call_module" else name(n.target)
            lines.append(f"{n.name} = {target}({', '.join(args)})")
    return "\n".join(lines)
