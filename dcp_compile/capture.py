"""Capture: find the attention layers of an unmodified HF model and trace each one to an FX graph.

**Finding layers (the probe).** Two tiny forward passes run with a recording cache. The innermost module
running when ``cache.update`` is called is an attention layer; if ``cache.update_indexer`` is called under
it, it has a DSA indexer. Every tensor the layer was called with is recorded; comparing the two probes
(batch 2 / past 5 / step 3, then batch 3 / past 6 / step 4) tells which dims are batch, step (query
tokens) and total (past + step) — dims that did not change are static. Nothing here names a model class.

**Tracing.** ``make_fx(pre_dispatch=True)`` over ``functional_call(layer, params, args, kwargs)``, with
symbolic batch/step/past sizes. Why make_fx and not Dynamo or ``torch.export``: make_fx runs HF's Python
(config branches, ``dtype`` checks, ``min(topk, length)``) as Python and records only tensor ops, so
nothing in the layer needs to be export-friendly; ``pre_dispatch`` keeps ``aten.linear`` / ``aten.matmul``
/ ``softmax`` / ``scaled_dot_product_attention`` whole, which is the level at which the layer's dataflow
reads like the design doc. The cache boundary stays visible: during tracing the layer gets a
``CaptureCache`` whose ``update`` / ``update_indexer`` are the ops ``dcp_capture::cache_update`` /
``dcp_capture::indexer_update`` (concatenate past and new rows), so the graph shows which tensors go into
the cache and where the full cache is read back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from transformers.cache_utils import DynamicCache

# --- the cache-boundary ops seen in captured graphs ---------------------------------------------------------------


@torch.library.custom_op("dcp_capture::cache_update", mutates_args=())
def cache_update(key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Marker for ``cache.update(key, value)``: returns the full cached key/value (past ‖ new along ``dim``)."""
    return torch.cat([past_key, key], dim), torch.cat([past_value, value], dim)


@cache_update.register_fake
def _(key, value, past_key, past_value, dim):
    return torch.cat([past_key, key], dim), torch.cat([past_value, value], dim)


@torch.library.custom_op("dcp_capture::indexer_update", mutates_args=())
def indexer_update(key: torch.Tensor, past_key: torch.Tensor, dim: int) -> torch.Tensor:
    """Marker for ``cache.update_indexer(key)``: returns the full cached indexer keys."""
    return torch.cat([past_key, key], dim)


@indexer_update.register_fake
def _(key, past_key, dim):
    return torch.cat([past_key, key], dim)


class CaptureCache:
    """Stands in for the HF cache while a layer is traced; its updates are the marker ops above."""

    def __init__(self, past_key, past_value, past_index, step_dims):
        self.past_key, self.past_value, self.past_index = past_key, past_value, past_index
        self.key_dim, self.value_dim, self.index_dim = step_dims

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return torch.ops.dcp_capture.cache_update(key_states, value_states, self.past_key, self.past_value, self.key_dim)

    def update_indexer(self, key_states, layer_idx):
        if self.past_index is None:
            raise CaptureError("the layer called cache.update_indexer, but the probe never saw it do so")
        return torch.ops.dcp_capture.indexer_update(key_states, self.past_index, self.index_dim)


class CaptureError(RuntimeError):
    pass


# --- the probe -----------------------------------------------------------------------------------------------------
BATCH, STEP, TOTAL = "batch", "step", "total"
# (batch, past, step) of the two probes; their sizes are distinct so each dim's role is unambiguous.
PROBES = ((2, 5, 3), (3, 6, 4))


@dataclass
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    roles: tuple[str | None, ...] = ()  # per dim: batch / step / total / None (static)


@dataclass
class LayerCall:
    """One attention layer as the probe saw it."""

    name: str  # module path in the model
    module: nn.Module
    layer_idx: int  # the cache index it updates
    arg_names: tuple[str, ...]  # forward's positional parameter names
    call: Any  # (args, kwargs) with tensors replaced by TensorSpec and the cache by CACHE
    key_spec: TensorSpec | None = None  # the new rows given to cache.update
    value_spec: TensorSpec | None = None
    index_spec: TensorSpec | None = None  # the new rows given to cache.update_indexer
    indexer_module: str | None = None


