"""What a rewritten layer runs: DCP MLA attention over the sharded paged cache (docs/design.md §4).

``DCPSparseMLA`` is the module the rewrite inserts into a captured layer graph (``call_module``, keyword
arguments named as in ``forward``). It receives tensors the HF layer already computed (per-head query parts,
the step's new latent / rotary / index-key rows, the indexer's query and head weights, the attention mask),
the expansion weight ``kv_b_proj`` and the cache state (``contract.LayerCacheState``), and returns the
attention output in HF's layout, ready for the (head-sharded) output projection.

Its steps are methods, each a piece of §4 that tests call on its own:
``write_new_rows`` (§4.1) → ``absorb_queries`` (§2; their all-gather issued here, so it travels during the
selection) → ``selection.select`` (§4.2-4.3: which owned rows each query attends) → ``attend`` (§4.4-4.6:
the gathered heads, attention over owned rows, LSE merge) → ``values_out`` (§4.7). A prefill chunk may instead
attend by latent gather (``attend_gathered``, §4.4: this rank's heads over every selected row, no merge).

The selection is one of ``SELECTIONS``, named by the match (``AttentionConfig.selection``): ``IndexerTopK``
(DeepSeek Sparse Attention), ``OwnedRows`` (dense MLA: every owned row the mask allows) or ``HandedSelection``
(the rows another layer selected, GLM's shared indexer layers). Each returns this rank's rows compacted to
the front with counts; everything after it is the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cache import StepPositions
from .contract import LayerCacheState
from .layout import DCPLayout
from .ops import all_gather_heads, distributed_topk, lse_merge
from .ops.distributed import (
    KEY_GATHER, KV_GATHER, all_gather_heads_start, all_gather_heads_wait, all_reduce_sum, attention_scheme, compact,
    gathered_rows, key_gather_positions, owned_slots, query_share, selection_scheme,
)


@dataclass(frozen=True)
class AttentionConfig:
    """Everything static about one rewritten layer on one rank."""

    heads: int  # query heads on this rank (after head sharding)
    nope_dim: int  # per-head non-rotary query/key width
    rope_dim: int  # rotary width (shared key part)
    latent_dim: int  # d_c: the cached latent width = absorbed query width = value width in latent space
    v_dim: int  # per-head value width after W_UV
    topk: int | None  # index_topk K (None without an indexer)
    attn_scale: float
    index_scale: float | None  # None without an indexer
    layout: DCPLayout
    rank: int  # rank inside the DCP group
    group_name: str | None  # the DCP process group (None when the group is a single rank)
    selection: str = "indexer_topk"  # a key of SELECTIONS
    exports_selection: bool = False  # also return the selection, packed, for later layers (pack_selection)


def allowed_keys(mask: Tensor | None, key_pos: Tensor, query_pos: Tensor, batch: int) -> Tensor:
    """[B, S, L] bool: may query s of sequence b see the local key at global position key_pos[l]?

    Reads HF's 4-D attention mask ([B, 1, S, T]: bool, or additive float with a very negative value for
    "masked"), at the columns of this rank's keys; positions past the sequence are never allowed."""
    causal = key_pos[None, None, :] <= query_pos[None, :, None]
    if mask is None:
        return causal.expand(batch, -1, -1)
    plane = mask[:, 0]
    ok = plane if plane.dtype == torch.bool else plane > torch.finfo(plane.dtype).min / 2
    columns = key_pos.clamp(max=plane.shape[-1] - 1)
    return ok.index_select(-1, columns) & causal


