"""Each graph pass on its own, on small hand-built graphs."""
import torch
from torch.fx import Graph, GraphModule

from dcp_compile.contract import InputKind, label
from dcp_compile.passes import DropUnusedInputs, EliminateDeadCode, PassManager, RowParallelOutputProjection, readable

aten = torch.ops.aten


def _module(graph: Graph) -> GraphModule:
    return GraphModule(torch.nn.Module(), graph)


def test_dead_code_keeps_writes_into_inputs_and_live_buffers_only():
    g = Graph()
    x = g.placeholder("x")
    label(x, InputKind.INPUT, ("x",))
    dead_buf = g.call_function(aten.new_empty.default, (x, [2]))
    g.call_function(aten.copy_.default, (g.call_function(aten.slice.Tensor, (dead_buf, 0, 0, 1)), x))
    live_buf = g.call_function(aten.new_empty.default, (x, [2]))
    g.call_function(aten.copy_.default, (live_buf, x))
    g.call_function(aten.copy_.default, (x, x))  # writes a graph input: must stay
    g.call_function(aten.dropout.default, (x, 0.0, False))  # "impure" for FX, but dead here
    g.output([g.call_function(aten.add.Tensor, (live_buf, 1))])
    gm = _module(g)
    EliminateDeadCode()(gm)
    text = readable(gm)
    assert text.count("aten.copy_") == 2 and "aten.slice" not in text and "dropout" not in text, text
    assert text.count("aten.new_empty") == 1, text


def test_row_parallel_output_projection_reduces_before_the_bias():
    g = Graph()
    x, w, b = (g.placeholder(n) for n in "xwb")
    for node in (x, w, b):
        label(node, InputKind.INPUT, (node.name,))
    proj = g.call_function(aten.linear.default, (x, w, b))
    g.output([proj])
    gm = _module(g)

    class Match:  # the pass reads only the matched output projection
        class attention:
            out_proj = proj

    RowParallelOutputProjection(Match, "tp")(gm)
    gm.graph.lint()
    assert readable(gm).splitlines()[3:] == [
        "linear_default_1 = aten.linear(x, w)",
        "tp_all_reduce = tp_all_reduce(linear_default_1, 'tp')",
        "add_tensor = aten.add(tp_all_reduce, b)",
        "return [add_tensor]",
    ], readable(gm)


def test_drop_unused_inputs_keeps_cache_state():
    g = Graph()
    used, unused, state = g.placeholder("used"), g.placeholder("unused"), g.placeholder("pool")
    label(used, InputKind.INPUT, ("a",))
    label(unused, InputKind.PAST, 0)
    label(state, InputKind.STATE, "latent_pool")
    g.output([used])
    gm = _module(g)
    DropUnusedInputs()(gm)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["used", "pool"]


def test_pass_manager_runs_in_order():
    calls = []

    class First(EliminateDeadCode):
        def __call__(self, gm):
            calls.append("first")

    class Second(DropUnusedInputs):
        def __call__(self, gm):
            calls.append("second")

    g = Graph()
    g.output([g.placeholder("x")])
    manager = PassManager([First(), Second()])
    manager(_module(g))
    assert calls == ["first", "second"]