class _CacheSlot:
    """Placeholder for the cache argument inside a recorded call."""

    def __repr__(self):
        return "CACHE"


CACHE = _CacheSlot()


def _spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), t.dtype, t.device)


class _ProbeCache(DynamicCache):
    def __init__(self, config, stack):
        super().__init__(config=config)
        self.stack, self.updates, self.index_updates = stack, [], []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.updates.append((self.stack[-1] if self.stack else None, layer_idx, _spec(key_states), _spec(value_states)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def update_indexer(self, key_states, layer_idx):
        self.index_updates.append((list(self.stack), layer_idx, _spec(key_states)))
        return super().update_indexer(key_states, layer_idx)


def _run_probe(model: nn.Module, batch: int, past: int, step: int, cache_cls=_ProbeCache):
    """Prefill ``past`` tokens, then record a step of ``step`` tokens; returns per-module calls and cache events."""
    stack: list[nn.Module] = []
    calls: dict[nn.Module, Any] = {}
    handles = []

    def pre(mod, args, kwargs):
        stack.append(mod)
        calls[mod] = (args, kwargs)

    def post(mod, args, kwargs, out):
        stack.pop()

    cfg = model.config
    vocab = getattr(cfg, "vocab_size", 2)
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, past + step), generator=gen).to(device)
    with torch.no_grad():
        cache = cache_cls(cfg, stack)
        model(input_ids=ids[:, :past], cache=cache, use_cache=True)
        cache.updates.clear(), cache.index_updates.clear()
        for mod in model.modules():
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
        try:
            model(input_ids=ids[:, past:], cache=cache, use_cache=True)
        finally:
            for h in handles:
                h.remove()
    return calls, cache


def _record(value, cache):
    if isinstance(value, torch.Tensor):
        return _spec(value)
    if value is cache:
        return CACHE
    return value


