"""Match: find MLA sparse attention in a captured layer graph by its dataflow.

The pieces (each a small dataclass, found independently, then combined):

- ``LatentCacheMatch``: the ``cache_update`` marker — the step's new latent ``c`` and rotary key rows.
- ``KVExpansionMatch``: the linear that expands the full latent cache per head (``kv_b_proj``), and its
  split into per-head non-rotary keys and values.
- ``AttentionMatch``: the attention core that consumes those values (eager ``matmul → softmax → matmul``
  or ``scaled_dot_product_attention``), its query ``cat(q_nope, q_rope)``, scale, and the output
  projection that follows.
- The selection — which cached positions each query attends — is one of three, told apart by dataflow:
  ``IndexerMatch`` (the ``indexer_update`` marker, the indexer's ``matmul → scale → relu → weighted sum →
  mask → topk`` and its query, head weights, scale and k: DeepSeek Sparse Attention), ``HandedSelectionMatch``
  (an integer input of the layer scattered into the attention mask: another layer's top-k, reused), or
  neither (dense MLA: every position the attention mask allows; the mask must reach the core unchanged).
- ``QueryProjectionMatch``: the linear whose output is split into heads to make the query (for head sharding).

Nothing here names a model class or a module attribute; parameters are found as graph inputs.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .capture import CapturedLayer
from .contract import InputKind, placeholders
from .fp8 import FP8_LINEAR

aten = torch.ops.aten

# The projections: ``aten.linear`` and HF's block-FP8 linear as captured (``fp8.FP8_LINEAR``), whose arguments
# begin like aten.linear's: (input, weight, bias, ...).
LINEARS = {aten.linear.default, FP8_LINEAR}

# Ops that move, cast or re-view a tensor without changing which values it holds.
TRANSPARENT = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.transpose.int, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.default, aten.contiguous.default, aten.view.default, aten.reshape.default,
    aten.expand.default, aten.clone.default, aten.t.default, aten.permute.default, aten.alias.default,
    aten.dropout.default, aten.slice.Tensor, aten.select.int,
}


class MatchError(ValueError):
    """A layer did not have the shape of MLA sparse attention; the message names the layer and what is missing."""


@dataclass
class LatentCacheMatch:
    update: Node
    latent_new: Node  # [B, 1, S, d_c]
    rope_new: Node  # [B, 1, S, d_rope]
    latent_all: Node  # the full latent cache read back


@dataclass
class KVExpansionMatch:
    linear: Node
    weight: Node  # parameter placeholder [H·(nope + v), d_c]
    nope_dim: int
    v_dim: int
    values: Node  # per-head values [B, H, T, v]


@dataclass
class GateMatch:
    """An elementwise gate on the attention output, before the output projection (AXK2, Dots3Note)."""

    mul: Node  # attention × gate
    attention: Node  # the attention output as the gate receives it: [B, S, H·v] or [B, S, H, v]
    gate: Node  # the gate operand
    projection: Node  # the linear the gate is computed from
    weight: Node  # its weight (rows per head, head-major)


@dataclass
class QueryScaleMatch:
    """The whole query (non-rotary and rotary parts) multiplied by one factor per batch, head and token."""

    factor: Node  # [B, H, S, 1]
    params: list[Node]  # the per-head parameters it is computed from ([H] each: sharded with the heads)


@dataclass
class AttentionMatch:
    core: Node
    query_nope: Node  # [B, H, S, nope]
    query_rope: Node  # [B, H, S, rope]
    scale: float
    output: Node  # the attention output as the next op (the output projection, or the gate) receives it:
    #               [B, S, H·v] (or [B, S, H, v] for a gate per head)
    out_proj: Node  # the output projection (one of LINEARS)
    mask: Node | None = None  # the mask the core applies to the scores (None: none)
    gate: GateMatch | None = None  # an elementwise gate between the attention output and the output projection
    sinks: Node | None = None  # a per-head sink logit parameter [H] in the softmax (HY-V4)
    query_scale: QueryScaleMatch | None = None  # a per-(batch, head, token) factor on the query (Mistral-Large-4)

    @property
    def output_user(self) -> Node:
        """The op that reads the attention output."""
        return self.gate.mul if self.gate is not None else self.out_proj


@dataclass
class IndexerMatch:
    update: Node
    key_new: Node  # [B, S, Di]
    query: Node  # [B, S, Hi, Di]
    weights: Node  # [B, S, Hi]
    scale: float
    topk: int
    indices: Node | None = None  # the top-k node


@dataclass
class HandedSelectionMatch:
    """The layer attends over positions another layer selected: an integer input ([B, S, K], e.g. GLM's
    ``prev_topk_indices``) scattered into the attention mask."""

    indices: Node  # the input placeholder


@dataclass
class QueryProjectionMatch:
    linear: Node
    weight: Node  # [H·head_dim, q_lora]
    head_dim: int


@dataclass
class MLASparseAttentionMatch:
    layer: str
    latent_cache: LatentCacheMatch
    kv_expansion: KVExpansionMatch
    attention: AttentionMatch
    indexer: IndexerMatch | None  # None: no indexer of its own (dense MLA, or a handed selection)
    query_projection: QueryProjectionMatch
    mask: Node | None
    handed: HandedSelectionMatch | None = None
    selection_output: Node | None = None  # the layer output that hands its selection on (GLM's topk_indices)

    @property
    def selection(self) -> str:
        """Which selection the rewritten layer runs (``attention.SELECTIONS``)."""
        return "indexer_topk" if self.indexer else "handed" if self.handed else "owned_rows"

    @property
    def heads(self) -> int:
        rows = self.kv_expansion.weight.meta["val"].shape[0]
        return rows // (self.kv_expansion.nope_dim + self.kv_expansion.v_dim)

    @property
    def latent_dim(self) -> int:
        return self.kv_expansion.weight.meta["val"].shape[1]

    @property
    def rope_dim(self) -> int:
        return self.latent_cache.rope_new.meta["val"].shape[-1]


# --- graph walking -----------------------------------------------------------------------------------------------------
def source(node: Node) -> Node:
    """Follow a value back through TRANSPARENT ops to where it was computed."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in TRANSPARENT:
        node = node.args[0]
    return node


