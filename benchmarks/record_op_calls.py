"""Record the ``dcp`` op calls (and the c10d functional collectives) a real forward makes: each call's op, the
phase it ran in (e.g. "prefill", "decode"), and every argument's dtype, shape, strides and scalar values.

    from record_op_calls import OpCallRecorder
    with OpCallRecorder() as rec:
        rec.phase = "prefill"; model(...)            # one prefill chunk
        rec.phase = "decode"; model(...)             # one decode step
    rec.save("calls.pt")                             # torch.save; a values-free twin calls.json for reading

``bench_e2e.py --record FILE`` records one prefill chunk and one decode step of its real-dims model this way;
``bench_kernels.py --recorded FILE`` times exactly those calls.

A TorchDispatchMode sees each custom op as one call (``dcp.sparse_mla_attn.default``...), with the arguments
the rewritten model really passes (e.g. the indexer query's dtype), so no op signature is written down twice.
Calls are grouped by signature (op, phase, argument metadata): the layers of a model make the same calls, so a
group holds one call's arguments and a count (calls of that signature per phase: per prefill chunk / per decode
step). The *values* of an argument are kept when they are what makes a call realistic and are small enough:
integer and bool tensors (slots, counts, positions, block tables, masks) up to ``int_values_limit`` elements,
float tensors (e.g. gathered top-k scores) up to ``float_values_limit``; large float tensors (queries, pools)
are recorded by metadata and a summary (mean, std) only. Values are copied before the call runs (paged_write
mutates its pool). Eager forwards only: a compiled graph runs its ops without the dispatch mode.

Lives in benchmarks/ because it is a benchmark tool; ops/ (the lower layer) knows nothing of it.
"""
from __future__ import annotations

import json
import pathlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RECORDED_NAMESPACES = ("dcp", "_c10d_functional")
FORMAT_VERSION = 1


def _summary(t: torch.Tensor) -> dict:
    if t.numel() == 0:
        return {}
    if t.dtype == torch.bool:
        return {"frac_true": t.float().mean().item()}
    if t.is_floating_point():
        finite = t[torch.isfinite(t)].double()
        return {"mean": finite.mean().item() if finite.numel() else 0.0,
                "std": finite.std().item() if finite.numel() > 1 else 0.0,
                "frac_neginf": (t == float("-inf")).double().mean().item()}
    v = t.long()
    return {"min": v.min().item(), "max": v.max().item(), "mean": v.double().mean().item(),
            "frac_negative": (v < 0).double().mean().item()}


def describe(value, int_values_limit: int = 0, float_values_limit: int = 0, keep_values: bool = False,
             summary: bool = True) -> dict:
    """What the benchmark needs to rebuild one argument (``summary=False``: metadata only, cheap)."""
    if isinstance(value, torch.Tensor):
        limit = float_values_limit if value.is_floating_point() else int_values_limit
        spec = {"kind": "tensor", "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "stride": list(value.stride()), "storage_offset": value.storage_offset(),
                "device": value.device.type}
        if summary:
            spec["summary"] = _summary(value.detach())
        if keep_values and value.numel() <= limit:
            spec["values"] = value.detach().to("cpu", copy=True)
        return spec
    if isinstance(value, (bool, int, float, str)) or value is None:
        return {"kind": "scalar", "value": value}
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value):
        return {"kind": "scalar", "value": list(value)}
    return {"kind": "other", "repr": repr(value)[:200]}


def _signature(op: str, phase, specs: list[dict]) -> tuple:
    def key(spec):
        if spec["kind"] == "tensor":
            return (spec["dtype"], tuple(spec["shape"]), tuple(spec["stride"]))
        return (spec["kind"], repr(spec.get("value", spec.get("repr"))))
    return (op, phase, tuple(key(s) for s in specs))


class OpCallRecorder(TorchDispatchMode):
    """A dispatch mode that records the calls of ops in ``namespaces`` (default: dcp and the c10d functional
    collectives). Set ``phase`` before each region; ``calls`` lists one dict per distinct call signature."""

    def __init__(self, namespaces=RECORDED_NAMESPACES, int_values_limit: int = 1 << 25,
                 float_values_limit: int = 1 << 24):
        super().__init__()
        self.namespaces = tuple(namespaces)
        self.int_values_limit, self.float_values_limit = int_values_limit, float_values_limit
        self.phase: str | None = None
        self.calls: list[dict] = []
        self._index: dict[tuple, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) in self.namespaces:
            self._record(func, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, func, args, kwargs) -> None:
        op = func.name()  # "dcp::sparse_mla_attn"
        names = [a.name for a in func._schema.arguments]
        values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        # The arguments' values only for ops we time (collectives: metadata is enough).
        keep = func.namespace == "dcp"
        specs = [describe(v, summary=False) for v in values]
        sig = _signature(op, self.phase, specs)
        if sig in self._index:
            self._index[sig]["count"] += 1
            return
        specs = [describe(v, self.int_values_limit, self.float_values_limit, keep) for v in values]
        for spec, name in zip(specs, names):
            spec["name"] = name
        call = {"op": op, "phase": self.phase, "count": 1, "args": specs,
                "mutates": [a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]}
        self._index[sig] = call
        self.calls.append(call)

    def save(self, path, info: dict | None = None) -> pathlib.Path:
        """torch.save the calls (values included) to ``path`` and a values-free JSON twin next to it."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": FORMAT_VERSION, "info": info or {}, "calls": self.calls}
        torch.save(record, path)
        readable = {**record, "calls": [{**c, "args": [{k: v for k, v in a.items() if k != "values"} for a in c["args"]]}
                                        for c in self.calls]}
        path.with_suffix(".json").write_text(json.dumps(readable, indent=1, default=str))
        return path


def load_calls(path) -> dict:
    record = torch.load(path, weights_only=False)
    if record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: recorded op calls of format {record.get('format')!r}, this reader knows "
                         f"{FORMAT_VERSION}")
    return record


def summarise(calls: list[dict]) -> list[str]:
    """One line per call: phase, count, op, then each tensor argument as name=dtype[shape]."""
    lines = []
    for c in calls:
        parts = []
        for a in c["args"]:
            if a["kind"] == "tensor":
                parts.append(f"{a['name']}={a['dtype']}{a['shape']}")
            elif a["kind"] == "scalar":
                parts.append(f"{a['name']}={a['value']!r}")
        lines.append(f"{c['phase'] or '-':8s} x{c['count']:<3d} {c['op']}({', '.join(parts)})")
    return lines
