"""What a rewritten layer runs: DCP sparse MLA attention over the sharded paged cache (design §4).

``DCPSparseMLA`` is the module the rewrite pass inserts into a captured layer graph (as ``call_module``).
It receives tensors the HF layer already computed (per-head query parts, the step's new latent/rope/index-key
rows, the indexer's query and head weights, the attention mask) plus the cache state, and returns the
attention output in HF's layout, ready for the (head-sharded) output projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layout import DCPLayout
from .ops import all_gather_heads, distributed_topk, lse_merge
from .ops.distributed import all_reduce_sum


@dataclass(frozen=True)
class DCPAttentionSpec:
    """Everything static about one rewritten layer on one rank."""

    heads: int  # query heads on this rank (after head sharding)
    nope_dim: int  # per-head non-rotary query/key width
    rope_dim: int  # rotary width (shared key part)
    latent_dim: int  # d_c: the cached latent width = absorbed query width = value width in latent space
    v_dim: int  # per-head value width after W_UV
    topk: int  # index_topk K
    attn_scale: float
    index_scale: float
    layout: DCPLayout
    rank: int  # rank inside the DCP group
    group_name: str  # the DCP process group ("" when the group is a single rank)


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


class DCPSparseMLA(nn.Module):
    def __init__(self, spec: DCPAttentionSpec):
        super().__init__()
        self.spec = spec

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"heads={s.heads}, latent={s.latent_dim}+{s.rope_dim}, topk={s.topk}, dcp_rank={s.rank}/"
            f"{s.layout.world}, interleave={s.layout.interleave}, page_size={s.layout.page_size}"
        )

    def forward(
        self,
        q_nope: Tensor,  # [B, H, S, nope]
        q_rope: Tensor,  # [B, H, S, rope]  (rotary already applied)
        latent_new: Tensor,  # [B, 1, S, d_c]  (normalised)
        rope_new: Tensor,  # [B, 1, S, rope]  (rotary already applied)
        index_key_new: Tensor,  # [B, S, Di]
        index_q: Tensor,  # [B, S, Hi, Di]
        index_w: Tensor,  # [B, S, Hi]
        mask: Tensor | None,
        kv_b_weight: Tensor,  # [H·(nope + v), d_c]
        latent_pool: Tensor,
        index_pool: Tensor,
        block_table: Tensor,
        past: int,
    ) -> Tensor:
        s, layout = self.spec, self.spec.layout
        batch, heads, steps, _ = q_nope.shape
        dev = q_nope.device
        total = past + steps

        # 1. Owner-only paged writes of this step's rows (design §4.1).
        new_pos = torch.arange(steps, device=dev) + past
        new_slots = layout.slot(block_table, layout.local_index(new_pos).expand(batch, steps))
        new_slots = torch.where(layout.owner(new_pos) == s.rank, new_slots, -1).reshape(-1)
        rows = torch.cat([latent_new[:, 0], rope_new[:, 0]], dim=-1).reshape(batch * steps, -1)
        torch.ops.dcp.paged_write(latent_pool, rows, new_slots)
        torch.ops.dcp.paged_write(index_pool, index_key_new.reshape(batch * steps, -1), new_slots)

        # 2. Exact distributed top-k of the indexer over this rank's own keys (design §4.2-3).
        local = torch.arange(layout.local_bound(total), device=dev)
        key_pos = layout.global_position(local, s.rank)
        key_slots = layout.slot(block_table, local.expand(batch, -1))
        key_slots = torch.where(key_pos < total, key_slots, -1).to(torch.int32)
        allowed = allowed_keys(mask, key_pos, new_pos, batch)
        scores = torch.ops.dcp.indexer_scores(index_q, index_w, index_pool, key_slots, allowed, s.index_scale)
        seq_index = torch.arange(batch, device=dev).repeat_interleave(steps)
        slots, counts = distributed_topk(
            scores.reshape(batch * steps, -1), key_pos, seq_index, block_table, s.topk,
            s.rank, layout.world, layout.interleave, layout.page_size, s.group_name,
        )

        # 3. Absorbed queries (design §2): q_lat = q_nope · W_UK, one 576-style row per head.
        w_kv = kv_b_weight.view(heads, s.nope_dim + s.v_dim, s.latent_dim)
        w_uk, w_uv = w_kv[:, : s.nope_dim], w_kv[:, s.nope_dim :]
        q_lat = torch.einsum("bhsn,hnc->bshc", q_nope, w_uk)
        q = torch.cat([q_lat, q_rope.transpose(1, 2).to(q_lat.dtype)], dim=-1).reshape(batch * steps, heads, -1)

        # 4-6. All-gather heads, attention over owned rows, LSE merge back to this rank's heads.
        q = all_gather_heads(q, s.group_name, layout.world)
        out, lse = torch.ops.dcp.sparse_mla_attn(q, latent_pool, slots, counts, s.attn_scale, s.latent_dim)
        o_lat = lse_merge(out, lse, s.group_name, layout.world).to(q.dtype)

        # 7. Back to per-head values: o_h = o_lat_h · W_UV_hᵀ, in HF's [B, S, H·v] layout.
        o = torch.einsum("thc,hvc->thv", o_lat, w_uv)
        return o.reshape(batch, steps, heads * s.v_dim)


def tp_all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum the row-parallel output projection's partial products over the tensor-parallel group."""
    return all_reduce_sum(x, group_name)