def consumers(node: Node) -> list[Node]:
    """The non-transparent nodes that read ``node`` (looking through TRANSPARENT ops)."""
    out, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_function" and u.target in TRANSPARENT and u.args[0] is n:
                todo.append(u)
            else:
                out.append(u)
    return out


def getitem(node: Node, index: int) -> Node | None:
    for u in node.users:
        if u.target is operator.getitem and u.args[1] == index:
            return u
    return None


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _only(nodes: list[Node], what: str, layer: str) -> Node:
    if len(nodes) != 1:
        raise MatchError(f"layer {layer}: expected exactly one {what}, found {len(nodes)}")
    return nodes[0]


# --- the pieces ----------------------------------------------------------------------------------------------------------
def match_latent_cache(gm: GraphModule, layer: str) -> LatentCacheMatch:
    updates = [n for n in gm.graph.nodes if n.target is torch.ops.dcp_capture.cache_update.default]
    if not updates:
        raise MatchError(f"layer {layer}: no latent cache update (the layer never calls cache.update)")
    update = _only(updates, "latent cache update", layer)
    latent_all = getitem(update, 0)
    if latent_all is None:
        raise MatchError(f"layer {layer}: the latent cache is written but never read back")
    return LatentCacheMatch(update, update.args[0], update.args[1], latent_all)


def match_kv_expansion(latent: LatentCacheMatch, params: set[Node], layer: str) -> KVExpansionMatch:
    linears = [u for u in consumers(latent.latent_all) if u.target in LINEARS and u.args[0] is not None]
    if not linears or source(linears[0].args[1]) not in params:
        raise MatchError(
            f"layer {layer}: the cached latent is not expanded per head by a linear projection (kv_b_proj) — "
            f"is this MLA? Dense multi-head caches are not supported"
        )
    linear = linears[0]
    splits = [u for u in consumers(linear) if u.target is aten.split_with_sizes.default]
    if not splits or len(splits[0].args[1]) != 2:
        raise MatchError(f"layer {layer}: the expanded latent is not split into per-head keys and values")
    nope_dim, v_dim = (int(x) for x in splits[0].args[1])
    values = getitem(splits[0], 1)
    return KVExpansionMatch(linear, source(linear.args[1]), nope_dim, v_dim, values)


