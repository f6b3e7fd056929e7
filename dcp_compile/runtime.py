"""What ``apply`` leaves on the model as ``model.dcp``: the layout, the ranks, the cache factory, and what the
ranks check against each other at the start of each request."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .agreement import FailureRecords, RankGroup
from .cache import CacheFormat, ShardedPagedCache, static_positions
from .layout import DCPLayout


@dataclass
class DCPRuntime:
    """What ``apply`` leaves on the model (as ``model.dcp``): the layout, the ranks, the cache factory, and
    what the ranks check against each other (``verify_ranks=False`` skips that check; see README, 'Rules')."""

    layout: DCPLayout
    dcp_rank: int
    tp_rank: int
    tp_size: int
    cache_format: CacheFormat
    device: torch.device
    ranks: RankGroup
    fingerprint: tuple[int, int]
    captured_param: tuple[nn.Parameter, str, torch.dtype, torch.device]  # a parameter of a rewritten layer
    cache_budget_tokens: int | None = None
    verify_ranks: bool = True
    apply_stats: dict = field(default_factory=dict)  # what apply did: layers, distinct layers, traces, seconds
    bucket_pools: bool = False  # size per-request pools by capacity bucket (compile_decode sets it)
    index_topk: int | None = None  # the largest indexer top-k of the rewritten layers (None: dense MLA only)
    _fixed: ShardedPagedCache | None = None

    def __post_init__(self):
        group = self.ranks.group
        self.failures = FailureRecords(self.ranks, group.group_name if group is not None else "single")

    @property
    def dcp_size(self) -> int:
        return self.layout.world

    def check_parameters(self) -> None:
        """The rewritten layers and the cache are specialised to the dtype and device seen in ``apply``."""
        module, name, dtype, device = self.captured_param
        now = module.get_parameter(name)
        if now.dtype != dtype or now.device != device:
            raise RuntimeError(
                f"the model's parameters are now {now.dtype} on {now.device}, but dcp_compile.apply captured them as "
                f"{dtype} on {device}: the rewritten layers and the cache are specialised to those. Move or cast the "
                f"model (.to(...)) before apply"
            )

    def new_cache(self, batch_size: int, num_tokens: int) -> ShardedPagedCache:
        """A cache with room for ``num_tokens`` positions in each of ``batch_size`` sequences: sized to the
        request, or the one fixed pool of ``cache_budget_tokens`` rows (raises CachePoolExhausted)."""
        if self.cache_budget_tokens is not None:
            if self._fixed is None:
                pages = -(-self.cache_budget_tokens // self.layout.page_size)
                self._fixed = ShardedPagedCache(self.cache_format, self.layout, self.dcp_rank, pages, self.device)
            self._fixed.start_request(batch_size, num_tokens)
            return self._fixed
        # Pools are the same size on every rank (rank 0 owns the most tokens): at most one page more per
        # sequence than this rank's own share. With compiled decode steps (``bucket_pools``) they are sized for
        # the capacity bucket (at most 25 % more), so requests of one bucket have pools of one shape and reuse the
        # compiled step instead of recompiling it.
        tokens = static_positions(num_tokens, self.layout.stride) if self.bucket_pools else num_tokens
        pages = batch_size * self.layout.pages(tokens, 0)
        cache = ShardedPagedCache(self.cache_format, self.layout, self.dcp_rank, pages, self.device, batch_size)
        cache.reserve(num_tokens)
        return cache
