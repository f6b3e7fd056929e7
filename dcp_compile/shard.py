"""Head sharding: each rank of the tensor-parallel group keeps its contiguous block of attention heads.

The plan is a small table read off the match (gpt-fast's colwise / rowwise linears): the query projection
and the per-head latent expansion (``kv_b_proj``) are *colwise* (their output rows are per head: keep this
rank's rows, and the bias's), the output projection is *rowwise* (its input columns are per head: keep this
rank's columns; its partial products are all-reduced by the rewrite). Everything else stays replicated. An FP8
linear (a block-FP8 checkpoint) keeps the block scales of its kept rows / columns (``fp8.shard_fp8_scales``).

A model loaded with Hugging Face tensor parallelism (``from_pretrained(distributed_config=...)``) may hold these
linears as DTensor shards already: HF's DeepSeek plan shards them exactly so (``colwise`` = ``Shard(0)``,
``rowwise`` = ``Shard(1)``, rank ``t`` holding block ``t``), and an FP8 linear's block scales
(``weight_scale_inv``) alike. ``check_head_shards`` verifies that a layer's DTensors are that and nothing else,
and ``shard_heads`` then adopts HF's local shards instead of slicing (whether an FP8 linear's local scales are
the blocks of its local weight: ``fp8.check_fp8_shards``, before the probe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .contract import graph_input
from .fp8 import block_scales_name, shard_fp8_scales
from .hf_parallel import is_dtensor
from .match import MatchError, MLASparseAttentionMatch, source
from .support import UnsupportedModelError


@dataclass(frozen=True)
class ShardedLinear:
    weight: str  # qualified parameter name in the layer module
    bias: str | None
    style: Literal["colwise", "rowwise"]
    per_head: int  # rows (colwise) or columns (rowwise) per head

    @property
    def dim(self) -> int:
        """The weight dim split by head."""
        return 0 if self.style == "colwise" else 1


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


def _replicated(param) -> bool:
    return all(p.is_replicate() for p in param.placements)


def _shard_dims(param) -> list[int | None]:
    """Per mesh dim: the tensor dim it shards (None when that mesh dim does not shard it)."""
    return [p.dim % param.ndim if p.is_shard() else None for p in param.placements]


def check_head_shards(module: nn.Module, match: MLASparseAttentionMatch, mesh) -> None:
    """Before any collective: the layer's DTensor parameters (HF tensor parallelism) are either replicated, or
    exactly the head-sharded linears of the plan, each split evenly by head over ``mesh`` (block ``t`` on mesh
    rank ``t``), all of them or none. Raises ``UnsupportedModelError`` naming the parameter otherwise."""
    dtensors = {n: p for n, p in module.named_parameters() if is_dtensor(p)}
    if not dtensors:
        return
    layer = match.layer
    expected, scales = {}, set()
    for linear in head_shard_plan(match):
        expected[linear.weight] = linear
        if linear.bias is not None:
            expected[linear.bias] = linear
        scale = block_scales_name(module, linear.weight)  # an FP8 linear's block scales: split with its weight
        if scale is not None:
            expected[scale] = linear
            scales.add(scale)
    sharded = {n: p for n, p in dtensors.items() if not _replicated(p)}
    ranks = mesh.mesh.flatten().tolist()
    for name, param in sharded.items():
        placement = ", ".join(map(repr, param.placements))
        linear = expected.get(name)
        if linear is None:
            raise UnsupportedModelError(
                f"layer {layer}: Hugging Face tensor parallelism shards {name} ({placement}); dcp_compile adopts HF's "
                f"sharding of the attention heads only ({', '.join(sorted(expected))}): load the model with this "
                f"module replicated (DistributedConfig(tp_plan={{...: 'replicate'}}))"
            )
        dim = linear.dim if name == linear.weight or name in scales else 0
        if param.device_mesh.mesh.flatten().tolist() != ranks or _shard_dims(param) != [dim]:
            raise UnsupportedModelError(
                f"layer {layer}: {name} is a DTensor ({placement}) over the ranks {param.device_mesh.mesh.flatten().tolist()}; "
                f"dcp_compile adopts it only as Shard(dim={dim}) over the mesh apply runs on (ranks {ranks}): give apply "
                f"the tensor-parallel mesh the model was loaded over (apply(model) takes it from the model)"
            )
        if name in scales:
            continue  # blocks, not heads: fp8.check_fp8_shards checked them against the weight
        total, local = param.shape[dim], param.to_local().shape[dim]
        if total % (len(ranks) * linear.per_head) or local * len(ranks) != total:
            raise UnsupportedModelError(
                f"layer {layer}: {name} is split into uneven head blocks by Hugging Face tensor parallelism ({total} "
                f"{'rows' if dim == 0 else 'columns'} of {linear.per_head} per head over {len(ranks)} ranks, "
                f"{local} here)"
            )
    plan = [linear.weight for linear in head_shard_plan(match)]
    adopted = [w for w in plan if w in sharded]
    if adopted and len(adopted) != len(plan):
        missing = [w for w in plan if w not in sharded]
        raise UnsupportedModelError(
            f"layer {layer}: Hugging Face tensor parallelism shards {', '.join(adopted)} by head but not "
            f"{', '.join(missing)}: the heads of all {len(plan)} head-sharded weights ({', '.join(plan)}) must be "
            f"sharded alike (HF's plan 'auto' does), or none"
        )


def _set_param(module: nn.Module, fqn: str, value, copy: bool = True) -> None:
    owner_name, _, attr = fqn.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    value = value.detach().contiguous()
    setattr(owner, attr, nn.Parameter(value.clone() if copy else value, requires_grad=False))


def shard_heads(module: nn.Module, match: MLASparseAttentionMatch, tp_rank: int, tp_size: int) -> None:
    """Keep heads ``[tp_rank·H/tp, (tp_rank+1)·H/tp)`` of every linear in the plan (in place). A linear that HF
    tensor parallelism sharded already (a DTensor ``check_head_shards`` accepted) keeps its local shard, which is
    that block; the layer's other DTensors are replicated and become their local (whole) tensors."""
    heads = match.heads
    lo, hi = tp_rank * heads // tp_size, (tp_rank + 1) * heads // tp_size
    for linear in head_shard_plan(match) if tp_size > 1 else ():
        weight = module.get_parameter(linear.weight)
        dim = linear.dim
        if weight.shape[dim] != heads * linear.per_head:
            raise MatchError(
                f"layer {match.layer}: {linear.weight} has {weight.shape[dim]} {'rows' if dim == 0 else 'columns'}, "
                f"not {heads} heads x {linear.per_head}"
            )
        block = slice(lo * linear.per_head, hi * linear.per_head)
        for name, sliced in ((linear.weight, dim), (linear.bias, 0)):
            if name is None:
                continue
            param = module.get_parameter(name)
            if is_dtensor(param) and not _replicated(param):
                _set_param(module, name, param.to_local(), copy=False)  # HF's shard of this rank: the same block
            else:
                whole = param.to_local() if is_dtensor(param) else param
                _set_param(module, name, whole[block] if sliced == 0 else whole[:, block])
        # An FP8 linear keeps the block scales of the rows / columns it kept (fp8.py; blocks checked before apply's
        # collectives by fp8.check_fp8_layer).
        shard_fp8_scales(module, linear.weight, dim, block.start, block.stop)
    for name, param in list(module.named_parameters()):
        if is_dtensor(param):  # replicated (check_head_shards): this rank holds all of it
            _set_param(module, name, param.to_local(), copy=False)