def _sdpa_core(core: Node, layer: str, params: set[Node]) -> tuple[Node, float, Node | None, Node | None]:
    query = source(core.args[0])
    scale = core.kwargs.get("scale")
    mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
    return query, (1.0 / math.sqrt(query.meta["val"].shape[-1]) if scale is None else scale), mask, None


def _eager_core(pv: Node, layer: str, params: set[Node]) -> tuple[Node, float, Node | None, Node | None]:
    probs = source(pv.args[0])
    if probs.target not in (aten.softmax.int, aten._softmax.default):
        raise MatchError(f"layer {layer}: the values are multiplied by something other than softmax probabilities")
    node, scale, mask, sinks = probs.args[0], 1.0, None, None
    if node.target is aten.sub.Tensor and _is_row_max(node.args[1], node.args[0]):
        node = node.args[0]  # softmax(x - max(x)): a stabiliser, the same softmax
    if node.target is aten.cat.default:
        node, sinks = _sinks(node, probs, pv, params, layer)
    while node.target is not aten.matmul.default:
        if node.target is aten.mul.Tensor and _scalar(node.args[1]) is not None:
            scale *= _scalar(node.args[1])
            node = node.args[0]
        elif node.target is aten.div.Tensor and _scalar(node.args[1]) is not None:
            scale /= _scalar(node.args[1])
            node = node.args[0]
        elif node.target is aten.add.Tensor:  # the additive mask
            node, mask = node.args[0], node.args[1]
        elif node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):  # a boolean mask filled in
            node, mask = node.args[0], node.args[1]
        else:
            raise MatchError(f"layer {layer}: cannot follow the attention scores through {node.target}")
    return source(node.args[0]), scale, mask, sinks


def _is_row_max(node: Node, of: Node) -> bool:
    node = source(node)
    if node.target is operator.getitem and node.args[1] == 0:
        node = node.args[0]
    return node.target in (aten.max.dim, aten.amax.default) and node.args[0] is of


def _sinks(cat: Node, probs: Node, pv: Node, params: set[Node], layer: str) -> tuple[Node, Node]:
    """Attention sinks (HY-V4): one learned logit per head concatenated to the scores as an extra column, which
    takes part in the softmax and is dropped before the values: ``softmax([s, sink])[..., :-1] @ v``."""
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    sink = source(parts[1]) if len(parts) == 2 else None
    last = (dim == -1 or dim == len(cat.meta["val"].shape) - 1)
    dropped = [n for n in _between(pv.args[0], probs) if n.target is aten.slice.Tensor]
    if sink not in params or not last or len(sink.meta["val"].shape) != 1 or len(dropped) != 1 \
            or tuple(dropped[0].args[2:4]) != (0, -1):
        raise MatchError(
            f"layer {layer}: the attention scores are concatenated with something before the softmax that is not "
            f"one learned sink logit per head (an extra column dropped before the values)"
        )
    return parts[0], sink


def _between(node: Node, stop: Node) -> list[Node]:
    """The TRANSPARENT nodes from ``node`` back to ``stop``."""
    out = []
    while node is not stop and isinstance(node, Node) and node.target in TRANSPARENT:
        out.append(node)
        node = node.args[0]
    return out


# The attention cores the match understands, keyed by the op that consumes the values: each gives the
# attention's query, softmax scale, the mask it applies and its attention sinks (or None). HF's "eager" core is
# matmul → softmax → matmul; "sdpa" is one op.
ATTENTION_CORES = {
    aten.matmul.default: _eager_core,
    aten.scaled_dot_product_attention.default: _sdpa_core,
}


