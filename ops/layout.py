"""Token ownership over a DCP group (docs/design.md §3).

A sequence's global position ``p`` lives on rank ``(p // I) % N``, at local index
``(p // (N·I))·I + p % I`` of that rank's copy of the sequence, and the local index maps to a physical row
through the sequence's block table: ``block_table[l // P]·P + l % P``.

Every function here works on Python ints, SymInts (inside torch.compile: no guards, so a growing
sequence length does not recompile) and integer tensors alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _smin(a, b):
    if isinstance(a, torch.Tensor):
        return torch.clamp(a, max=b)
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else min(a, b)


def _smax(a, b):
    if isinstance(a, torch.Tensor):
        return torch.clamp(a, min=b)
    return torch.sym_max(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else max(a, b)


@dataclass(frozen=True)
class DCPLayout:
    """Where each token of a sequence lives: ``world`` ranks (N), ``interleave`` tokens in a row on one rank
    (I) and ``page_size`` physical rows per page on each rank (P, never scaled by N)."""

    world: int
    interleave: int = 1
    page_size: int = 64

    def __post_init__(self):
        for name in ("world", "interleave", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DCPLayout.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def stride(self) -> int:
        """Positions in one round of ownership: N·I."""
        return self.world * self.interleave

    def owner(self, pos):
        return (pos // self.interleave) % self.world

    def local_index(self, pos):
        return (pos // self.stride) * self.interleave + pos % self.interleave

    def global_position(self, local, rank: int):
        """Inverse of ``local_index`` on ``rank``."""
        return (local // self.interleave) * self.stride + rank * self.interleave + local % self.interleave

    def local_count(self, length, rank: int):
        """How many of positions ``0 .. length-1`` rank ``rank`` owns."""
        full, rest = length // self.stride, length % self.stride
        return full * self.interleave + _smin(_smax(rest - rank * self.interleave, 0), self.interleave)

    def local_bound(self, length):
        """An upper bound of ``local_count`` that is the same on every rank (rank 0 owns the most)."""
        return (length + self.stride - 1) // self.stride * self.interleave

    def pages(self, length, rank: int) -> int:
        """Pages rank ``rank`` needs for a sequence of ``length`` tokens."""
        return -(-self.local_count(length, rank) // self.page_size)

    def slot(self, block_table: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Physical row of local indices ``local`` ([..., n]) given block tables ([..., pages])."""
        page = torch.gather(block_table.long(), -1, (local // self.page_size).long())
        return page * self.page_size + local % self.page_size