class IndexerTopK:
    """Selection by the DeepSeek Sparse Attention indexer: score this rank's own keys, then the exact
    distributed top-k (§4.2) compacted to this rank's rows with counts (§4.3): [B·S, K] slots."""

    def __init__(self, config: AttentionConfig):
        self.config = config

    def scheme(self, steps, state: LayerCacheState, at: StepPositions) -> str:
        """The step's selection scheme (§4.2): ship N·K candidates per query (decode), or gather the keys and
        ship K positions per query (prefill chunks). Chosen on static sizes only: no guard, no recompile. The
        step's key width bounds the sequence: N·L >= past + S (exact-width prefill: L = local_bound(total))."""
        c, layout = self.config, self.config.layout
        bound = layout.world * at.key_slots.shape[1]
        return selection_scheme(steps, bound, state.block_table.shape[1], c.topk, state.index_pool, layout)

    def select(self, mask: Tensor | None, state: LayerCacheState, at: StepPositions, *, index_q: Tensor,
               index_w: Tensor) -> tuple[Tensor, Tensor]:
        c, layout = self.config, self.config.layout
        batch, steps = index_q.shape[:2]
        if self.scheme(steps, state, at) == KEY_GATHER:
            positions, _ = self.positions_by_key_gather(mask, state, at, index_q=index_q, index_w=index_w)
            seq_index = torch.arange(batch, device=positions.device).repeat_interleave(steps)
            return owned_slots(positions, seq_index, state.block_table, c.rank, layout.world, layout.interleave,
                               layout.page_size)
        allowed = allowed_keys(mask, at.keys, at.new, batch)
        scores = torch.ops.dcp.indexer_scores(index_q, index_w, state.index_pool, at.key_slots, allowed, c.index_scale)
        seq_index = torch.arange(batch, device=scores.device).repeat_interleave(steps)
        return distributed_topk(
            scores.reshape(batch * steps, -1), at.keys, seq_index, state.block_table, c.topk,
            c.rank, layout.world, layout.interleave, layout.page_size, c.group_name,
        )

    def positions_by_key_gather(self, mask: Tensor | None, state: LayerCacheState, at: StepPositions, *,
                                index_q: Tensor, index_w: Tensor,
                                gather_latents: bool = False) -> tuple[Tensor, Tensor | None]:
        """§4.2, key-gather scheme: this rank scores its share of the queries (``query_share``) against every
        key of the sequence, columns = global positions 0 .. N·L-1 (past the sequence: never causal); every
        query's selected global positions [B·S, K] int32 (-1 = none), the same on every rank. With
        ``gather_latents`` (the latent-gather attention, §4.4) also the sequences' latent rows in position order,
        all-gathered while the selection computes (on CUDA), else None."""
        c, layout = self.config, self.config.layout
        batch, steps = index_q.shape[:2]
        share = query_share(steps, c.rank, layout.world, index_q.device)
        rows = share.clamp(max=steps - 1)
        key_pos = torch.arange(layout.world * at.key_slots.shape[1], device=index_q.device)
        share_mask = None if mask is None else mask.index_select(2, rows)
        allowed = allowed_keys(share_mask, key_pos, at.new.index_select(0, rows), batch) & (share < steps)[None, :, None]
        return key_gather_positions(
            index_q, index_w, state.index_pool, at.key_slots, allowed, c.topk, c.index_scale,
            c.rank, layout.world, layout.interleave, c.group_name,
            rows_pool=state.latent_pool if gather_latents else None, overlap=index_q.is_cuda,
        )


class OwnedRows:
    """Dense MLA (no indexer): every row this rank owns that the query may see — causal (key position <= query
    position) and allowed by the attention mask (left padding) — compacted to the front in position order with
    counts (§4.2, dense). Width L = the step's key width (the rank's whole share, or more in a static step): no exchange is needed, since
    each rank attends all of its own rows and the LSE merge (§4.6) makes the union exact."""

    def __init__(self, config: AttentionConfig):
        self.config = config

    def select(self, mask: Tensor | None, state: LayerCacheState, at: StepPositions) -> tuple[Tensor, Tensor]:
        batch, steps = at.key_slots.shape[0], at.new.shape[0]
        keep = allowed_keys(mask, at.keys, at.new, batch) & (at.key_slots >= 0)[:, None, :]  # [B, S, L]
        keep = keep.reshape(batch * steps, -1)
        slots = at.key_slots.repeat_interleave(steps, dim=0)  # [B·S, L]
        return compact(torch.where(keep, slots, -1), keep)


class HandedSelection:
    """The rows another layer selected (GLM-MoE-DSA "shared" indexer layers reuse the previous layer's top-k):
    that layer's compacted slots and counts, as it packed them (``pack_selection``). Every layer owns the same
    positions in the same pages, so its slots are this layer's too: nothing is recomputed or exchanged."""

    def __init__(self, config: AttentionConfig):
        self.config = config

    def select(self, mask: Tensor | None, state: LayerCacheState, at: StepPositions, *,
               handed: Tensor) -> tuple[Tensor, Tensor]:
        return unpack_selection(handed)


SELECTIONS = {"indexer_topk": IndexerTopK, "owned_rows": OwnedRows, "handed": HandedSelection}


def pack_selection(slots: Tensor, counts: Tensor, batch: int, steps: int) -> Tensor:
    """This rank's selection as one int32 tensor [B, S, W + 1] (slots, then the count): what a layer that
    selects hands on to later layers, where HF hands on its top-k indices."""
    return torch.cat([slots, counts[:, None]], dim=-1).reshape(batch, steps, -1)