def match_attention(kv: KVExpansionMatch, layer: str, params: set[Node] = frozenset()) -> AttentionMatch:
    cores = [u for u in consumers(kv.values) if u.target in ATTENTION_CORES]
    if not cores:
        raise MatchError(
            f"layer {layer}: no attention core (matmul/softmax or scaled_dot_product_attention) reads the expanded "
            f"values; attention implementations other than 'eager' and 'sdpa' are not supported"
        )
    core = cores[0]
    query, scale, mask, sinks = ATTENTION_CORES[core.target](core, layer, params)
    query_scale = None
    if query.target is aten.mul.Tensor and all(isinstance(a, Node) for a in query.args[:2]):
        query, query_scale = _scaled_query(query, params, layer)
    if query.target is not aten.cat.default or len(query.args[0]) != 2:
        raise MatchError(f"layer {layer}: the attention query is not the concatenation of non-rotary and rotary parts")
    q_nope, q_rope = query.args[0]
    users = consumers(core)
    projections = [u for u in users if u.target in LINEARS]
    gate = None
    if not projections and len(users) == 1 and users[0].target is aten.mul.Tensor:
        gate = match_output_gate(users[0], core, params, layer)
        projections = [u for u in consumers(gate.mul) if u.target in LINEARS]
    if not projections:
        raise MatchError(f"layer {layer}: the attention output does not go into an output projection")
    out_proj = projections[0]
    output = gate.attention if gate is not None else out_proj.args[0]
    return AttentionMatch(core, q_nope, q_rope, float(scale), output, out_proj, mask, gate, sinks, query_scale)


def _scaled_query(mul: Node, params: set[Node], layer: str) -> tuple[Node, QueryScaleMatch]:
    """``cat(q_nope, q_rope) × f`` with ``f`` one factor per (batch, head, token) — Mistral-Large-4's
    position-dependent softmax scaling, ``(scale_h·log(pos + 1) + bias_h)`` — applied to the whole query."""
    query, factor = (source(a) for a in mul.args[:2])
    if query.target is not aten.cat.default:
        query, factor = factor, query
    q_shape, f_shape = query.meta["val"].shape, mul.args[1 if source(mul.args[0]) is query else 0].meta["val"].shape
    per_head = [p for p in _ancestors(factor) if p in params]
    if (query.target is not aten.cat.default or len(f_shape) != len(q_shape) or f_shape[-1] != 1
            or any(len(p.meta["val"].shape) != 1 or p.meta["val"].shape[0] != q_shape[1] for p in per_head)):
        raise MatchError(
            f"layer {layer}: the attention query is multiplied by something that is not one factor per batch, head "
            f"and token computed from per-head parameters"
        )
    return query, QueryScaleMatch(mul.args[1 if source(mul.args[0]) is query else 0], per_head)


def _ancestors(node: Node) -> list[Node]:
    seen, todo = {}, [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen[n] = None
            todo.extend(n.all_input_nodes)
    return list(seen)


# Elementwise activations a gate on the attention output may apply to its projection (AXK2, Dots3Note, HY-V4:
# sigmoid).
GATE_ACTIVATIONS = {aten.sigmoid.default, aten.silu.default, aten.tanh.default}


def match_output_gate(mul: Node, core: Node, params: set[Node], layer: str) -> GateMatch:
    """An elementwise gate between the attention output and the output projection: ``attention × act(x·W_g)``,
    with ``W_g`` a linear of the layer (its own, or the query projection's fused gate part) whose rows are per
    head. The gate stays in the graph; only its projection's rows are sharded with the heads."""
    operands = [a for a in mul.args[:2] if isinstance(a, Node)]
    attention = [a for a in operands if source(a) is core]
    if len(operands) != 2 or len(attention) != 1:
        raise MatchError(f"layer {layer}: the attention output is multiplied by something other than a gate")
    gate = next(a for a in operands if a is not attention[0])
    node, seen = gate, []
    while True:
        node = source(node)
        seen.append(str(node.target))
        if node.target in LINEARS and source(node.args[1]) in params:
            break
        if node.target in GATE_ACTIVATIONS or node.target in (operator.getitem, aten.split_with_sizes.default,
                                                              aten.split.Tensor):
            node = node.args[0]
        else:
            raise MatchError(
                f"layer {layer}: the attention output is multiplied by a gate that is not an activation of a linear "
                f"projection of the layer (found {' <- '.join(seen)})"
            )
    return GateMatch(mul, attention[0], gate, node, source(node.args[1]))


def match_indexer(gm: GraphModule, layer: str) -> IndexerMatch | None:
    """The layer's DSA indexer, or None if it has none (no ``indexer_update`` marker)."""
    updates = [n for n in gm.graph.nodes if n.target is torch.ops.dcp_capture.indexer_update.default]
    if not updates:
        return None
    update = _only(updates, "indexer key cache update", layer)
    mms = [u for u in consumers(update) if u.target is aten.matmul.default]
    if not mms:
        raise MatchError(f"layer {layer}: the indexer keys are not scored by a matmul")
    mm = mms[0]
    node, scale, relu = mm, 1.0, False
    while True:
        users = [u for u in consumers(node)]
        if len(users) != 1:
            raise MatchError(f"layer {layer}: the indexer scores branch before the head-weighted sum")
        u = users[0]
        if u.target is aten.mul.Tensor and _scalar(u.args[1]) is not None:
            scale *= _scalar(u.args[1])
        elif u.target is aten.relu.default:
            relu = True
        elif u.target is aten.matmul.default and relu:
            weights_mm = u
            break
        else:
            raise MatchError(f"layer {layer}: unexpected {u.target} between indexer scoring and its head weighting")
        node = u
    topks, node = [], weights_mm
    for _ in range(8):  # through squeeze / mask add / masked_fill to the top-k
        users = consumers(node)
        topks = [u for u in users if u.target is aten.topk.default]
        if topks or len(users) != 1:
            break
        node = users[0]
    if not topks or not isinstance(topks[0].args[1], int):
        raise MatchError(f"layer {layer}: the indexer scores do not end in a top-k of fixed size")
    return IndexerMatch(update, update.args[0], before_upcast(mm.args[0]), source(weights_mm.args[0]), scale,
                        int(topks[0].args[1]), topks[0])


_REDUCED = (torch.bfloat16, torch.float16)
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)


