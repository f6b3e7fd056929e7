"""Graph passes over one captured attention layer, run in order by a ``PassManager`` that lints the graph
after each.

The passes read the layer's match but never change it: each finds what it rewrites in the match or in the
graph as the earlier passes left it (PyTorch's ``micro_pipeline_tp`` style: find, then replace). The graph
inputs they add follow the contract in ``contract.py``.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .attention import AttentionConfig, DCPSparseMLA, tp_all_reduce
from .contract import STATE_FIELDS, InputKind, graph_input, label, placeholders
from .match import MLASparseAttentionMatch

aten = torch.ops.aten
ATTENTION_MODULE = "dcp_attention"  # the inserted DCPSparseMLA's name in the layer graph


class GraphPass:
    def __call__(self, gm: GraphModule) -> None:
        raise NotImplementedError

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


def attention_inputs(match: MLASparseAttentionMatch, state: dict[str, Node]) -> dict[str, Node | None]:
    """The keyword arguments of ``DCPSparseMLA.forward``, as graph nodes: the one place they are named."""
    m = match
    inputs = dict(q_nope=m.attention.query_nope, q_rope=m.attention.query_rope,
                  latent_new=m.latent_cache.latent_new, rope_new=m.latent_cache.rope_new)
    if m.indexer is not None:  # the selection's own inputs (none for dense MLA)
        inputs.update(index_key_new=m.indexer.key_new, index_q=m.indexer.query, index_w=m.indexer.weights)
    if m.handed is not None:
        inputs.update(handed=m.handed.indices)
    if m.attention.sinks is not None:
        inputs.update(sinks=m.attention.sinks)
    if m.attention.query_scale is not None:
        inputs.update(q_scale=m.attention.query_scale.factor)
    return dict(inputs, mask=m.mask, kv_b_weight=m.kv_expansion.weight, **state)


class InsertDCPAttention(GraphPass):
    """Replace the layer's cache update, per-head expansion, selection (indexer top-k, or none) and masked
    attention by one ``DCPSparseMLA`` call that reads the sharded paged cache; the output projection now reads
    its result. A layer that hands its selection on (``match.selection_output``) hands on the DCP one instead:
    this rank's compacted rows (``attention.pack_selection``)."""

    def __init__(self, match: MLASparseAttentionMatch, config: AttentionConfig):
        self.match, self.config = match, config

    def __call__(self, gm: GraphModule) -> None:
        m, g = self.match, gm.graph
        state = {}
        with g.inserting_after(placeholders(gm)[-1]):  # each insert lands right after the last placeholder
            for name in reversed(STATE_FIELDS):
                state[name] = g.placeholder(name)
                label(state[name], InputKind.STATE, name)
        state = {name: state[name] for name in STATE_FIELDS}
        gm.add_submodule(ATTENTION_MODULE, DCPSparseMLA(self.config))
        with g.inserting_before(m.attention.output_user):
            call = g.call_module(ATTENTION_MODULE, kwargs=attention_inputs(m, state))
        if self.config.exports_selection:
            with g.inserting_after(call):
                attention, selection = (g.call_function(operator.getitem, (call, i)) for i in (0, 1))
            out = next(n for n in g.nodes if n.op == "output")
            out.args = ([selection if leaf is m.selection_output else leaf for leaf in out.args[0]],)
            call = attention
        if len(m.attention.output.meta["val"].shape) == 4:  # a gate per head reads [B, S, H, v]
            with g.inserting_after(call):
                call = g.call_function(aten.unflatten.int, (call, -1, [m.heads, m.kv_expansion.v_dim]))
        m.attention.output_user.replace_input_with(m.attention.output, call)


class RowParallelOutputProjection(GraphPass):
    """The output projection has only this rank's head columns: all-reduce its product over the TP group
    (before the bias, which is added once)."""

    def __init__(self, match: MLASparseAttentionMatch, group_name: str):
        self.match, self.group_name = match, group_name

    def __call__(self, gm: GraphModule) -> None:
        proj, g = self.match.attention.out_proj, gm.graph
        x, weight, bias = (list(proj.args) + [None])[:3]
        # aten.linear, or an FP8 linear (match.LINEARS: (input, weight, bias, its scales...)) without its bias
        args = (x, weight) if proj.target is aten.linear.default else (x, weight, None, *proj.args[3:])
        with g.inserting_after(proj):
            partial = g.call_function(proj.target, args)
            with g.inserting_after(partial):
                summed = g.call_function(tp_all_reduce, (partial, self.group_name))
            result = summed
            if bias is not None:
                with g.inserting_after(summed):
                    result = g.call_function(aten.add.Tensor, (summed, bias))
        proj.replace_all_uses_with(result)
        g.erase_node(proj)


class KeepLayerOutputOnly(GraphPass):
    """Outputs that do not come from the DCP attention (e.g. eager attention probabilities) no longer exist:
    they become None."""

    def __call__(self, gm: GraphModule) -> None:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        attention = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == ATTENTION_MODULE)
        downstream = _descendants(attention)
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
            if n.op == "placeholder" and not n.users and graph_input(n).kind is not InputKind.STATE:
                gm.graph.erase_node(n)


def dcp_passes(match: MLASparseAttentionMatch, config: AttentionConfig, tp_group: str | None) -> PassManager:
    """The rewrite of one layer, in order: insert the DCP attention, make the output projection row-parallel
    (when heads are sharded), drop outputs and code that no longer exist, drop unused inputs."""
    passes: list[GraphPass] = [InsertDCPAttention(match, config)]
    if tp_group:
        passes.append(RowParallelOutputProjection(match, tp_group))
    passes += [KeepLayerOutputOnly(), EliminateDeadCode(), DropUnusedInputs()]
    return PassManager(passes)


__all__ = [
    "GraphPass", "PassManager", "InsertDCPAttention", "RowParallelOutputProjection", "KeepLayerOutputOnly",
    "EliminateDeadCode", "DropUnusedInputs", "dcp_passes", "attention_inputs", "readable",
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
            lines.append(f"{n.name} <- {graph_input(n)}")
        elif n.op == "output":
            lines.append(f"return {fmt(n.args[0])}")
        else:
            args = [fmt(a) for a in n.args] + [f"{k}={fmt(v)}" for k, v in n.kwargs.items()]
            target = n.target if n.op == "call_module" else name(n.target)
            lines.append(f"{n.name} = {target}({', '.join(args)})")
    return "\n".join(lines)