def unpack_selection(packed: Tensor) -> tuple[Tensor, Tensor]:
    rows = packed.reshape(-1, packed.shape[-1])
    return rows[:, :-1].contiguous(), rows[:, -1].contiguous()


class DCPSparseMLA(nn.Module):
    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.config = config
        self.selection = SELECTIONS[config.selection](config)

    def extra_repr(self) -> str:
        c = self.config
        chosen = f"topk={c.topk}" if c.selection == "indexer_topk" else f"selection={c.selection}"
        return (
            f"heads={c.heads}, latent={c.latent_dim}+{c.rope_dim}, {chosen}, dcp_rank={c.rank}/"
            f"{c.layout.world}, interleave={c.layout.interleave}, page_size={c.layout.page_size}"
        )

    def forward(
        self,
        *,
        q_nope: Tensor,  # [B, H, S, nope]
        q_rope: Tensor,  # [B, H, S, rope]  (rotary already applied)
        latent_new: Tensor,  # [B, 1, S, d_c]  (normalised)
        rope_new: Tensor,  # [B, 1, S, rope]  (rotary already applied)
        mask: Tensor | None,
        kv_b_weight: Tensor,  # [H·(nope + v), d_c]
        latent_pool: Tensor,
        index_pool: Tensor | None,
        block_table: Tensor,
        query_positions: Tensor,  # [S] the step's positions (the cache computes them once per step)
        key_positions: Tensor,  # [L] global positions of this rank's local rows
        key_slots: Tensor,  # [B, L] their physical rows, -1 past the sequence
        index_key_new: Tensor | None = None,  # [B, S, Di]  (indexer layers only)
        sinks: Tensor | None = None,  # [H] a learned sink logit per head in the softmax (HY-V4)
        q_scale: Tensor | None = None,  # [B, H, S, 1] a factor on the whole query (Mistral-Large-4)
        **selection_inputs: Tensor,  # what the selection reads: index_q [B,S,Hi,Di], index_w [B,S,Hi]; or handed
    ) -> Tensor | tuple[Tensor, Tensor]:
        batch, heads, steps, _ = q_nope.shape
        state = LayerCacheState(latent_pool, index_pool, block_table, query_positions, key_positions, key_slots)
        at = StepPositions(query_positions, key_positions, key_slots)
        self.write_new_rows(latent_new, rope_new, index_key_new, state, at)
        q = self.absorb_queries(q_nope, q_rope, kv_b_weight)
        if q_scale is not None:  # (f·q)·k = f·(q·k): scale the absorbed query
            q = q * q_scale.expand(batch, -1, -1, -1).transpose(1, 2).reshape(batch * steps, heads, 1).to(q.dtype)
        if self.attends_gathered_latents(steps, state, at):
            # The latent rows travel while this rank's share of the selection computes (key_gather_positions).
            positions, kv = self.selection.positions_by_key_gather(mask, state, at, gather_latents=True,
                                                                   **selection_inputs)
            o_lat = self.attend_gathered(q, kv, positions, steps, sinks)
        else:
            # The queries' all-gather does not depend on the selection: on CUDA it is issued first, travels on
            # NCCL's stream while the selection's kernels run, and is waited on only by the attention. Not on
            # gloo (CPU): ranks there crashed now and then (SIGSEGV / SIGABRT, 2 of 3 CI runs) with two
            # collectives in flight, and a CPU has nothing to overlap.
            world, overlap = self.config.layout.world, q.is_cuda
            pending = all_gather_heads_start(q, self.config.group_name, world) if overlap else None
            slots, counts = self.selection.select(mask, state, at, **selection_inputs)
            o_lat = self.attend(q, state.latent_pool, slots, counts, sinks,
                                q_all=all_gather_heads_wait(pending, world) if overlap else None)
        out = self.values_out(o_lat, kv_b_weight).reshape(batch, steps, heads * self.config.v_dim)
        if self.config.exports_selection:
            return out, pack_selection(slots, counts, batch, steps)
        return out

    def write_new_rows(self, latent_new: Tensor, rope_new: Tensor, index_key_new: Tensor | None,
                       state: LayerCacheState, at: StepPositions) -> None:
        """§4.1: this rank writes the rows of the step's positions it owns (others get slot -1: skipped)."""
        layout, batch, steps = self.config.layout, latent_new.shape[0], at.new.shape[0]
        slots = layout.slot(state.block_table, layout.local_index(at.new).expand(batch, steps))
        slots = torch.where(layout.owner(at.new) == self.config.rank, slots, -1).reshape(-1)
        rows = torch.cat([latent_new[:, 0], rope_new[:, 0]], dim=-1).reshape(batch * steps, -1)
        torch.ops.dcp.paged_write(state.latent_pool, rows, slots)
        if index_key_new is not None:
            torch.ops.dcp.paged_write(state.index_pool, index_key_new.reshape(batch * steps, -1), slots)

    def absorb_queries(self, q_nope: Tensor, q_rope: Tensor, kv_b_weight: Tensor) -> Tensor:
        """§2: q_lat = q_nope · W_UK per head, next to q_rope: [B·S, H, d_c + rope]."""
        c = self.config
        batch, heads, steps, _ = q_nope.shape
        w_uk = kv_b_weight.view(heads, c.nope_dim + c.v_dim, c.latent_dim)[:, : c.nope_dim]
        q_lat = torch.einsum("bhsn,hnc->bshc", q_nope, w_uk)
        return torch.cat([q_lat, q_rope.transpose(1, 2).to(q_lat.dtype)], dim=-1).reshape(batch * steps, heads, -1)

    def attend(self, q: Tensor, latent_pool: Tensor, slots: Tensor, counts: Tensor, sinks: Tensor | None = None,
               q_all: Tensor | None = None) -> Tensor:
        """§4.4-4.6: gather every rank's heads, attend over this rank's selected rows, merge by LSE back to
        this rank's heads: [T, H, d_c] in the query's dtype.

        Attention sinks add exp(sink_h) to each head's softmax denominator and nothing to its output, so the
        merged output is scaled by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink), lse being the merged
        log-sum-exp of the head over every rank's rows."""
        c, world = self.config, self.config.layout.world
        if q_all is None:  # not gathered ahead (``forward`` issues it before the selection)
            q_all = all_gather_heads(q, c.group_name, world)
        out, lse = torch.ops.dcp.sparse_mla_attn(q_all, latent_pool, slots, counts, c.attn_scale, c.latent_dim)
        if sinks is None:
            return lse_merge(out, lse, c.group_name, world).to(q.dtype)
        merged, total = lse_merge(out, lse, c.group_name, world, lse_of_rank=c.rank)
        return (merged * torch.sigmoid(total - sinks.to(total.dtype))[..., None]).to(q.dtype)

    def attends_gathered_latents(self, steps, state: LayerCacheState, at: StepPositions) -> bool:
        """§4.4, two attention schemes: a step whose selection is by key gather (prefill chunks) may gather the
        sequence's latent rows instead of every rank's queries, when that moves fewer bytes (static sizes only).
        Not for a layer that hands its selection on (the later layers read this rank's own slots)."""
        c = self.config
        if not isinstance(self.selection, IndexerTopK) or c.exports_selection:
            return False
        if self.selection.scheme(steps, state, at) != KEY_GATHER:
            return False
        bound = c.layout.world * at.key_slots.shape[1]
        return attention_scheme(steps, bound, state.block_table.shape[1], c.heads * c.layout.world,
                                state.latent_pool, c.latent_dim, c.layout) == KV_GATHER

    def attend_gathered(self, q: Tensor, kv: Tensor, positions: Tensor, steps: int,
                        sinks: Tensor | None = None) -> Tensor:
        """§4.4, latent-gather scheme: attention of this rank's own heads over every selected row of the
        sequences' latent rows, all-gathered in position order: [T, H, d_c], no merge.

        q [B·S, H, Dk] this rank's heads; kv [B, N·L, Dk] every rank's latent rows of the step's sequences
        (``positions_by_key_gather``); positions [B·S, K] every query's selected global positions."""
        c = self.config
        rows, counts = gathered_rows(positions, steps, kv.shape[1])
        out, lse = torch.ops.dcp.sparse_mla_attn(q, kv.reshape(-1, kv.shape[-1]), rows, counts, c.attn_scale,
                                                 c.latent_dim)
        if sinks is not None:  # in fp32 (fp64 for fp64), as the split scheme's merged output
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            out = out.to(acc) * torch.sigmoid(lse.to(acc) - sinks.to(acc))[..., None]
        return out.to(q.dtype)

    def values_out(self, o_lat: Tensor, kv_b_weight: Tensor) -> Tensor:
        """§4.7: o_h = o_lat_h · W_UV_hᵀ: [T, H, v]."""
        c = self.config
        heads = o_lat.shape[1]
        w_uv = kv_b_weight.view(heads, c.nope_dim + c.v_dim, c.latent_dim)[:, c.nope_dim :]
        return torch.einsum("thc,hvc->thv", o_lat, w_uv)


def tp_all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum the row-parallel output projection's partial products over the tensor-parallel group."""
    return all_reduce_sum(x, group_name)