def before_upcast(node: Node) -> Node:
    """The tensor a float32 upcast of a bf16/fp16 tensor was made from (HF scores the indexer as
    ``q.float() @ k.float()``). The DCP kernels take the reduced-precision operands as they are: a bf16 x bf16
    (or fp16) product is exact in fp32, so the scores are the same products without a widened copy; the fp32
    path of the kernel is many times slower. Downcasts (a float64 model's ``.float()``) are kept."""
    while node.op == "call_function" and node.target in _CASTS:
        src = node.args[0]
        before, after = src.meta["val"], node.meta["val"]
        if before.dtype not in _REDUCED or after.dtype != torch.float32 or before.shape != after.shape:
            break
        node = src
    return node


def match_handed_selection(gm: GraphModule, layer: str) -> HandedSelectionMatch | None:
    """An integer input of the layer that is scattered (into the attention mask): the positions another layer
    selected, reused here (GLM-MoE-DSA's "shared" indexer layers)."""
    handed = []
    for node in placeholders(gm, InputKind.INPUT):
        val = node.meta.get("val")
        if val is None or val.dtype.is_floating_point or val.dtype.is_complex or val.dtype == torch.bool:
            continue
        if any(u.target in SCATTERS and source(u.args[2]) is node for u in consumers(node)):
            handed.append(node)
    return HandedSelectionMatch(_only(handed, "input of selected positions", layer)) if handed else None


SCATTERS = {aten.scatter.value, aten.scatter.src, aten.scatter_.value, aten.scatter_.src}


def check_dense_mask(att: AttentionMatch, mask: Node | None, layer: str) -> None:
    """A layer without a selection of its own attends every position its attention mask allows (dense MLA): the
    mask the core applies must be the layer's mask input as given, or the rewrite would attend other positions."""
    applied = source(att.mask) if att.mask is not None else None
    if mask is not None and applied is mask:
        return
    what = "no attention mask" if applied is None else f"a mask computed by {applied.target}"
    raise MatchError(
        f"layer {layer}: the layer has no DeepSeek Sparse Attention indexer, so it must attend every position its "
        f"attention mask allows (dense MLA), but its attention core applies {what}, not the layer's "
        f"attention_mask input: dcp_compile cannot tell which positions it attends"
    )


