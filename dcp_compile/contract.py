"""The contract between capture, the rewrite passes, the inserted attention module and the installer.

A rewritten layer is a flat FX graph. Each placeholder says what the installer must feed it
(``node.meta[GRAPH_INPUT]``, a ``GraphInput``):

- ``PARAM`` / ``BUFFER``: the layer module's parameter or buffer by its qualified name (read live at every
  call, so head-sharded weights and ``.to()`` are seen);
- ``INPUT``: a tensor of the layer's call, by its pytree key path in ``(args, kwargs)``;
- ``STATE``: one field of the cache's ``LayerCacheState`` (pools, block table, past length) by name;
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
    """What one DCP layer's step reads from the cache (``ShardedPagedCache.layer_state``)."""

    latent_pool: Tensor  # [rows, d_c + d_rope]
    index_pool: Tensor | None  # [rows, d_idx]; None for a model without an indexer
    block_table: Tensor  # [B, pages] int32, -1 = no page
    past_length: int  # positions already cached per sequence (a Python int / SymInt: no host sync)


STATE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LayerCacheState))


def graph_input(node: Node) -> GraphInput:
    return node.meta[GRAPH_INPUT]


def label(node: Node, kind: InputKind, what) -> None:
    node.meta[GRAPH_INPUT] = GraphInput(kind, what)


def placeholders(gm, kind: InputKind | None = None) -> list[Node]:
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return nodes if kind is None else [n for n in nodes if graph_input(n).kind is kind]
