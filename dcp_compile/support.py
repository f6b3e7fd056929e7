"""Whether dcp_compile can rewrite a model, and if not, which layer and which piece stand in the way.

``apply`` calls two checks; both raise ``UnsupportedModelError`` before any collective of ``apply``, and as
each is a deterministic function of the model and its weights, every rank raises the same error.

* ``check_model(model)``, first thing, before any forward pass (the forward of a sharded model runs
  collectives): DTensor parameters that transformers' tensor/expert parallelism did not place, or a model
  loaded with FSDP or pipeline stages, or FP8 linears whose block scales HF split unlike their weights
  (``fp8.check_fp8_shards``). A model loaded with HF tensor (and expert) parallelism is accepted; its
  attention layers are checked once matched (``shard.check_head_shards``).
* ``check_layers(model, layers)``, after the probe found the layers that call ``cache.update``: one more
  probe step runs with a cache that records every other use of the cache. An attention layer may use the
  cache only through ``cache.update`` / ``cache.update_indexer`` (what the trace and the sharded cache
  model), and no other module may use it but the model around the layers (its bookkeeping, such as
  ``get_seq_length``). A layer without an indexer is dense MLA or reuses an earlier layer's top-k (the match
  tells which); one that reuses the top-k of a layer rejected here is named as such.
"""
from __future__ import annotations

import inspect
from collections.abc import MutableMapping

import torch
from torch import nn

from .capture import BATCH, STEP, ProbedTensor, ProbeCache, run_probe
from .hf_parallel import is_dtensor

_TRACEABLE = {"update", "update_indexer"}  # what CaptureCache stands in for


class UnsupportedModelError(ValueError):
    """The model is not one dcp_compile can rewrite: a layer that is not MLA sparse attention, or sharded already."""


# --- a model sharded already -----------------------------------------------------------------------------------------
def check_model(model: nn.Module) -> None:
    """Before any forward: a model holding DTensor parameters must have been parallelised by transformers'
    tensor/expert parallelism (``from_pretrained(distributed_config=DistributedConfig(tp_plan=..., ep_size=...))``),
    without FSDP or pipeline stages. Which attention weights HF sharded is checked per layer once the layers are
    matched (``shard.check_head_shards``): HF's sharding of the attention heads is adopted, any other is rejected."""
    sharded = [n for n, p in model.named_parameters() if is_dtensor(p)]
    config = getattr(getattr(model, "config", None), "distributed_config", None)  # public: set by from_pretrained
    tp_size = getattr(model, "tp_size", None) or 1  # public: None unless from_pretrained applied a tp_plan
    some = f"{len(sharded)} parameters are DTensor shards ({', '.join(sharded[:3])}{', ...' if len(sharded) > 3 else ''})"
    if config is not None and (config.dp_size > 1 or config.pp_size > 1):
        raise UnsupportedModelError(
            f"{type(model).__name__} was loaded with {'FSDP' if config.dp_size > 1 else 'pipeline parallelism'} "
            f"(dp_size={config.dp_size}, pp_size={config.pp_size}): dcp_compile composes with Hugging Face tensor and "
            f"expert parallelism (DistributedConfig(tp_plan='auto', ep_size=...)) only"
        )
    if sharded and config is None and tp_size <= 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}: {some}, not placed by transformers' tensor parallelism: dcp_compile.apply takes "
            f"a model loaded whole on every rank, or one loaded with from_pretrained(distributed_config="
            f"DistributedConfig(tp_plan='auto')) (apply then adopts HF's head shards); apply it before sharding the "
            f"model otherwise"
        )
    if sharded:
        from .fp8 import check_fp8_shards

        check_fp8_shards(model)  # HF's FP8 shards: each rank's scales are those of its weight's blocks


# --- what each module does with the cache, seen by one more probe step ------------------------------------------------
class _WatchedCache(ProbeCache):
    """The probe's cache, also recording (module, attribute) for every use of the cache beyond the probe's own,
    and ``layers[i].<attribute>`` for what is read off a cache layer directly."""

    _inside = False  # True while the cache's own code runs: its internal accesses are not the model's

    def __init__(self, config, stack):
        object.__setattr__(self, "uses", [])
        object.__setattr__(self, "_inside", True)
        super().__init__(config, stack)
        object.__setattr__(self, "_inside", False)

    def __getattribute__(self, name):
        get = object.__getattribute__
        if name.startswith("_") or get(self, "_inside"):
            return get(self, name)
        object.__setattr__(self, "_inside", True)
        try:
            value = get(self, name)
        finally:
            object.__setattr__(self, "_inside", False)
        stack = get(self, "stack")
        if not stack:  # the probe driver, outside the model
            return value
        owner, uses = stack[-1], get(self, "uses")
        if name == "layers":
            return _LayersView(value, lambda attr: uses.append((owner, f"layers[i].{attr}")))
        uses.append((owner, name))
        if inspect.ismethod(value):
            def run(*args, **kwargs):
                object.__setattr__(self, "_inside", True)
                try:
                    return value(*args, **kwargs)
                finally:
                    object.__setattr__(self, "_inside", False)
            return run
        return value


