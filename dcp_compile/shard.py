"""Head sharding: each rank of the tensor-parallel group keeps its contiguous block of attention heads.

The plan is a small table read off the match (gpt-fast's colwise / rowwise linears): the query projection
and the per-head latent expansion (``kv_b_proj``) are *colwise* (their output rows are per head: keep this
rank's rows, and the bias's), the output projection is *rowwise* (its input columns are per head: keep this
rank's columns; its partial products are all-reduced by the rewrite). Everything else stays replicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .contract import graph_input
from .match import MatchError, MLASparseAttentionMatch, source


@dataclass(frozen=True)
class ShardedLinear:
    weight: str  # qualified parameter name in the layer module
    bias: str | None
    style: Literal["colwise", "rowwise"]
    per_head: int  # rows (colwise) or columns (rowwise) per head


def head_shard_plan(match: MLASparseAttentionMatch) -> list[ShardedLinear]:
    def name(node):
        return graph_input(source(node)).what if node is not None else None

    q, kv, out = match.query_projection, match.kv_expansion, match.attention.out_proj
    q_bias = q.linear.args[2] if len(q.linear.args) > 2 else None
    plan = [
        ShardedLinear(name(q.weight), name(q_bias), "colwise", q.head_dim),
        ShardedLinear(name(kv.weight), None, "colwise", kv.nope_dim + kv.v_dim),
        ShardedLinear(name(out.args[1]), None, "rowwise", kv.v_dim),
    ]
    gate = match.attention.gate
    if gate is not None and gate.projection is not q.linear:  # a gate projection of its own (not fused with q)
        rows, bias = gate.weight.meta["val"].shape[0], gate.projection.args[2] if len(gate.projection.args) > 2 else None
        plan.append(ShardedLinear(name(gate.weight), name(bias), "colwise", rows // match.heads))
    # One value per head (sink logits; the query scaling's parameters): vectors, kept by head like colwise rows.
    per_head = [match.attention.sinks] if match.attention.sinks is not None else []
    per_head += match.attention.query_scale.params if match.attention.query_scale is not None else []
    plan += [ShardedLinear(name(p), None, "colwise", 1) for p in per_head]
    return plan


def _set_param(module: nn.Module, fqn: str, value) -> None:
    owner_name, _, attr = fqn.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, nn.Parameter(value.contiguous().clone(), requires_grad=False))


def shard_heads(module: nn.Module, match: MLASparseAttentionMatch, tp_rank: int, tp_size: int) -> None:
    """Keep heads ``[tp_rank·H/tp, (tp_rank+1)·H/tp)`` of every linear in the plan (in place)."""
    if tp_size == 1:
        return
    heads = match.heads
    lo, hi = tp_rank * heads // tp_size, (tp_rank + 1) * heads // tp_size
    for linear in head_shard_plan(match):
        weight = module.get_parameter(linear.weight)
        dim = 0 if linear.style == "colwise" else 1
        if weight.shape[dim] != heads * linear.per_head:
            raise MatchError(
                f"layer {match.layer}: {linear.weight} has {weight.shape[dim]} {'rows' if dim == 0 else 'columns'}, "
                f"not {heads} heads x {linear.per_head}"
            )
        block = slice(lo * linear.per_head, hi * linear.per_head)
        _set_param(module, linear.weight, weight[block] if dim == 0 else weight[:, block])
        if linear.bias is not None:
            _set_param(module, linear.bias, module.get_parameter(linear.bias)[block])
