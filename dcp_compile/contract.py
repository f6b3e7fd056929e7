"""The contract between capture, the rewrite passes, the inserted attention module and the installer.

A rewritten layer is a flat FX graph. Each placeholder says what the installer must feed it
(``node.meta[GRAPH_INPUT]``, a ``GraphInput``):

- ``PARAM`` / ``BUFFER``: the layer module's parameter or buffer by its qualified name (read live at every
  call, so head-sharded weights and ``.to()`` are seen);
- ``INPUT``: a tensor of the layer's call, by its pytree key path in ``(args, kwargs)``;
- ``STATE``: one field of the cache's ``LayerCacheState`` (pools, block table, the step's positions) by name;
- ``PAST``: the past cache rows capture fed to its marker ops (dead after the rewrite, then removed).

The cache state's names come from one place, ``LayerCacheState``: the rewrite adds one ``STATE`` placeholder per
field, the installer feeds ``getattr(state, name)``, and the attention module takes them as keyword
arguments of the same names.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.fx import Node

GRAPH_INPUT = "dcp_input"  # the placeholder meta key


class InputKind(enum.Enum):
    PARAM = "param"
    BUFFER = "buffer"
    INPUT = "input"
    STATE = "state"
    PAST = "past"


@dataclass(frozen=True)
class GraphInput:
    kind: InputKind
    what: Any  # qualified name (PARAM/BUFFER), key path tuple (INPUT), state field name (STATE), index (PAST)

    def __str__(self) -> str:
        what = ".".join(map(str, self.what)) if isinstance(self.what, tuple) else self.what
        return f"{self.kind.value} {what}"


@dataclass
class LayerCacheState:
    """What one DCP layer's step reads from the cache (``ShardedPagedCache.layer_state``).

    Every field is a tensor on the model's device and every shape is fixed for a decode step (the key width is
    the cache's static width, not the sequence length): no Python int that grows with the sequence reaches the
    layer graph, so a compiled decode step neither recompiles nor re-records a CUDA graph as the sequence grows.
    The positions are the same for every layer of a step: the cache computes them once per step."""

    latent_pool: Tensor  # [rows, d_c + d_rope]
    index_pool: Tensor | None  # [rows, d_idx]; None for a model without an indexer
    block_table: Tensor  # [B, pages] int32, -1 = no page
    query_positions: Tensor  # [S] int64 global positions of the step's tokens (past .. past + S - 1)
    key_positions: Tensor  # [L] int64 global positions of this rank's local rows 0 .. L-1 (L: the step's key width)
    key_slots: Tensor  # [B, L] int32 physical rows of those keys, -1 where the key is not yet written


STATE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LayerCacheState))


def graph_input(node: Node) -> GraphInput:
    return node.meta[GRAPH_INPUT]


def label(node: Node, kind: InputKind, what) -> None:
    node.meta[GRAPH_INPUT] = GraphInput(kind, what)


def placeholders(gm, kind: InputKind | None = None) -> list[Node]:
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return nodes if kind is None else [n for n in nodes if graph_input(n).kind is kind]
