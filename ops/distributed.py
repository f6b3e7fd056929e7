"""The collective steps of DCP attention, written with c10d *functional* collectives.

Why functional collectives and not ``dcp`` ops that call ``dist.*`` inside: Dynamo traces
``_c10d_functional.all_gather_into_tensor`` / ``reduce_scatter_tensor`` / ``wait_tensor`` as graph nodes,
so Inductor can start a collective early and wait late (overlapping it with the local top-k or the
absorbed-query matmul), and CUDA-graph capture records them like any other kernel. An opaque op would
hide them. The local math between the collectives is in ``dcp`` ops (``ops/__init__.py``).

Groups: every function takes the process group by name (``str``, as the c10d functional ops take it) and its
size. ``None`` means "no group", a single rank: a group of one does no communication and never reads the name
(so a caller may pass ``None`` there; the ``dcp`` custom ops themselves take no group). A group of more than
one rank needs its name (``ValueError`` otherwise).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .inference_only import collective
from .layout import DCPLayout

c10d = torch.ops._c10d_functional  # the traceable collectives (the same ops in torch 2.11 and 2.13)


def _named(group_name: str | None) -> str:
    if not group_name:
        raise ValueError(f"a group of more than one rank needs its process group name, got {group_name!r}")
    return group_name


def all_gather(x: Tensor, dim: int, group_name: str | None, world: int) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``."""
    if world == 1:
        return x
    group_name = _named(group_name)
    out = collective(
        lambda t: c10d.wait_tensor(c10d.all_gather_into_tensor(t.contiguous(), world, group_name)), x,
        "_c10d_functional.all_gather_into_tensor",
    )
    return out if dim == 0 else torch.cat(out.chunk(world, dim=0), dim=dim)


def reduce_scatter_sum(x: Tensor, group_name: str | None, world: int) -> Tensor:
    """Sum every rank's ``x`` and keep this rank's block of ``world`` along dim 0."""
    if world == 1:
        return x
    group_name = _named(group_name)
    return collective(
        lambda t: c10d.wait_tensor(c10d.reduce_scatter_tensor(t.contiguous(), "sum", world, group_name)), x,
        "_c10d_functional.reduce_scatter_tensor",
    )