def probe_layers(model: nn.Module) -> list[LayerCall]:
    """The attention layers of ``model`` (modules that call ``cache.update``), in cache order."""
    import inspect

    runs = [_run_probe(model, *p) for p in PROBES]
    names = {mod: name for name, mod in model.named_modules()}
    layers: list[LayerCall] = []
    for probe_i, (calls, cache) in enumerate(runs):
        for j, (mod, layer_idx, kspec, vspec) in enumerate(cache.updates):
            if mod is None:
                raise CaptureError(f"cache.update for layer {layer_idx} was called outside any module")
            args, kwargs = calls[mod]
            call = pytree.tree_map(lambda v: _record(v, cache), (args, kwargs))
            index = [(s, li, spec) for s, li, spec in cache.index_updates if mod in s and li == layer_idx]
            if probe_i == 0:
                params = [p.name for p in inspect.signature(mod.forward).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                layers.append(LayerCall(
                    names[mod], mod, layer_idx, tuple(params), call, kspec, vspec,
                    index[0][2] if index else None, names[index[0][0][-1]] if index else None,
                ))
            else:
                _assign_roles(layers[j], call, kspec, vspec, index[0][2] if index else None)
    return layers


def _roles(a: TensorSpec, b: TensorSpec, where: str) -> tuple[str | None, ...]:
    (b0, p0, s0), (b1, p1, s1) = PROBES
    table = {(b0, b1): BATCH, (s0, s1): STEP, (p0 + s0, p1 + s1): TOTAL}
    roles = []
    for d, (x, y) in enumerate(zip(a.shape, b.shape)):
        if x == y:
            roles.append(None)
        elif (x, y) in table:
            roles.append(table[(x, y)])
        else:
            raise CaptureError(f"{where}: dim {d} went {x} -> {y} between probes; it is not batch, step or total length")
    return tuple(roles)


def _assign_roles(layer: LayerCall, call, kspec, vspec, ispec) -> None:
    first = pytree.tree_leaves(layer.call, is_leaf=lambda v: isinstance(v, TensorSpec))
    second = pytree.tree_leaves(call, is_leaf=lambda v: isinstance(v, TensorSpec))
    if len(first) != len(second):
        raise CaptureError(f"layer {layer.name} was called differently by the two probes")
    for a, b in zip(first, second):
        if isinstance(a, TensorSpec):
            a.roles = _roles(a, b, f"layer {layer.name} input")
    for a, b in ((layer.key_spec, kspec), (layer.value_spec, vspec), (layer.index_spec, ispec)):
        if a is not None:
            a.roles = _roles(a, b, f"layer {layer.name} cache row")


# --- tracing one layer ------------------------------------------------------------------------------------------------
@dataclass
class CapturedLayer:
    graph_module: torch.fx.GraphModule
    param_names: list[str]  # placeholder i (i < len) is this parameter of the layer
    input_paths: list[tuple]  # the layer-call tensors fed to the next placeholders, as pytree key paths
    out_spec: Any  # pytree spec of the layer's output
    past_len: int  # the past length the trace used (> the indexer's top-k)
    extra: dict = field(default_factory=dict)


def _key_path(path) -> tuple:
    return tuple(getattr(k, "idx", getattr(k, "key", None)) for k in path)


def get_path(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _dims_for(spec: TensorSpec, sizes: dict[str, int]) -> list[int]:
    return [sizes[r] if r else s for s, r in zip(spec.shape, spec.roles)]


def trace_layer(layer: LayerCall, past_len: int) -> CapturedLayer:
    """Trace ``layer`` with symbolic batch/step/past at sizes (2, 3, past_len)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    sizes = {BATCH: 2, STEP: 3, TOTAL: past_len + 3}
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(spec: TensorSpec, sizes=sizes, past=False):
        shape = _dims_for(spec, sizes)
        dyn = [DimDynamic.DUCK if r else DimDynamic.STATIC for r in spec.roles]
        if past:  # the past rows: the step dim becomes the past length
            shape = [past_len if r == STEP else s for s, r in zip(shape, spec.roles)]
        real = torch.empty(shape, dtype=spec.dtype, device=spec.device)
        return mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))

    def static(t):
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * t.dim()))

    named = [(n, p) for n, p in layer.module.named_parameters()] + [(n, b) for n, b in layer.module.named_buffers()]
    param_names = [n for n, _ in named]
    params = [static(t) for _, t in named]

    leaves, spec = pytree.tree_flatten_with_path(layer.call, is_leaf=lambda v: isinstance(v, (TensorSpec, _CacheSlot)))
    input_paths = [_key_path(p) for p, v in leaves if isinstance(v, TensorSpec)]
    inputs = [fake(v) for _, v in leaves if isinstance(v, TensorSpec)]

    def step_dim(s: TensorSpec) -> int:
        if STEP not in s.roles:
            raise CaptureError(f"layer {layer.name}: a cache row has no step dimension: {s}")
        return s.roles.index(STEP)

    pasts = [fake(layer.key_spec, past=True), fake(layer.value_spec, past=True)]
    pasts.append(fake(layer.index_spec, past=True) if layer.index_spec is not None else None)
    dims = (step_dim(layer.key_spec), step_dim(layer.value_spec),
            step_dim(layer.index_spec) if layer.index_spec is not None else None)
    module = layer.module
    out_holder = {}

    def run(params, inputs, past_key, past_value, past_index):
        it = iter(inputs)
        cache = CaptureCache(past_key, past_value, past_index, dims)
        values = [next(it) if isinstance(v, TensorSpec) else (cache if isinstance(v, _CacheSlot) else v) for _, v in leaves]
        args, kwargs = pytree.tree_unflatten(values, spec)
        out = torch.func.functional_call(module, dict(zip(param_names, params)), tuple(args), kwargs)
        flat, out_holder["spec"] = pytree.tree_flatten(out)
        return flat

    with mode:
        gm = make_fx(run, tracing_mode="symbolic", pre_dispatch=True)(params, inputs, *pasts)
    return CapturedLayer(gm, param_names, input_paths, out_holder["spec"], past_len,
                         extra={"num_params": len(params), "num_inputs": len(inputs)})