class _LayersView:
    def __init__(self, layers, note):
        self._layers, self._note = layers, note

    def __len__(self):
        return len(self._layers)

    def __getitem__(self, i):
        return _LayerView(self._layers[i], self._note)

    def __iter__(self):
        return (_LayerView(layer, self._note) for layer in self._layers)


class _LayerView:
    __slots__ = ("_layer", "_note")

    def __init__(self, layer, note):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_note", note)

    def __getattr__(self, name):
        self._note(name)
        return getattr(self._layer, name)

    def __setattr__(self, name, value):
        self._note(name)
        setattr(self._layer, name, value)


def _cache_uses(model: nn.Module) -> tuple[dict[nn.Module, list[str]], dict[nn.Module, list[str]]]:
    """Per module (the innermost running), the cache attributes it used in one probe step, in first-use order;
    and per module, the dict arguments it stored tensors into (state handed to other layers outside the cache)."""
    stores: dict[nn.Module, list[str]] = {}
    before: dict[nn.Module, list] = {}

    def pre(module, args, kwargs):
        before[module] = [(name, d, dict(d)) for name, d in kwargs.items() if isinstance(d, MutableMapping)]

    def post(module, args, kwargs, out):
        for name, d, old in before.pop(module, []):
            changed = d.keys() != old.keys() or any(d[k] is not v for k, v in old.items())
            if changed and name not in stores.setdefault(module, []):
                stores[module].append(name)

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                                     m.register_forward_hook(post, with_kwargs=True))]
    try:
        _, cache = run_probe(model, 1, 4, 1, cache_cls=_WatchedCache)
    except Exception:  # noqa: BLE001 — the watch itself tripped the model (the plain probe ran): nothing to report
        return {}, {}
    finally:
        for h in handles:
            h.remove()
    uses: dict[nn.Module, list[str]] = {}
    for module, attr in cache.uses:
        if attr not in uses.setdefault(module, []):
            uses[module].append(attr)
    return uses, stores


# --- the layers the probe found ---------------------------------------------------------------------------------------
def check_layers(model: nn.Module, layers: list) -> None:
    """Raise ``UnsupportedModelError`` naming every layer (or other module) dcp_compile cannot rewrite and why."""
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__}: no layer updates a KV cache; nothing to rewrite")
    names = {m: n for n, m in model.named_modules()}
    uses, stores = _cache_uses(model)
    problems: list[tuple[str, str]] = []  # ("layer <name>", why); the why does not repeat the name
    inside = set()
    selecting = None  # (name, rejected) of the last layer with an indexer of its own
    for layer in layers:
        sub = {m: (n and f"`{n}`") for n, m in layer.module.named_modules()}
        inside |= sub.keys()
        extra = {m: [a for a in attrs if a not in _TRACEABLE] for m, attrs in uses.items() if m in sub}
        extra = {m: attrs for m, attrs in extra.items() if attrs}
        if layer.module in stores:
            problems.append((f"layer {layer.name}", (
                f"stores its latent cache rows in {', '.join(f'`{a}`' for a in stores[layer.module])} for later layers "
                f"to attend (cross-layer KV sharing): under DCP no rank holds those rows whole, and a layer reading "
                f"them does not call cache.update, so dcp_compile cannot rewrite either")))
        elif extra:
            indexer = model.get_submodule(layer.indexer_module) if layer.indexer_module else None
            problems.append((f"layer {layer.name}", _own_cache_state(layer, sub, extra, indexer)))
        elif (heads := _cached_heads(layer)) > 1:
            problems.append((f"layer {layer.name}", (
                f"caches {heads} key/value heads per token (multi-head or grouped-query attention): it is not "
                f"multi-head latent attention (MLA caches one latent row per token, shared by all heads), which is "
                f"what dcp_compile rewrites")))
        elif layer.index_rows is None and _handed(layer) and selecting and selecting[1]:
            # A layer without an indexer is dense MLA or reuses an earlier layer's top-k (the match tells which);
            # reusing the top-k of a layer dcp_compile cannot rewrite is not supported either.
            problems.append((f"layer {layer.name}", _no_indexer(layer, selecting[0])))
        if layer.index_rows is not None:
            selecting = (layer.name, bool(extra))
    # Any other module using the cache that is not the model around the layers (its cache bookkeeping, e.g.
    # get_seq_length) keeps state of its own there.
    around = {m for layer in layers for m in _ancestors(model, layer.name)}
    for module, attrs in uses.items():
        if module not in inside and module not in around and attrs == ["update_indexer"]:
            problems.append((f"module {names[module]}", (
                "uses cache.update_indexer, but its attention layer never calls cache.update: a layer attending a "
                "latent cache it does not write (another layer's: cross-layer KV sharing), which dcp_compile "
                "cannot rewrite")))
        elif module not in inside and module not in around:
            problems.append((f"module {names[module]}", (
                f"uses {_calls(attrs)}: it keeps state of its own in the cache (not attention keys: linear-attention "
                f"or recurrent state, say), which the sharded DCP cache does not hold")))
    if problems:
        raise UnsupportedModelError(_report(model, problems))


