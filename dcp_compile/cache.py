"""The sharded paged MLA cache: each rank holds only the tokens it owns (docs/design.md §3).

Per layer and per rank, two page pools: latent rows ``c ‖ k_rope`` and indexer keys ``k_idx`` (the latter only
for a layer with an indexer of its own). Pages are ``page_size`` rows; one allocator hands them out for all
layers at once (every layer of a sequence owns the same positions, so one block table per sequence serves
every layer). Pages for a request are reserved
up front, so the decode step never allocates: it only reads ``block_table`` and the Python int
``seq_length`` — no host sync, no data-dependent shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .contract import LayerCacheState
from .layout import DCPLayout


class CachePoolExhausted(RuntimeError):
    """The fixed page pool cannot hold the request. Nothing was allocated; the cache is as before."""


@dataclass(frozen=True)
class CacheFormat:
    """The rows the rewritten layers cache: their cache indices, row widths and dtypes."""

    layer_ids: tuple[int, ...]
    latent_dim: int  # d_c + d_rope
    index_dim: int | None  # d_idx; None: no indexer, no index pool
    dtype: torch.dtype
    index_dtype: torch.dtype | None
    index_layer_ids: tuple[int, ...] | None = None  # layers with an index pool; None: all (if index_dim is set)
    layer_latent_dims: tuple[int, ...] | None = None  # per layer (layer_ids order) where they differ; else latent_dim

    def latent_dim_of(self, layer_id: int) -> int:
        if self.layer_latent_dims is None:
            return self.latent_dim
        return self.layer_latent_dims[self.layer_ids.index(layer_id)]

    @staticmethod
    def of(layers) -> "CacheFormat":
        """Read off the probed layers (``capture.LayerCall``: the rows each gave to the cache). Only layers with
        an indexer of their own get an index pool (dense MLA layers and layers handed a selection have none)."""
        first = layers[0]
        indexed = [layer for layer in layers if layer.index_rows is not None]
        dims = tuple(layer.key_rows.shape[-1] + layer.value_rows.shape[-1] for layer in layers)
        return CacheFormat(
            layer_ids=tuple(layer.layer_idx for layer in layers), latent_dim=dims[0], dtype=first.key_rows.dtype,
            index_dim=indexed[0].index_rows.shape[-1] if indexed else None,
            index_dtype=indexed[0].index_rows.dtype if indexed else None,
            index_layer_ids=tuple(layer.layer_idx for layer in indexed),
            layer_latent_dims=dims if len(set(dims)) > 1 else None,  # e.g. Dots3Note's sliding-window layers
        )


class PageAllocator:
    """Free list of page ids. Allocation is all-or-nothing."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise CachePoolExhausted(f"{count} pages needed, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class ShardedPagedCache(Cache):
    """A transformers ``Cache`` whose DCP layers keep 1/N of the latent and indexer caches on each rank.

    ``seq_length`` counts positions per sequence (left padding included, as HF's caches do); all sequences
    of a batch advance together. ``reserve(num_tokens)`` gives every sequence the pages for its owned
    positions among ``0 .. num_tokens-1``.
    """

    def __init__(
        self,
        fmt: CacheFormat,
        layout: DCPLayout,
        rank: int,
        num_pages: int,
        device: torch.device | str = "cpu",
        batch_size: int = 1,
    ):
        super().__init__(layers=[])
        if not 0 <= rank < layout.world:
            raise ValueError(f"rank {rank} is outside the DCP group of size {layout.world}")
        self.format, self.layout, self.rank = fmt, layout, rank
        self.device = torch.device(device)
        self.allocator = PageAllocator(num_pages)
        rows = num_pages * layout.page_size
        self.latent = {i: torch.zeros(rows, fmt.latent_dim_of(i), dtype=fmt.dtype, device=self.device)
                       for i in fmt.layer_ids}
        self.index_keys = {}  # only for layers with an indexer (none for dense MLA)
        if fmt.index_dim is not None:
            indexed = fmt.layer_ids if fmt.index_layer_ids is None else fmt.index_layer_ids
            self.index_keys = {i: torch.zeros(rows, fmt.index_dim, dtype=fmt.index_dtype, device=self.device)
                               for i in indexed}
        self._last_layer = max(fmt.layer_ids)
        self.seq_length = 0
        self.capacity = 0  # positions per sequence with pages reserved
        self.made_for_one_call = False  # made by a forward that was given no cache (see hf_integration)
        self._set_batch(batch_size)

    # -- allocation (host side, outside the decode step) -------------------------------------------------------
    def _set_batch(self, batch_size: int) -> None:
        self.num_sequences = batch_size
        self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        self.block_table = torch.full(
            (batch_size, max(1, self.allocator.num_pages)), -1, dtype=torch.int32, device=self.device
        )

    def start_request(self, batch_size: int, num_tokens: int) -> None:
        """Free everything, then reserve ``num_tokens`` positions for each of ``batch_size`` sequences.
        On failure the cache is left empty and usable."""
        self.reset()
        self.made_for_one_call = False
        self._set_batch(batch_size)
        self.reserve(num_tokens)

    def reserve(self, num_tokens: int) -> None:
        """Make room for positions ``0 .. num_tokens-1`` in every sequence (all-or-nothing)."""
        if num_tokens <= self.capacity:
            return
        # Every rank has a pool of the same size and runs the same check for the rank that needs the most
        # (rank 0), so either all ranks raise here, before any collective, or none does.
        P, worst = self.layout.page_size, 0
        worst_need = self.num_sequences * self.layout.pages(num_tokens, worst)
        if worst_need > self.allocator.num_pages:
            raise CachePoolExhausted(
                f"the DCP cache pool cannot hold {self.num_sequences} sequence(s) of {num_tokens} tokens: DCP rank "
                f"{worst} needs {worst_need} pages ({worst_need * P} token rows) but its pool has "
                f"{self.allocator.num_pages} pages ({self.allocator.num_pages * P} token rows, page size {P}). "
                f"Lower the batch, the prompt or max_new_tokens, or raise cache_budget_tokens."
            )
        need = [self.layout.pages(num_tokens, self.rank) - len(p) for p in self._pages]
        for seq, count in enumerate(need):
            new = self.allocator.allocate(count)
            start = len(self._pages[seq])
            self._pages[seq].extend(new)
            if new:
                self.block_table[seq, start : start + len(new)] = torch.tensor(new, dtype=torch.int32)
        self.capacity = num_tokens

    def free_sequence(self, seq: int) -> None:
        """Give sequence ``seq``'s pages back; the cache must be ``reserve``d again before the next step."""
        self.allocator.release(self._pages[seq])
        self._pages[seq] = []
        self.block_table[seq].fill_(-1)
        self.capacity = 0

    def reset(self) -> None:
        for seq in range(self.num_sequences):
            self.free_sequence(seq)
        self.seq_length = 0
        self.capacity = 0

    # -- the decode step ------------------------------------------------------------------------------------------
    def layer_state(self, layer_idx: int, num_new: int) -> LayerCacheState:
        """What one DCP layer's step reads (``contract.LayerCacheState``)."""
        past = self.seq_length
        if past + num_new > self.capacity:
            raise CachePoolExhausted(
                f"step writes positions {past}..{past + num_new - 1} but only {self.capacity} positions per "
                f"sequence are reserved; call reserve() or generate() so the cache is sized for the request"
            )
        return LayerCacheState(self.latent[layer_idx], self.index_keys.get(layer_idx), self.block_table, past)

    def advance(self, layer_idx: int, num_new: int) -> None:
        """Called by each DCP layer after its step; the last layer moves the sequence length on."""
        if layer_idx == self._last_layer:
            self.seq_length = self.seq_length + num_new

    # -- what transformers asks of a Cache ----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False  # keeps HF generate from wrapping forward in its own torch.compile

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (HF's rollback after rejected draft tokens). The rows
        stay in their pages and are overwritten by the next step; nothing reads past ``seq_length``."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.seq_length = max(0, self.seq_length + tokens_to_remove)

    # HF asks these of every cache (multi-turn prefix trimming, assisted decoding, mask creation). They are
    # per layer in HF; here every layer is the same kind: full attention, not linear/sliding, croppable.
    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.format.layer_ids)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.format.layer_ids)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.format.layer_ids)

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.num_sequences

    def _unsupported(self, what: str):
        raise NotImplementedError(f"ShardedPagedCache does not support {what} (beam search)")

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache")

    def batch_repeat_interleave(self, repeats: int):
        if repeats != 1:
            self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    # -- accounting -------------------------------------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes of this rank's cache pools (latent + indexer, all layers)."""
        return sum(t.numel() * t.element_size() for t in (*self.latent.values(), *self.index_keys.values()))

    def used_pages(self) -> int:
        return self.allocator.num_pages - self.allocator.free_pages

    def __repr__(self) -> str:
        return (
            f"ShardedPagedCache(rank={self.rank}, {self.layout}, layers={len(self.format.layer_ids)}, "
            f"pages={self.used_pages()}/{self.allocator.num_pages}, seq_length={self.seq_length})"
        )
