"""Every rank of a tensor-parallel group runs one request together: the same weights, the same inputs, the
same generation settings, the same sampled tokens, the same number of steps. A rank that differs would not
fail by itself — it would compute wrong tokens, or wait forever in a collective its peers never reach. This
module makes the ranks agree, or fail together with a message that names what differs:

- ``weight_fingerprint``: an exact integer digest of every parameter, taken once in ``apply`` (before apply
  shards the heads): the values of what every rank holds whole, and the shapes and placements of what Hugging
  Face's tensor/expert parallelism sharded (each rank holds its own block of those).
- ``verify_same``: one all-gather of a fixed-length int64 vector of named fields (shapes, input checksums,
  a digest of the generation settings, the weight fingerprint); every rank sees every rank's vector and so
  raises the same ``RankMismatchError``, naming the fields and the ranks, before any other collective.
- ``sync_sampling_rng``: rank 0's random generator states are broadcast to the group, so sampling draws the
  same tokens everywhere whatever each rank's seed (rank 0's stream is unchanged: it samples as a single
  process seeded the same would).
- ``RankAgreedStopping``: HF's stopping criteria, with each step's per-sequence "done" flags all-reduced
  (max) over the group, so no rank leaves the generation loop alone (e.g. ``max_time``).
- ``FailureRecords``: a rank that raises records its error in the process group's store; a rank whose
  collective then fails (peer gone, or the collective timed out) raises ``PeerRankFailed`` naming it.

Integers are summed with wrap-around, so the digests are exact and independent of reduction order and
thread count: equal weights give equal digests on every rank and device.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import StoppingCriteriaList

from .hf_parallel import is_dtensor


class RankMismatchError(RuntimeError):
    """The ranks of a tensor-parallel group were given different work (raised on every rank alike)."""


class PeerRankFailed(RuntimeError):
    """Another rank of the group raised; this rank's collective could not complete."""


# --- the group ---------------------------------------------------------------------------------------------------------
@dataclass
class RankGroup:
    """The tensor-parallel group a model was applied over, and where its collectives' tensors must live."""

    group: dist.ProcessGroup | None  # None: a group of one rank, nothing to agree on
    rank: int  # this rank's index in the group
    size: int

    @property
    def active(self) -> bool:
        return self.group is not None and self.size > 1

    @property
    def device(self) -> torch.device:
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)


# --- digests -----------------------------------------------------------------------------------------------------------
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22
_MOD = 65521  # position weights cycle through 1 .. 65521, so a permutation of values changes the digest