def match_selection_output(gm: GraphModule, idx: IndexerMatch | None, handed: HandedSelectionMatch | None) -> Node | None:
    """The layer output that hands the layer's selection on to later layers (GLM returns its top-k indices, or
    the ones it was handed), if any."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for leaf in out.args[0]:
        if not isinstance(leaf, Node):
            continue
        src = source(leaf)
        if handed is not None and src is handed.indices:
            return leaf
        if idx is not None and src.target is operator.getitem and src.args[0] is idx.indices and src.args[1] == 1:
            return leaf
    return None


def match_query_projection(att: AttentionMatch, params: set[Node], layer: str) -> QueryProjectionMatch:
    item = att.query_nope
    split = item.args[0] if item.target is operator.getitem else None
    if split is None or split.target is not aten.split_with_sizes.default:
        raise MatchError(f"layer {layer}: the non-rotary query is not a split of per-head query states")
    view = split.args[0]
    # Through transposes and per-head splits (AXK2 splits each head's query from its output gate) to the view of
    # the projection into heads.
    while view.target is aten.transpose.int or (view.target is operator.getitem
                                                and view.args[0].target is aten.split_with_sizes.default):
        view = view.args[0] if view.target is aten.transpose.int else view.args[0].args[0]
    linear = source(view)
    if view.target is not aten.view.default or linear.target not in LINEARS or source(linear.args[1]) not in params:
        raise MatchError(f"layer {layer}: the query heads do not come from one linear projection")
    return QueryProjectionMatch(linear, source(linear.args[1]), int(view.args[1][-1]))


def _shape(node: Node) -> tuple[str, ...]:
    return tuple(str(d) for d in node.meta["val"].shape)


def check_layouts(m: MLASparseAttentionMatch) -> None:
    """The rewrite reads the matched tensors in these layouts; a model that lays them out otherwise is
    reported here rather than computed wrongly."""
    heads, nope, rope = str(m.heads), str(m.kv_expansion.nope_dim), str(m.rope_dim)
    q_nope, q_rope = _shape(m.attention.query_nope), _shape(m.attention.query_rope)
    latent, rope_new = _shape(m.latent_cache.latent_new), _shape(m.latent_cache.rope_new)
    batch, steps = q_nope[0] if q_nope else "?", q_nope[2] if len(q_nope) > 2 else "?"
    expected = [
        ("non-rotary query", q_nope, (batch, heads, steps, nope)),
        ("rotary query", q_rope, (batch, heads, steps, rope)),
        ("new latent rows", latent, (batch, "1", steps, str(m.latent_dim))),
        ("new rotary key rows", rope_new, (batch, "1", steps, rope)),
    ]
    out, v = _shape(m.attention.output), str(m.kv_expansion.v_dim)
    per_head_out = (batch, steps, heads, v) if len(out) == 4 else (batch, steps, str(m.heads * m.kv_expansion.v_dim))
    expected.append(("attention output", out, per_head_out))
    if m.attention.query_scale is not None:
        factor = _shape(m.attention.query_scale.factor)
        expected.append(("query scaling factors", factor, (factor[0] if factor else "?", heads, steps, "1")))
    if m.indexer is not None:
        key, query, weights = _shape(m.indexer.key_new), _shape(m.indexer.query), _shape(m.indexer.weights)
        expected += [
            ("new indexer keys", key, (batch, steps, key[-1] if key else "?")),
            ("indexer query", query, (batch, steps, weights[-1] if weights else "?", key[-1] if key else "?")),
            ("indexer head weights", weights, (batch, steps, query[2] if len(query) > 2 else "?")),
        ]
    if m.handed is not None:
        handed = _shape(m.handed.indices)
        expected.append(("handed selected positions", handed, (batch, steps, handed[-1] if handed else "?")))
    for what, got, want in expected:
        if got != want:
            raise MatchError(
                f"layer {m.layer}: the {what} have shape [{', '.join(got)}], expected [{', '.join(want)}] "
                f"(batch, heads/1, tokens, width as HF's MLA lays them out)"
            )


def match_layer(captured: CapturedLayer, layer: str) -> MLASparseAttentionMatch:
    """Match one captured layer (raises ``MatchError`` naming the layer and the missing piece)."""
    gm, params = captured.graph_module, captured.params()
    latent = match_latent_cache(gm, layer)
    kv = match_kv_expansion(latent, params, layer)
    att = match_attention(kv, layer, params)
    idx = match_indexer(gm, layer)
    handed = match_handed_selection(gm, layer) if idx is None else None
    if idx is None and handed is None:
        check_dense_mask(att, captured.mask, layer)
    qp = match_query_projection(att, params, layer)
    if source(att.out_proj.args[1]) not in params:
        raise MatchError(f"layer {layer}: the output projection's weight is not a parameter")
    match = MLASparseAttentionMatch(layer, latent, kv, att, idx, qp, captured.mask, handed,
                                    match_selection_output(gm, idx, handed))
    check_layouts(match)
    return match
