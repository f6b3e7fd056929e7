"""The sharded paged MLA cache: each rank holds only the tokens it owns (docs/design.md §3).

Per layer and per rank, two page pools: latent rows ``c ‖ k_rope`` and indexer keys ``k_idx`` (the latter only
for a layer with an indexer of its own). Pages are ``page_size`` rows; one allocator hands them out for all
layers at once (every layer of a sequence owns the same positions, so one block table per sequence serves
every layer). Pages for a request are reserved
up front, so the decode step never allocates.

**Steps.** Each forward is one *step* of S new tokens per sequence, bracketed on the host by ``begin_step`` /
``end_step`` (the model's forward hooks, outside any compiled ``forward``). ``begin_step`` checks the capacity,
writes the past length into a device scalar and fixes the step's two widths:

- the *key width* L: how many of this rank's local rows the step looks at, and
- the *mask width*: the columns of HF's attention mask.

A short step (decode, speculative verification: S <= ``STATIC_STEP_TOKENS``) uses the cache's *static* widths, a
bucket of the reserved capacity (``static_positions``); a longer one (prefill) uses the exact widths. So inside a compiled
decode step nothing grows with the sequence: fixed shapes, the length lives on the device, every pool, the block
table and the device length stay at fixed addresses. One graph per (batch size, capacity bucket) serves every
decode step of a request, and CUDA graphs can replay it (``torch.compile(model.forward, mode="reduce-overhead")``).
Rows past the sequence inside the static width have key slot -1 and are never selected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from .contract import LayerCacheState
from .layout import DCPLayout
from .ops.distributed import MAX_POSITIONS

# Steps of at most this many tokens per sequence run at the static widths: decode (1) and speculative
# verification (a few draft tokens). Longer steps are prefill chunks: exact widths, not worth a CUDA graph.
STATIC_STEP_TOKENS = 16
MIN_STATIC_POSITIONS = 256  # the smallest capacity bucket


def static_positions(capacity: int, stride: int) -> int:
    """The capacity bucket of a static step: the next m·2^e >= capacity with m in 4..8 (quarter-octave steps:
    at most 25 % above the capacity; at least ``MIN_STATIC_POSITIONS``), rounded up to a whole round of
    ownership (N·I) so that it ends on a round. Requests whose capacities share a bucket share a compiled
    decode graph (and per-request pools sized by it have the same shape)."""
    capacity = max(MIN_STATIC_POSITIONS, capacity)
    step = 1 << max(0, (capacity - 1).bit_length() - 3)
    bucket = -(-capacity // step) * step
    return -(-bucket // stride) * stride


@dataclass
class StepPositions:
    """The positions one step touches on this rank, the same for every layer of the step (§3, §4.1)."""

    new: Tensor  # [S] global positions of the step's query tokens
    keys: Tensor  # [L] global positions of this rank's local rows 0 .. L-1
    key_slots: Tensor  # [B, L] physical rows of those keys, -1 past the sequence

    @staticmethod
    def of(layout: DCPLayout, rank: int, block_table: Tensor, past: Tensor | int, steps: int, batch: int,
           width: int | None = None) -> "StepPositions":
        """``past``: positions already cached (a device scalar in a step; an int in tests); ``width``: L, by
        default the exact one, ``local_bound(past + steps)`` (needs an int ``past``)."""
        dev = block_table.device
        width = layout.local_bound(past + steps) if width is None else width
        local = torch.arange(width, device=dev)
        keys = layout.global_position(local, rank)
        # A static width can reach past the block table's pages; those keys are past the sequence anyway.
        in_table = local.clamp(max=block_table.shape[1] * layout.page_size - 1)
        key_slots = layout.slot(block_table, in_table.expand(batch, -1))
        key_slots = torch.where(keys < past + steps, key_slots, -1).to(torch.int32)
        return StepPositions(torch.arange(steps, device=dev) + past, keys, key_slots)


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
        self.seq_length = 0  # host: positions cached per sequence (read outside the step only)
        self.past = torch.zeros((), dtype=torch.int64, device=self.device)  # its device copy, set by begin_step
        self.capacity = 0  # positions per sequence with pages reserved
        self.made_for_one_call = False  # made by a forward that was given no cache (see hf_integration)
        self.step_tokens: int | None = None  # S of the step in progress (None between steps)
        self.step_owner: str | None = None  # who opened it: "model" (forward hooks) or "layers" (eager fallback)
        self.key_width = 0  # L of the step in progress
        self.mask_width = 0  # HF attention-mask columns of the step in progress
        self._positions: StepPositions | None = None  # computed by the step's first DCP layer, shared by the rest
        self._table_rows: torch.Tensor | None = None  # the block tables' rows (see _set_batch)
        self._set_batch(batch_size)
        for t in (self.past, *self.latent.values(), *self.index_keys.values()):
            _static_address(t)

    # -- allocation (host side, outside the decode step) -------------------------------------------------------
    def _set_batch(self, batch_size: int) -> None:
        self.num_sequences = batch_size
        self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        # The block table is the first rows of one table kept for the largest batch seen, so every batch size up
        # to it gets the same address: a CUDA graph recorded for a batch size replays after requests of other
        # sizes (a fixed pool serving alternating batch sizes would otherwise re-record at every change), at the
        # memory of one table. A larger batch makes a new table (``warm_up`` runs the largest batch first).
        pages = max(1, self.allocator.num_pages)
        if self._table_rows is None or self._table_rows.shape[0] < batch_size:
            self._table_rows = torch.full((batch_size, pages), -1, dtype=torch.int32, device=self.device)
        self.block_table = self._table_rows[:batch_size]
        self.block_table.fill_(-1)
        _static_address(self.block_table)

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
        if num_tokens > MAX_POSITIONS:
            raise ValueError(
                f"a sequence of {num_tokens} positions is longer than the {MAX_POSITIONS} the DCP cache takes: "
                f"positions cross the top-k exchange in the low word of an int64 order key (below 2**31 - 1)"
            )
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
        self.step_tokens = self.step_owner = self._positions = None

    # -- steps (docs/design.md §4; the module docstring) ----------------------------------------------------------
    def begin_step(self, num_new: int, owner: str = "model") -> None:
        """Host side, before a forward of ``num_new`` tokens per sequence: check the capacity (raises
        CachePoolExhausted before anything runs), write the past length to the device scalar (an async fill, no
        sync) and fix the step's key and mask widths."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "the DCP cache's step bookkeeping ran inside torch.compile: compile the model's forward "
                "(model.forward = torch.compile(model.forward, ...)), not the module or a function around generate, "
                "so that its forward hooks run outside the compiled graph"
            )
        past = self.seq_length
        if past + num_new > self.capacity:
            raise CachePoolExhausted(
                f"step writes positions {past}..{past + num_new - 1} but only {self.capacity} positions per "
                f"sequence are reserved; call reserve() or generate() so the cache is sized for the request"
            )
        self.step_tokens, self.step_owner, self._positions = num_new, owner, None
        self.mask_width = self.mask_width_for(num_new)
        self.key_width = self.layout.local_bound(self.mask_width)
        self.past.fill_(past)

    def end_step(self) -> None:
        """Host side, after the forward: the sequences are ``step_tokens`` longer."""
        if self.step_tokens is not None:
            self.seq_length += self.step_tokens
        self.step_tokens = self.step_owner = self._positions = None

    def mask_width_for(self, num_new: int) -> int:
        """Columns of HF's attention mask for a step of ``num_new`` tokens: the static bucket for short steps,
        the exact length (past + new) for prefill."""
        if num_new <= STATIC_STEP_TOKENS:
            return max(static_positions(self.capacity, self.layout.stride), self.seq_length + num_new)
        return self.seq_length + num_new

    def layer_state(self, layer_idx: int) -> LayerCacheState:
        """What one DCP layer of the step in progress reads (``contract.LayerCacheState``)."""
        if self.step_tokens is None:
            raise RuntimeError("layer_state outside a step: call begin_step(num_new) first")
        if self._positions is None:  # the step's first DCP layer: once per step, not once per layer
            self._positions = StepPositions.of(self.layout, self.rank, self.block_table, self.past, self.step_tokens,
                                               self.num_sequences, self.key_width)
        at = self._positions
        return LayerCacheState(self.latent[layer_idx], self.index_keys.get(layer_idx), self.block_table,
                               at.new, at.keys, at.key_slots)

    @property
    def last_layer(self) -> int:
        return self._last_layer

    # -- what transformers asks of a Cache ----------------------------------------------------------------------
    # Inside a compiled forward HF reads the length as the device scalar (as from its StaticCache), so the graph
    # never sees the growing host int; outside, the host int.
    def get_seq_length(self, layer_idx: int = 0) -> int | Tensor:
        return self.past if torch.compiler.is_compiling() else self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return (self.mask_width if self.step_tokens is not None else self.mask_width_for(query_length)), 0

    def get_query_offset(self, layer_idx: int = 0) -> int | Tensor:
        return self.get_seq_length(layer_idx)

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


def _static_address(t: Tensor) -> None:
    """Tell torch.compile that ``t`` keeps its address (as HF's StaticCache does): a CUDA-graph replay then reads
    and writes it in place instead of copying it in, and a step that writes a pool is still captured."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