def _ancestors(model: nn.Module, name: str):
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]


def _calls(attrs: list[str]) -> str:
    direct = [f"cache.{a}" for a in attrs if not a.startswith("layers[")]
    via_layer = [a.partition("].")[2] for a in attrs if a.startswith("layers[")]
    return ", ".join(direct + ([f"cache.layers[i].{' / '.join(via_layer)}"] if via_layer else []))


def _own_cache_state(layer, sub: dict, extra: dict, indexer: nn.Module | None) -> str:
    """A layer that uses the cache beyond cache.update / cache.update_indexer: its indexer, or a compressor."""
    parts = []
    for module, attrs in extra.items():
        who = sub[module] or "the layer itself"
        if module is indexer:
            pool = getattr(module, "index_kpool", None)
            pooled = (f"is a pooled indexer (it scores pools of index_kpool={pool} tokens, each pool's keys merged by "
                      f"a learned gate, not single tokens) and ") if pool and pool > 1 else ""
            parts.append(f"its DSA indexer {who} {pooled}reads its cache layer directly ({_calls(attrs)}) besides "
                         f"cache.update_indexer")
        elif sub[module].rstrip("`").endswith("indexer"):
            parts.append(f"its indexer {who} scores entries of that cache state of its own ({_calls(attrs)}), not keys "
                         f"written by cache.update_indexer")
        else:
            parts.append(f"{who} uses {_calls(attrs)}")
    if list(extra) == [indexer]:
        head = ""
    elif any("compress" in a for attrs in extra.values() for a in attrs):
        head = "keeps a compressed KV cache of its own, beside what it writes through cache.update"
    else:
        head = "uses the cache beyond cache.update / cache.update_indexer"
    kind = _config_value(layer.module, "layer_types", layer.layer_idx)
    lead = " ".join(x for x in (f"(layer type {kind!r})" if kind else "", head) if x)
    return (f"{lead}: {'; '.join(parts)}. dcp_compile shards only the rows a layer writes through cache.update and "
            f"cache.update_indexer and selects single tokens, so it cannot rewrite this layer yet")


def _cached_heads(layer) -> int:
    """Heads per token of the rows the layer gives cache.update ([batch, heads, step, width] as HF lays them out)."""
    rows = layer.key_rows
    return rows.shape[1] if len(rows.shape) == 4 and rows.roles[2] == STEP else 1


def _handed(layer) -> list[str]:
    """The layer's integer [batch, step, ...] keyword inputs: another layer's top-k selection handed to it."""
    return [f"`{k}`" for k, v in (layer.call[1] or {}).items()
            if isinstance(v, ProbedTensor) and not v.dtype.is_floating_point and v.dtype != torch.bool
            and len(v.shape) >= 3 and BATCH in v.roles and STEP in v.roles]


def _no_indexer(layer, source: str) -> str:
    return (f"has no DeepSeek Sparse Attention indexer of its own: it reuses the top-k selection "
            f"({', '.join(_handed(layer))}) of layer {source}, which dcp_compile cannot rewrite, so it cannot "
            f"rewrite this one either")


def _config_value(module: nn.Module, field: str, index: int):
    values = getattr(getattr(module, "config", None), field, None)
    return values[index] if isinstance(values, (list, tuple)) and 0 <= index < len(values) else None


def _report(model: nn.Module, problems: list[tuple[str, str]]) -> str:
    """One line per distinct reason, naming the first module with it and how many more share it."""
    grouped: dict[str, list[str]] = {}
    for name, why in problems:
        grouped.setdefault(why, []).append(name)
    lines = []
    for why, names in grouped.items():
        more = f" (and {len(names) - 1} more: {', '.join(names[1:4])}{', ...' if len(names) > 4 else ''})" if len(names) > 1 else ""
        lines.append(f"{names[0]}{more}{'' if why.startswith(':') else ' '}{why}")
    if len(lines) == 1:
        return lines[0]
    return f"{type(model).__name__} has {len(lines)} kinds of module dcp_compile cannot rewrite:\n" + "\n".join(f"  - {x}" for x in lines)