def all_to_all(x: Tensor, group_name: str | None, world: int) -> Tensor:
    """Block r of ``x`` (``world`` equal blocks along dim 0) goes to rank r; block r of the result came from
    rank r."""
    if world == 1:
        return x
    group_name = _named(group_name)
    split = [x.shape[0] // world] * world
    return collective(
        lambda t: c10d.wait_tensor(c10d.all_to_all_single(t.contiguous(), split, split, group_name)), x,
        "_c10d_functional.all_to_all_single",
    )


def all_reduce_sum(x: Tensor, group_name: str | None) -> Tensor:
    """Sum every rank's ``x`` over the group (``None``: no group, ``x`` itself)."""
    if group_name is None:
        return x
    group_name = _named(group_name)
    return collective(
        lambda t: c10d.wait_tensor(c10d.all_reduce(t.contiguous(), "sum", group_name)), x, "_c10d_functional.all_reduce"
    )


def all_gather_heads(q: Tensor, group_name: str | None, world: int) -> Tensor:
    """[T, H, D] on each rank -> [T, world·H, D], rank r's heads at block r (docs/design.md §4.4)."""
    return all_gather_heads_wait(all_gather_heads_start(q, group_name, world), world)


def all_gather_heads_start(q: Tensor, group_name: str | None, world: int) -> Tensor:
    """Issue ``all_gather_heads`` and return at once: the collective's output, not waited on. Pass it to
    ``all_gather_heads_wait`` where the heads are first needed, so that the work issued in between (the
    selection: indexer, local top-k) runs while the queries travel. The collective's position in the graph
    is its issue; the wait's is where the compute stream joins it (in eager, in a compiled graph and in a
    recorded CUDA graph alike)."""
    if world == 1:
        return q
    group_name = _named(group_name)
    return collective(lambda t: c10d.all_gather_into_tensor(t.contiguous(), world, group_name), q,
                      "_c10d_functional.all_gather_into_tensor")


def all_gather_heads_wait(pending: Tensor, world: int) -> Tensor:
    """[world·T, H, D] from ``all_gather_heads_start`` -> [T, world·H, D], once the collective is done."""
    if world == 1:
        return pending
    return collective(lambda t: torch.cat(c10d.wait_tensor(t).chunk(world, dim=0), dim=1), pending,
                      "_c10d_functional.all_gather_into_tensor")


def local_topk_sorted(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row ([T, L], L >= k), ties to the lower column: one stable full sort. (torch.topk does not
    promise the tie rule; a topk + tie-fill version is slower on an H100 at k = 2048:
    benchmarks/bench_local_topk.py.) The CPU / float64 path of ``dcp::local_topk``; CUDA runs a radix
    select (ops/triton/local_topk.py)."""
    idx = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return torch.gather(scores, -1, idx), idx


def local_topk_padded(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``dcp::local_topk`` by the stable sort: the top k of each row padded with k -inf columns (any L >= 0).
    Contiguous outputs, as the op's fake promises (the sort's columns are a slice of a wider tensor)."""
    values, idx = local_topk_sorted(F.pad(scores, (0, k), value=float("-inf")), k)
    return values.contiguous(), idx.contiguous()


# The longest sequence the cache takes (ShardedPagedCache.reserve): a position must fit the order key's low
# word (ops/reference.py, "order keys": below 2**31 - 1), far above any model's context (DeepSeek-V3.2: 163840).
MAX_POSITIONS = 2**31 - 2
PAD_POSITION = MAX_POSITIONS  # the position of local top-k padding columns (score -inf: never selected)


def distributed_topk(
    scores: Tensor, positions: Tensor, seq_index: Tensor, block_table: Tensor, k: int,
    rank: int, world: int, interleave: int, page_size: int, group_name: str | None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k over the whole DCP group (docs/design.md §4.2).

    scores [T, L] this rank's indexer scores of its own keys (-inf = not a candidate), positions [L] or
    [T, L] their global positions. Local top-k, its order keys sorted best first, all-gather them, rank this
    rank's keys among every rank's (``topk_select``), keep the selected ones as physical slots [T, k] (best
    first) and counts [T].
    """
    # dcp::local_topk pads each row with k -inf columns: the local top-k is then fixed-width k whatever this
    # rank holds, with no branch on the (growing) local length, so a decode graph compiles once. Their
    # positions are PAD_POSITION (never selected: -inf). The order key breaks score ties by the lower
    # position, so the selection is the same whatever the number of ranks (torch.topk promises no tie rule).
    positions = F.pad(positions, (0, k), value=PAD_POSITION)  # [L + k] or [T, L + k]
    top_scores, top_idx = torch.ops.dcp.local_topk(scores, k)
    top_pos = positions[top_idx] if positions.dim() == 1 else torch.gather(positions, -1, top_idx)
    # One int64 a candidate (8 bytes: the score's order image and the position), sorted best first: the
    # sorted blocks let topk_select rank this rank's keys by binary searches (ops/triton/kernels/topk_select.py).
    keys = torch.ops.dcp.candidate_keys(top_scores, top_pos)[None]  # [1, T, k]
    keys = all_gather(keys, 0, group_name, world)  # [world, T, k]: rank r's keys in block r, no copy after
    return torch.ops.dcp.topk_select(keys, seq_index, block_table, k, rank, world, interleave, page_size)


# --- Prefill selection by key gather (docs/design.md §4.2, "two schemes") ----------------------------------
# ``distributed_topk`` above ships every query's N·K local candidates (8 bytes each): right for decode, where a
# step has one query per sequence, but a prefill chunk of S queries per sequence ships N·K·8 bytes per query
# while its index keys are only Di·elt bytes per token. The key-gather scheme instead gathers every index key
# of the sequence to every rank, splits the queries N ways, and exchanges only the K selected positions (int32).
# Both are exact and select the same rows; ``choose_selection_scheme`` picks the cheaper exchange.

CANDIDATES, KEY_GATHER = "candidates", "key_gather"
SELECTION_SCHEMES = (CANDIDATES, KEY_GATHER)
SELECTION_SCHEME_ENV = "DCP_SELECTION_SCHEME"  # "auto" (default), "candidates" or "key_gather"


def _scheme_from_env(var: str = SELECTION_SCHEME_ENV, choices: tuple[str, ...] = SELECTION_SCHEMES,
                     default: str = "auto") -> str | None:
    """The scheme the environment variable ``var`` names (checked against ``choices``; ``"auto"``, when that
    is the default, reads as None: the cost model chooses). Shared by the selection, attention and merge
    schemes."""
    name = os.environ.get(var, default).strip() or default
    if name != "auto" and name not in choices:
        allowed = f"'auto' or one of {choices}" if default == "auto" else f"one of {choices}"
        raise ValueError(f"{var}={name!r}: expected {allowed}")
    return None if name == "auto" else name


# The forced scheme of this process (None: the cost model chooses). Read when a layer is traced or run: under
# torch.compile it is baked into the graph, so set it before the first compile.
_forced_scheme: dict[str, str | None] = {"name": _scheme_from_env()}


def force_selection_scheme(name: str | None) -> None:
    """Force the DSA selection scheme of every indexer layer in this process: ``"candidates"``,
    ``"key_gather"`` (for any step, decode included), or ``None`` / ``"auto"`` to let the cost model choose.
    The environment variable ``DCP_SELECTION_SCHEME`` sets the same at import. For tests and benchmarks: both
    schemes are exact, the choice only moves cost."""
    if name == "auto":
        name = None
    if name is not None and name not in SELECTION_SCHEMES:
        raise ValueError(f"unknown selection scheme {name!r}; expected None, 'auto' or one of {SELECTION_SCHEMES}")
    _forced_scheme["name"] = name


def forced_selection_scheme() -> str | None:
    return _forced_scheme["name"]


def selection_bytes(queries_per_seq: int, total: int, world: int, k: int, index_dim: int, index_elt_bytes: int,
                    interleave: int = 1) -> tuple[int, int]:
    """Bytes each rank ends up holding from the selection's all-gathers, per sequence, for each scheme:
    ``(candidates, key_gather)``. (What crosses the links is (N-1)/N of it for both: the ratio is the same.)

        candidates = S · N · K · 8                          (fp32 score + int32 position per candidate)
        key_gather = N · L · Di · elt  +  ⌈S/N⌉ · N · K · 4  (every index key; then the int32 positions)

    with S queries per sequence, N ranks, L = local_bound(total) keys per rank (N·L ≈ total), Di the index-key
    width, elt its bytes. The batch B multiplies both, so it does not enter the choice."""
    layout = DCPLayout(world, interleave, 1)
    candidates = queries_per_seq * world * k * 8
    key_gather = world * layout.local_bound(total) * index_dim * index_elt_bytes + -(-queries_per_seq // world) * world * k * 4
    return candidates, key_gather


# Below this many queries per rank (and sequence) the key gather is not considered: the exchange is then small
# either way and latency-bound, where one collective beats two; decode (S = 1) is far below it.
MIN_KEY_GATHER_QUERIES_PER_RANK = 128


def choose_selection_scheme(queries_per_seq: int, total: int, world: int, k: int, index_dim: int,
                            index_elt_bytes: int, interleave: int = 1) -> str:
    """The cost model (ints in, a scheme out): ``"key_gather"`` when it moves fewer bytes than ``"candidates"``
    (``selection_bytes``), else ``"candidates"``. Always ``"candidates"`` for one rank (no exchange at all) and
    below ``MIN_KEY_GATHER_QUERIES_PER_RANK`` queries per rank (decode, S = 1, short chunks: a few MiB either
    way, and one collective beats two; at any real context the keys outweigh N·K·8 there anyway). E.g. N = 4, K = 2048,
    Di = 128, bf16: a decode step (S = 1) -> candidates; a 4096-query chunk at total 32K ->
    key_gather (64 MiB + 256 MiB vs 2 GiB for 8 sequences). Key gather wins while total / S < K·(8N-4) / (Di·elt)
    (224 there)."""
    if world == 1 or queries_per_seq < MIN_KEY_GATHER_QUERIES_PER_RANK * world:
        return CANDIDATES
    candidates, key_gather = selection_bytes(queries_per_seq, total, world, k, index_dim, index_elt_bytes, interleave)
    return KEY_GATHER if key_gather < candidates else CANDIDATES


def _static_int(x) -> int | None:
    """``x`` when it is a plain Python int (a static size); None for a SymInt, a tensor or anything else. A plain
    type test: it never adds a guard (deciding on a symbolic size would specialise the graph), and Dynamo traces
    it without a graph break (reading a SymInt's sympy expression, as ``is_concrete_int`` does, would break)."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def selection_scheme(queries_per_seq, total, pages_per_seq, k: int, index_pool: Tensor, layout: DCPLayout) -> str:
    """The scheme a DSA layer uses for this step: the forced one (``force_selection_scheme``) or the cost model's,
    decided on static facts only, so a compiled graph neither guards nor recompiles on it.

    ``queries_per_seq`` (S), ``total`` (past + S) and ``pages_per_seq`` (the block table's width) may be ints,
    SymInts or (``total``) a tensor. A symbolic ``total`` (a compiled graph whose past length is dynamic) is
    replaced by an upper bound that is static, every page of the block table: N · pages · P. The choice is then
    the one that is right up to that bound, and if S or the bound is symbolic too, ``"candidates"`` (the
    decode-safe scheme). Decode (S = 1, which Dynamo specialises) always gets ``"candidates"``."""
    forced = forced_selection_scheme()
    if forced is not None:
        return forced
    steps, total, pages = _static_int(queries_per_seq), _static_int(total), _static_int(pages_per_seq)
    if total is None and pages is not None:
        total = layout.world * pages * layout.page_size
    if steps is None or total is None:
        return CANDIDATES
    return choose_selection_scheme(steps, total, layout.world, k, index_pool.shape[1], index_pool.element_size(),
                                   layout.interleave)


def query_share(steps: int, rank: int, world: int, device=None) -> Tensor:
    """[⌈S/N⌉] the query indices (within each sequence) that ``rank`` scores in the key-gather scheme:
    rank, rank + N, rank + 2N, ... Strided, so every rank gets the same number of queries of every sequence and
    the same causal work (a contiguous split would give the last rank the longest rows). Entries >= S are
    padding (S not divisible by N): their rows must allow nothing."""
    return torch.arange(-(-steps // world), device=device) * world + rank


def gather_keys_by_position(index_pool: Tensor, key_slots: Tensor, interleave: int, group_name: str | None,
                            world: int) -> Tensor:
    """Every rank's index-key rows, in global position order: [B, N·L, Di], row p = the key of position p.

    key_slots [B, L] are this rank's physical rows of its local keys 0 .. L-1 (-1 past the sequence: those rows
    are filler that causality never allows). One all-gather of [B, L, Di] (an exact copy, whatever the dtype),
    then a reshape: local row l of rank r is position (l // I)·N·I + r·I + l % I, so the gathered
    [r, b, l // I, l % I] is [b, l // I, r, l % I] in position order (a permutation, no gather)."""
    return gather_rows_wait(gather_rows_start(index_pool, key_slots, interleave, group_name, world), interleave, world)


def gather_rows_start(pool: Tensor, key_slots: Tensor, interleave: int, group_name: str | None,
                      world: int) -> Tensor:
    """Issue ``gather_keys_by_position`` of ``pool``'s rows and return at once: the collective's output
    [N, B, L, D], not waited on (``gather_rows_wait`` waits and orders it). What is issued in between runs while
    the rows travel; on one NCCL stream, collectives issued in between queue behind it."""
    batch, local = key_slots.shape
    if local % interleave:
        raise ValueError(f"key_slots width {local} is not a multiple of the interleave {interleave}: "
                         "the local key range must be whole rounds of ownership (DCPLayout.local_bound)")
    pool = pool if pool.shape[0] else pool.new_zeros(1, pool.shape[1])  # owns no row yet
    mine = pool[key_slots.clamp(min=0).long()].unsqueeze(0)  # [1, B, L, D]
    if world == 1:
        return mine
    group_name = _named(group_name)
    return collective(lambda t: c10d.all_gather_into_tensor(t.contiguous(), world, group_name), mine,
                      "_c10d_functional.all_gather_into_tensor")


def gather_rows_wait(pending: Tensor, interleave: int, world: int) -> Tensor:
    """[N, B, L, D] from ``gather_rows_start`` -> [B, N·L, D] in global position order, once it has arrived."""
    every = pending if world == 1 else collective(c10d.wait_tensor, pending, "_c10d_functional.all_gather_into_tensor")
    _, batch, local, width = every.shape
    return (every.view(world, batch, local // interleave, interleave, width).permute(1, 2, 0, 3, 4)
            .reshape(batch, world * local, width))


def compact(slots: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Move the kept slots of each row to its front (stable: their order is kept), -1 after: (slots, counts),
    int32. A sort of the keep flags: fixed width, no host sync. (``slots`` already holds -1 where not kept.)"""
    to_front = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    return torch.gather(slots, -1, to_front).to(torch.int32), keep.sum(-1).to(torch.int32)


def owned_slots(positions: Tensor, seq_index: Tensor, block_table: Tensor, rank: int, world: int,
                interleave: int, page_size: int) -> tuple[Tensor, Tensor]:
    """The selected global positions of each query ([T, K], best first, -1 = none) -> the ones ``rank`` owns as
    compacted physical slots [T, K] int32 (owned first, order kept, -1 after) and counts [T] int32: the
    output of ``dcp::topk_select``. The page lookup indexes the flat block table, so no [T, pages] copy is made."""
    layout = DCPLayout(world, interleave, page_size)
    pos = positions.long()
    owned = (pos >= 0) & (layout.owner(pos) == rank)
    local = torch.where(owned, layout.local_index(pos), torch.zeros_like(pos))
    pages = block_table.shape[1]
    page = block_table.reshape(-1)[seq_index.long()[:, None] * pages + local // page_size].long()
    return compact(torch.where(owned, page * page_size + local % page_size, torch.full_like(pos, -1)), owned)


def key_gather_positions(
    index_q: Tensor, index_w: Tensor, index_pool: Tensor, key_slots: Tensor, allowed: Tensor,
    k: int, scale: float, rank: int, world: int, interleave: int, group_name: str | None,
    rows_pool: Tensor | None = None, overlap: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Exact top-k over the whole DCP group by gathering the keys (docs/design.md §4.2): the selected global
    positions of every query of the step, [B·S, K] int32 (-1 = none), the same on every rank, the same rows as
    ``distributed_topk`` over the scores of every rank; and, given ``rows_pool`` (the latent pool of the
    latent-gather attention, §4.4), its rows of the step's sequences in position order ([B, N·L, D], as
    ``gather_keys_by_position``), else None.

    index_q [B, S, Hi, Di], index_w [B, S, Hi] every query of the step (the same on every rank); key_slots
    [B, L] this rank's local key rows; allowed [B, ⌈S/N⌉, N·L] bool: may query ``query_share(S, rank, N)[j]``
    see global position p (causality and the mask; False on padding rows).

    1. all-gather the index keys, in position order (``gather_keys_by_position``);
    2. score this rank's share of the queries against every key with ``dcp::indexer_scores`` (the op, dtypes
       and fp32 accumulation of the candidate scheme: each (query, key) pair is scored once over the group);
    3. exact top-k per query, ties to the lower column = the lower position (the rule of ``topk_select``);
    4. all-gather the selected positions (int32, -1 = none).

    ``overlap`` (CUDA): the rows of ``rows_pool`` are all-gathered from right after step 1 (the keys must have
    arrived first: on NCCL's one stream a collective issued before them would delay them) and travel while
    steps 2-3 run; step 4's all-gather queues behind them. Otherwise (gloo, where two collectives in flight
    crashed ranks now and then) they are gathered after step 4.
    """
    batch, steps = index_q.shape[:2]
    share = query_share(steps, rank, world, index_q.device)
    rows = share.clamp(max=steps - 1)  # padding rows score a real query; ``allowed`` masks them out
    keys = gather_keys_by_position(index_pool, key_slots, interleave, group_name, world)  # [B, N·L, Di]
    in_flight = None
    if rows_pool is not None and overlap:
        in_flight = gather_rows_start(rows_pool, key_slots, interleave, group_name, world)
    width = keys.shape[1]
    key_rows = (torch.arange(batch, device=keys.device)[:, None] * width
                + torch.arange(width, device=keys.device)[None, :]).to(torch.int32)  # [B, N·L]
    scores = torch.ops.dcp.indexer_scores(
        index_q.index_select(1, rows), index_w.index_select(1, rows), keys.reshape(batch * width, -1), key_rows,
        allowed, scale,
    )  # [B, ⌈S/N⌉, N·L]
    # dcp::local_topk pads k -inf columns, as in distributed_topk: fixed-width k however few keys there are.
    top_scores, top_idx = torch.ops.dcp.local_topk(scores.reshape(batch * share.shape[0], width), k)
    positions = torch.where(top_scores > float("-inf"), top_idx, torch.full_like(top_idx, -1)).to(torch.int32)
    every = all_gather(positions.view(1, batch, -1, k), 0, group_name, world)  # [N, B, ⌈S/N⌉, K]
    # Query j·N + r of a sequence is rank r's share row j: [N, B, j, K] -> [B, j, N, K], then drop the padding.
    selected = every.permute(1, 2, 0, 3).reshape(batch, -1, k)[:, :steps].reshape(batch * steps, k)
    if rows_pool is None:
        return selected, None
    if in_flight is None:  # not overlapped: issued now, after the positions' all-gather
        in_flight = gather_rows_start(rows_pool, key_slots, interleave, group_name, world)
    return selected, gather_rows_wait(in_flight, interleave, world)


def gathered_rows(positions: Tensor, steps: int, width: int) -> tuple[Tensor, Tensor]:
    """Selected global positions [B·S, K] (-1 = none, in any order) -> rows of the position-ordered gathered
    latents [B·N·L, D] (``gather_keys_by_position``): row b·N·L + p, compacted to the front (order kept), -1
    after, int32; and counts [B·S] int32: what ``dcp::sparse_mla_attn`` reads."""
    seq = torch.arange(positions.shape[0], device=positions.device) // steps
    keep = positions >= 0
    return compact(torch.where(keep, seq[:, None] * width + positions.long(), -1), keep)


# --- Prefill attention by latent gather (docs/design.md §4.4, "two attention schemes") -----------------------
# The DCP attention of §4.4-4.6 all-gathers every rank's queries (all heads), attends over the rank's own rows
# and merges by LSE (an fp32 reduce-scatter of the partial outputs): per query S·H·(Dk·elt + 4 + v·4) bytes. A
# prefill chunk of many queries per sequence moves less by gathering the sequence's latent rows instead
# (N·L·Dk·elt per sequence) and attending with this rank's own heads over every selected row: no merge, the
# attention TP would run, over a cache that stays sharded. It needs every query's selected positions on every
# rank, which the key-gather selection has (``key_gather_positions``).

SPLIT, KV_GATHER = "split", "kv_gather"
ATTENTION_SCHEMES = (SPLIT, KV_GATHER)
ATTENTION_SCHEME_ENV = "DCP_ATTENTION_SCHEME"  # "auto" (default), "split" or "kv_gather"


_forced_attention: dict[str, str | None] = {"name": _scheme_from_env(ATTENTION_SCHEME_ENV, ATTENTION_SCHEMES)}


def force_attention_scheme(name: str | None) -> None:
    """Force the attention scheme of every DSA layer whose step selects by key gather: ``"split"`` (§4.4-4.6),
    ``"kv_gather"``, or ``None`` / ``"auto"`` for the cost model. ``DCP_ATTENTION_SCHEME`` sets the same at
    import. For tests and benchmarks: both are exact. Set it before the first compile (it is baked in)."""
    if name == "auto":
        name = None
    if name is not None and name not in ATTENTION_SCHEMES:
        raise ValueError(f"unknown attention scheme {name!r}; expected None, 'auto' or one of {ATTENTION_SCHEMES}")
    _forced_attention["name"] = name


def attention_bytes(queries_per_seq: int, total: int, world: int, heads: int, width: int, v_dim: int,
                    elt_bytes: int, interleave: int = 1) -> tuple[int, int]:
    """Bytes each rank receives per sequence for the step's attention, ``(split, kv_gather)``:

        split     = S · H · (Dk · elt + 4 + v · 4)    (every head's query; lse; the fp32 partials to reduce)
        kv_gather = N · L · Dk · elt                  (every latent row of the sequence)

    with S queries per sequence, H heads over the whole group, Dk the latent row width, v the latent value
    width, L = local_bound(total). The same bytes bound each scheme's transient memory."""
    layout = DCPLayout(world, interleave, 1)
    split = queries_per_seq * heads * (width * elt_bytes + 4 + v_dim * 4)
    return split, world * layout.local_bound(total) * width * elt_bytes


def attention_scheme(queries_per_seq, total, pages_per_seq, heads: int, latent_pool: Tensor, v_dim: int,
                     layout: DCPLayout) -> str:
    """The attention scheme of a step whose selection is by key gather: the forced one, else ``"kv_gather"``
    when it moves fewer bytes (``attention_bytes``), decided on static sizes only as ``selection_scheme``
    (a symbolic S or bound: ``"split"``)."""
    forced = _forced_attention["name"]
    if forced is not None:
        return forced
    steps, total, pages = _static_int(queries_per_seq), _static_int(total), _static_int(pages_per_seq)
    if total is None and pages is not None:
        total = layout.world * pages * layout.page_size
    if steps is None or total is None or layout.world == 1:
        return SPLIT
    split, gather = attention_bytes(steps, total, layout.world, heads, latent_pool.shape[1], v_dim,
                                    latent_pool.element_size(), layout.interleave)
    return KV_GATHER if gather < split else SPLIT


# --- How the partial outputs are merged (docs/design.md §4.6) ----------------------------------------------
# "reduce_scatter": all-gather every head's lse, rescale locally (dcp::lse_combine), reduce-scatter the fp32
# terms: two collectives. "all_to_all": send each rank its own heads' partial output with the lse appended
# (the same bytes as the reduce-scatter), merge the N parts locally: one collective. The default stays the
# measured one until the other is measured (benchmarks/RESULTS.md); both are exact.

REDUCE_SCATTER, ALL_TO_ALL = "reduce_scatter", "all_to_all"
MERGE_SCHEMES = (REDUCE_SCATTER, ALL_TO_ALL)
MERGE_SCHEME_ENV = "DCP_MERGE_SCHEME"  # "reduce_scatter" (default) or "all_to_all"


_merge: dict[str, str] = {"name": _scheme_from_env(MERGE_SCHEME_ENV, MERGE_SCHEMES, REDUCE_SCATTER)}


def set_merge_scheme(name: str) -> None:
    """The merge of every DCP layer traced or run after this call (set it before the first compile)."""
    if name not in MERGE_SCHEMES:
        raise ValueError(f"unknown merge scheme {name!r}; expected one of {MERGE_SCHEMES}")
    _merge["name"] = name


def merge_scheme() -> str:
    return _merge["name"]


def lse_merge(out: Tensor, lse: Tensor, group_name: str | None, world: int,
              lse_of_rank: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Merge the partial attention of all ranks of the DCP group (docs/design.md §4.6).

    out [T, world·H, D], lse [T, world·H] this rank's partial over its own rows, for every gathered head ->
    [T, H, D] exact attention for this rank's own H heads: all-gather lse, rescale (``dcp::lse_combine``),
    reduce-scatter heads. Returned in float32 (float64 for float64 inputs); the caller casts. (The split-K
    combine inside one rank's attention kernel is another thing: ``ops/triton/merge_partials.py``.)
    With ``lse_of_rank`` (this rank's index in the group) it also returns the merged lse of its own heads,
    [T, H] (natural log, -inf where no rank has rows), from the lse it gathered anyway.
    ``merge_scheme()`` = "all_to_all" does the same with one all-to-all instead (``_lse_merge_all_to_all``).
    """
    if world == 1:
        return out if lse_of_rank is None else (out, lse)
    if merge_scheme() == ALL_TO_ALL:
        return _lse_merge_all_to_all(out, lse, group_name, world, lse_of_rank)
    lse_all = all_gather(lse.unsqueeze(0), 0, group_name, world)  # [world, T, world·H]
    scaled = torch.ops.dcp.lse_combine(out, lse, lse_all)
    heads_first = scaled.transpose(0, 1).contiguous()  # [world·H, T, D]
    mine = reduce_scatter_sum(heads_first, group_name, world).transpose(0, 1)  # [T, H, D]
    if lse_of_rank is None:
        return mine
    heads = lse.shape[1] // world
    return mine, torch.logsumexp(lse_all[:, :, lse_of_rank * heads : (lse_of_rank + 1) * heads], dim=0)


def _lse_merge_all_to_all(out: Tensor, lse: Tensor, group_name: str | None, world: int,
                          lse_of_rank: int | None) -> Tensor | tuple[Tensor, Tensor]:
    """``lse_merge`` with one collective: rank r receives every rank's partial output of its own heads with
    the lse appended ([N, T, H, D + 1], fp32), and merges the N parts (``dcp::lse_combine`` over them: the
    same empty-part rule), summing in rank order."""
    T, heads_all, D = out.shape
    heads = heads_all // world
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    payload = torch.cat([out.to(acc), lse.to(acc).unsqueeze(-1)], dim=-1)  # [T, N·H, D + 1]
    send = payload.view(T, world, heads, D + 1).transpose(0, 1).reshape(world * T, heads, D + 1)
    parts = all_to_all(send, group_name, world).view(world, T, heads, D + 1)  # part r: rank r's rows
    o_parts, lse_parts = parts[..., :D], parts[..., D]
    merged = torch.ops.dcp.lse_combine(o_parts, lse_parts, lse_parts).sum(dim=0)
    if lse_of_rank is None:
        return merged
    return merged, torch.logsumexp(lse_parts, dim=0)