def tensor_digest(t: torch.Tensor) -> tuple[int, int]:
    """(sum, position-weighted sum) of the tensor's bit patterns, in wrapping int64: exact, order independent."""
    flat = t.detach().reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        flat = flat.view(_INT_VIEW[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + part.numel(), device=flat.device, dtype=torch.int64) % _MOD + 1
        total += part.sum()
        weighted += (part * pos).sum()
    return int(total), int(weighted)


def weight_fingerprint(model: torch.nn.Module) -> tuple[int, int]:
    """A digest of every parameter and buffer: name, shape, dtype, and the values of what every rank holds whole.

    A plain tensor, or a DTensor replicated over its mesh, must be equal on every rank: its values are digested
    (a DTensor's local copy). A DTensor *sharded* by Hugging Face's tensor or expert parallelism holds a different
    block on each rank by design, and every block lives on one rank of the group only, so there is nothing to
    compare its values with: its global shape, dtype and placements enter the digest, its values do not (HF's
    loader reads each block from the checkpoint). A tensor on the meta device has no values either."""
    a = b = 0
    for i, (name, t) in enumerate([*model.named_parameters(), *model.named_buffers()]):
        values, placement = _comparable(t)
        s, w = tensor_digest(values) if values is not None else (0, 0)
        meta = _hash_int(f"{name}{tuple(t.shape)}{t.dtype}{placement}")
        a = _wrap(a + (i + 1) * s + meta)
        b = _wrap(b + (i + 1) * w)
    return a, b


def _comparable(t: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(the values every rank must hold alike or None, a description of the placement)."""
    if is_dtensor(t):
        placement = f"{tuple(map(str, t.placements))} on a mesh of {tuple(t.device_mesh.shape)}"
        local = t.to_local()
        return (local if all(p.is_replicate() for p in t.placements) and not local.is_meta else None), placement
    return (None if t.is_meta else t), ""


def _wrap(x: int) -> int:
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def float_bits(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _plain(value):
    """A JSON-able stand-in that is the same on every rank for equal settings (no addresses, no devices)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return type(value).__name__


def comparable_settings(settings: dict) -> dict:
    """The public generation settings (HF keeps per-call tensors under ``_`` names: they carry a device)."""
    return {k: json.loads(json.dumps(v, default=_plain)) for k, v in settings.items()
            if not k.startswith("_") and k != "transformers_version"}


def settings_digest(settings: dict) -> int:
    return _hash_int(json.dumps(settings, sort_keys=True))


# --- verification --------------------------------------------------------------------------------------------------------
def verify_same(group: RankGroup, fields: list[tuple[str, int]], what: str, details: dict | None = None) -> None:
    """All-gather the named integer ``fields`` over the group and raise ``RankMismatchError`` on every rank if
    any differs. ``details`` (any picklable dict) is gathered only when something differs, to name which of
    its entries do (e.g. the generation settings behind a digest)."""
    if not group.active:
        return
    values = torch.tensor([v for _, v in fields], dtype=torch.int64, device=group.device)
    gathered = [torch.empty_like(values) for _ in range(group.size)]
    dist.all_gather(gathered, values, group=group.group)
    table = torch.stack(gathered).cpu()
    differing = [i for i in range(len(fields)) if not bool((table[:, i] == table[0, i]).all())]
    if not differing:
        return
    lines = []
    for i in differing:
        per_rank = ", ".join(f"rank {r}: {table[r, i].item()}" for r in range(group.size))
        lines.append(f"  {fields[i][0]} differs ({per_rank})")
    if details is not None:
        every = [None] * group.size
        dist.all_gather_object(every, details, group=group.group)
        for key in sorted(set().union(*(d.keys() for d in every))):
            seen = [d.get(key) for d in every]
            if any(v != seen[0] for v in seen):
                lines.append(f"  {key} differs (" + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(seen)) + ")")
    raise RankMismatchError(
        f"the {group.size} ranks of the tensor-parallel group were given different {what}:\n" + "\n".join(lines)
        + "\nEvery rank must run the same model weights, inputs and generation settings (see README, 'Rules')."
    )


# --- sampling ------------------------------------------------------------------------------------------------------------
def sync_sampling_rng(group: RankGroup, device: torch.device) -> None:
    """Give every rank rank 0's generator state (the CPU one, and ``device``'s if it is a GPU)."""
    if not group.active:
        return
    src = group.global_rank(0)
    states = [(torch.get_rng_state, torch.set_rng_state)]
    if device.type == "cuda":
        states.append((lambda: torch.cuda.get_rng_state(device), lambda s: torch.cuda.set_rng_state(s, device)))
    for get, put in states:
        state = get().to(group.device)
        dist.broadcast(state, src=src, group=group.group)
        put(state.cpu())


class RankAgreedStopping(StoppingCriteriaList):
    """Stopping criteria whose per-sequence decision is the same on every rank: any rank's "done" counts."""

    def __init__(self, criteria, group: RankGroup):
        super().__init__(criteria)
        self.group = group

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = super().__call__(input_ids, scores, **kwargs)
        flags = done.to(device=self.group.device, dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group.group)
        return flags.to(done.device).bool()


# --- failures -------------------------------------------------------------------------------------------------------------
def is_collective_failure(exc: BaseException) -> bool:
    """Did a collective fail (a peer vanished, or it timed out), as opposed to this rank's own error?"""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(k in text for k in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout"))


class FailureRecords:
    """Names the rank that failed first, via the process group's key-value store (no collective)."""

    WAIT_FOR_PEER_S = 5.0  # a peer's record is written before its sockets close; allow for scheduling

    def __init__(self, group: RankGroup, name: str):
        self.group, self.name = group, name
        self.calls = 0
        self.depth = 0

    def _store(self):
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 — no store, no names: the original error stands
            return None

    @contextmanager
    def guard(self, what: str):
        """Around one collective request (a generate or a plain forward); nested calls share the outer one."""
        if not self.group.active or self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        self.calls += 1
        self.depth += 1
        key = f"dcp_compile/failure/{self.name}/{self.calls}"
        try:
            yield
        except BaseException as exc:
            store = self._store()
            if store is None:
                raise
            if is_collective_failure(exc):
                peer = self._wait_for_record(store, key)
                if peer is not None and peer[0] != self.group.rank:
                    raise PeerRankFailed(
                        f"rank {peer[0]} of the tensor-parallel group failed during {what} ({peer[1]}); this rank "
                        f"({self.group.rank}) could not complete its collective ({type(exc).__name__})"
                    ) from exc
            mine = f"{self.group.rank}|{type(exc).__name__}: {str(exc)[:1000]}"
            try:
                store.compare_set(key, "", mine)  # the first rank to fail keeps the record
            except Exception:  # noqa: BLE001
                pass
            raise
        finally:
            self.depth -= 1

    def _wait_for_record(self, store, key: str):
        deadline = time.monotonic() + self.WAIT_FOR_PEER_S
        while True:
            try:
                if store.check([key]):
                    rank, _, message = store.get(key).decode().partition("|")
                    return int(rank), message
            except Exception:  # noqa: BLE001 — the store itself may be gone with rank 0
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
