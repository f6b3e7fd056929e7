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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from transformers.cache_utils import DynamicCache

from .contract import InputKind, label, placeholders
from .fp8 import traced_fp8_linears
from .hf_parallel import is_dtensor

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
class ProbedTensor:
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
    call: Any  # (args, kwargs) with tensors replaced by ProbedTensor and the cache by CACHE
    key_rows: ProbedTensor | None = None  # the new rows given to cache.update
    value_rows: ProbedTensor | None = None
    index_rows: ProbedTensor | None = None  # the new rows given to cache.update_indexer
    indexer_module: str | None = None  # the module that called cache.update_indexer (named in errors)
    # Submodules (names in the layer) whose forward the instance replaced to run it in parallel (HF tensor
    # parallelism wraps its sharded linears so): the trace runs their class's own forward, see trace_layer.
    wrapped: tuple[str, ...] = ()


class _CacheSlot:
    """Placeholder for the cache argument inside a recorded call."""

    def __repr__(self):
        return "CACHE"


CACHE = _CacheSlot()


def _probed(t: torch.Tensor) -> ProbedTensor:
    return ProbedTensor(tuple(t.shape), t.dtype, t.device)


class ProbeCache(DynamicCache):
    def __init__(self, config, stack):
        super().__init__(config=config)
        self.stack, self.updates, self.index_updates = stack, [], []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.updates.append((self.stack[-1] if self.stack else None, layer_idx, _probed(key_states), _probed(value_states)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def update_indexer(self, key_states, layer_idx):
        self.index_updates.append((list(self.stack), layer_idx, _probed(key_states)))
        return super().update_indexer(key_states, layer_idx)


def run_probe(model: nn.Module, batch: int, past: int, step: int, cache_cls=ProbeCache):
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
        return _probed(value)
    if value is cache:
        return CACHE
    return value


def probe_layers(model: nn.Module) -> list[LayerCall]:
    """The attention layers of ``model`` (modules that call ``cache.update``), in cache order."""
    import inspect

    runs = [run_probe(model, *p) for p in PROBES]
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
                layers.append(LayerCall(names[mod], mod, layer_idx, tuple(params), call, kspec, vspec,
                                        index[0][2] if index else None, names[index[0][0][-1]] if index else None))
            else:
                _assign_roles(layers[j], call, kspec, vspec, index[0][2] if index else None)
    return layers


def _roles(a: ProbedTensor, b: ProbedTensor, where: str) -> tuple[str | None, ...]:
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
    first = pytree.tree_leaves(layer.call, is_leaf=lambda v: isinstance(v, ProbedTensor))
    second = pytree.tree_leaves(call, is_leaf=lambda v: isinstance(v, ProbedTensor))
    if len(first) != len(second):
        raise CaptureError(f"layer {layer.name} was called differently by the two probes")
    for a, b in zip(first, second):
        if isinstance(a, ProbedTensor):
            a.roles = _roles(a, b, f"layer {layer.name} input")
    for a, b in ((layer.key_rows, kspec), (layer.value_rows, vspec), (layer.index_rows, ispec)):
        if a is not None:
            a.roles = _roles(a, b, f"layer {layer.name} cache row")


# --- tracing one layer ------------------------------------------------------------------------------------------------
@dataclass
class CapturedLayer:
    """One attention layer as a flat FX graph whose placeholders are labelled (``contract.GraphInput``), with
    what the installer needs to call it like the original layer."""

    graph_module: torch.fx.GraphModule
    out_tree: Any  # pytree structure of the layer's output
    past_len: int  # the past length the trace used (> every top-k size)
    cache_path: tuple  # where the cache is in the layer's (args, kwargs)
    step_path: tuple  # an input with a query-token dimension, and that dimension
    step_dim: int
    mask: torch.fx.Node | None  # the placeholder of the attention mask (the input with a total-length dim)
    traces: int = 1  # make_fx runs it took (the past length grows until every top-k size is a constant)
    config_reads: frozenset[str] = frozenset()  # the model config attributes the traced code read

    def params(self) -> set[torch.fx.Node]:
        return set(placeholders(self.graph_module, InputKind.PARAM)) | set(placeholders(self.graph_module, InputKind.BUFFER))


def _key_path(path) -> tuple:
    return tuple(getattr(k, "idx", getattr(k, "key", None)) for k in path)


def _leaves(layer: LayerCall):
    return pytree.tree_flatten_with_path(layer.call, is_leaf=lambda v: isinstance(v, (ProbedTensor, _CacheSlot)))


def _dims_for(spec: ProbedTensor, sizes: dict[str, int]) -> list[int]:
    return [sizes[r] if r else s for s, r in zip(spec.shape, spec.roles)]


# The trace's past length must exceed every top-k size in the layer (HF takes min(topk, length): a shorter
# trace would record the length, not the constant). It starts odd and unlike the other traced sizes (batch 2,
# step 3) so no two symbolic sizes are unified, and grows until every top-k size is a constant: past the
# largest constant a size was compared with in the failed trace (``min(topk, length)`` leaves the guard
# ``length < topk``), or 4x, whichever is more — one retrace for DeepSeek-V3.2's top-k 2048.
FIRST_PAST_LEN = 61
MAX_PAST_LEN = 1 << 22


def _next_past_len(gm: torch.fx.GraphModule, past_len: int) -> int:
    import sympy

    bounds = [0]
    env = next((n.meta["val"].fake_mode.shape_env for n in gm.graph.nodes
                if isinstance(n.meta.get("val"), torch.Tensor) and hasattr(n.meta["val"], "fake_mode")), None)
    for guard in getattr(env, "guards", ()):
        if isinstance(guard.expr, (sympy.StrictLessThan, sympy.LessThan, sympy.StrictGreaterThan, sympy.GreaterThan)):
            bounds += [int(c) for c in guard.expr.atoms(sympy.Integer) if int(c) < MAX_PAST_LEN]
    return max(past_len * 4 + 3, max(bounds) + FIRST_PAST_LEN)


def capture_layer(layer: LayerCall, past_len: int = FIRST_PAST_LEN) -> CapturedLayer:
    """Trace ``layer`` (growing the past length as needed) into a flat, labelled ``CapturedLayer``."""
    traces = 0
    with _recording_config_reads(layer.module) as reads:
        while True:
            gm, out_tree = trace_layer(layer, past_len)
            traces += 1
            topk_sizes = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.topk.default]
            if all(isinstance(k, int) for k in topk_sizes) or past_len > MAX_PAST_LEN:
                break
            past_len = _next_past_len(gm, past_len)
    _flat_codegen(gm)
    _label_placeholders(layer, gm)
    leaves, _ = _leaves(layer)
    cache_path = next(_key_path(p) for p, v in leaves if isinstance(v, _CacheSlot))
    step = next(((_key_path(p), v.roles.index(STEP)) for p, v in leaves if isinstance(v, ProbedTensor) and STEP in v.roles), None)
    if step is None:
        raise CaptureError(f"layer {layer.name}: no input has a query-token dimension")
    inputs = placeholders(gm, InputKind.INPUT)
    specs = [v for _, v in leaves if isinstance(v, ProbedTensor)]
    # The attention mask: the (bool or additive float) input with a total-length dim. An integer input may have
    # one too (another layer's top-k indices, while the probes are shorter than the top-k): not a mask.
    masks = [node for node, spec in zip(inputs, specs)
             if TOTAL in spec.roles and (spec.dtype.is_floating_point or spec.dtype == torch.bool)]
    return CapturedLayer(gm, out_tree, past_len, cache_path, step[0], step[1], masks[0] if len(masks) == 1 else None,
                         traces, frozenset(reads))


def _flat_codegen(gm: torch.fx.GraphModule) -> None:
    """make_fx wraps inputs/outputs in pytrees; the installer calls the graph with a flat argument list."""
    gm.graph._codegen = torch.fx.graph.CodeGen()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], (list, tuple)):
        out.args = ([out.args[0]],)
    gm.recompile()


def _label_placeholders(layer: LayerCall, gm: torch.fx.GraphModule) -> None:
    """Placeholders come in trace order: parameters, buffers, the call's tensors, then the past cache rows."""
    params = [n for n, _ in layer.module.named_parameters()]
    buffers = [n for n, _ in layer.module.named_buffers()]
    leaves, _ = _leaves(layer)
    inputs = [_key_path(p) for p, v in leaves if isinstance(v, ProbedTensor)]
    labels = [(InputKind.PARAM, n) for n in params] + [(InputKind.BUFFER, n) for n in buffers]
    labels += [(InputKind.INPUT, path) for path in inputs]
    nodes = placeholders(gm)
    labels += [(InputKind.PAST, i) for i in range(len(nodes) - len(labels))]
    for node, (kind, what) in zip(nodes, labels):
        label(node, kind, what)


def trace_layer(layer: LayerCall, past_len: int):
    """make_fx of ``layer`` with symbolic batch/step/past at sizes (2, 3, past_len): (graph, output tree)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    sizes = {BATCH: 2, STEP: 3, TOTAL: past_len + 3}
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(spec: ProbedTensor, sizes=sizes, past=False):
        shape = _dims_for(spec, sizes)
        dyn = [DimDynamic.DUCK if r else DimDynamic.STATIC for r in spec.roles]
        if past:  # the past rows: the step dim becomes the past length
            shape = [past_len if r == STEP else s for s, r in zip(shape, spec.roles)]
        real = torch.empty(shape, dtype=spec.dtype, device=spec.device)
        return mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))

    def static(t):
        if is_dtensor(t):  # sharded by HF's tensor parallelism: the trace sees the whole (global) parameter
            with mode:
                return torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * t.dim()))

    named = [(n, p) for n, p in layer.module.named_parameters()] + [(n, b) for n, b in layer.module.named_buffers()]
    param_names = [n for n, _ in named]
    params = [static(t) for _, t in named]

    leaves, call_tree = _leaves(layer)
    inputs = [fake(v) for _, v in leaves if isinstance(v, ProbedTensor)]

    def step_dim(s: ProbedTensor) -> int:
        if STEP not in s.roles:
            raise CaptureError(f"layer {layer.name}: a cache row has no step dimension: {s}")
        return s.roles.index(STEP)

    pasts = [fake(layer.key_rows, past=True), fake(layer.value_rows, past=True)]
    pasts.append(fake(layer.index_rows, past=True) if layer.index_rows is not None else None)
    dims = (step_dim(layer.key_rows), step_dim(layer.value_rows),
            step_dim(layer.index_rows) if layer.index_rows is not None else None)
    module = layer.module
    out_holder = {}

    def run(params, inputs, past_key, past_value, past_index):
        it = iter(inputs)
        cache = CaptureCache(past_key, past_value, past_index, dims)
        values = [next(it) if isinstance(v, ProbedTensor) else (cache if isinstance(v, _CacheSlot) else v) for _, v in leaves]
        args, kwargs = pytree.tree_unflatten(values, call_tree)
        out = torch.func.functional_call(module, dict(zip(param_names, params)), tuple(args), kwargs)
        flat, out_holder["tree"] = pytree.tree_flatten(out)
        return flat

    with mode, _own_forwards(module, layer.wrapped), traced_fp8_linears(module):  # FP8Linear: one op (fp8.py)
        gm = make_fx(run, tracing_mode="symbolic", pre_dispatch=True)(params, inputs, *pasts)
    return gm, out_holder["tree"]


@contextmanager
def _own_forwards(module: nn.Module, names: tuple[str, ...]):
    """Run the named submodules' class forward while tracing. HF's tensor parallelism replaces the forward of the
    linears it shards by a wrapper that redistributes DTensors and all-reduces the row-parallel output; the trace
    records the layer's own computation on whole (global-shape) weights, and the rewrite makes it parallel
    again from the match (head sharding, the output projection's all-reduce)."""
    saved = []
    try:
        for name in names:
            sub = module.get_submodule(name)
            if "forward" in vars(sub):  # not when apply replaced the module since (fp8: kv_b_proj dequantized)
                saved.append((sub, sub.__dict__.pop("forward")))
        yield
    finally:
        for sub, forward in saved:
            sub.forward = forward


# --- which layers can share one trace ------------------------------------------------------------------------------
_PER_LAYER_ATTRS = frozenset({"layer_idx", "layer_id", "layer_number"})  # a layer's own index: not part of its shape


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _tensor_key(t: torch.Tensor) -> tuple:
    placements = tuple(map(str, t.placements)) if is_dtensor(t) else ()
    return tuple(t.shape), t.dtype, t.device.type, type(t).__name__, placements


def _spec_key(spec: ProbedTensor | None):
    return None if spec is None else (spec.shape, spec.dtype, spec.device.type, spec.roles)


def layer_signature(layer: LayerCall) -> tuple:
    """What a layer's trace depends on, as far as it can be read before tracing: layers with equal signatures
    give the same captured graph up to which module's parameters it reads (placeholders name parameters relative
    to the layer), so one trace, match and rewrite serve them all. It holds the module tree (submodule names and
    classes, and their plain attributes other than the layer's own index: head counts, scaling, flags), each
    parameter's and buffer's name, shape, dtype, device and placement, the recorded call (tensor shapes, dtypes
    and dim roles; the other argument values), the cache rows and the wrapped submodules. What the trace read
    from the model config is checked after the trace (``per_layer_config``)."""
    module = layer.module
    tree = []
    for name, sub in module.named_modules():
        attrs = tuple((k, _frozen(v)) for k, v in sorted(vars(sub).items())
                      if not k.startswith("_") and k not in _PER_LAYER_ATTRS and _plain(v))
        tree.append((name, type(sub).__module__, type(sub).__qualname__, attrs))
    tensors = [("param", n, _tensor_key(t)) for n, t in module.named_parameters()]
    tensors += [("buffer", n, _tensor_key(t)) for n, t in module.named_buffers()]
    leaves, spec = _leaves(layer)
    call = tuple(
        _spec_key(v) if isinstance(v, ProbedTensor) else ("CACHE" if isinstance(v, _CacheSlot) else
                                                          (repr(v) if _plain(v) else type(v).__qualname__))
        for _, v in leaves
    )
    prefix = layer.name + "."
    indexer = layer.indexer_module
    if indexer is not None and indexer.startswith(prefix):
        indexer = indexer[len(prefix):]
    return (tuple(tree), tuple(tensors), call, str(spec), layer.arg_names,
            tuple(_spec_key(s) for s in (layer.key_rows, layer.value_rows, layer.index_rows)), indexer, layer.wrapped)


def _configs(module: nn.Module) -> list:
    """The model configs the layer's modules hold (HF modules keep ``self.config``)."""
    found = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if hasattr(value, "to_dict") and hasattr(value, "num_hidden_layers"):
                found[id(value)] = value
    return list(found.values())


@contextmanager
def _recording_config_reads(module: nn.Module):
    """The names of the config attributes read while the context is open (the config's class is swapped for a
    subclass that records every attribute read, and swapped back)."""
    reads: set[str] = set()
    swapped = []
    for config in _configs(module):
        cls = type(config)

        def getattribute(self, name, _cls=cls):
            reads.add(name)
            return _cls.__getattribute__(self, name)

        config.__class__ = type(cls.__name__, (cls,), {"__getattribute__": getattribute, "__module__": cls.__module__})
        swapped.append((config, cls))
    try:
        yield reads
    finally:
        for config, cls in swapped:
            config.__class__ = cls


def per_layer_config(layer: LayerCall, reads: frozenset[str]) -> tuple:
    """This layer's entries of the config's per-layer lists (one entry per layer: ``layer_types``...) among the
    attributes a trace read: two layers whose signatures are equal share a trace only if these are equal too."""
    out = []
    for config in _configs(layer.module):
        n = getattr(config, "num_hidden_layers", None)
        for name in sorted(reads):
            value = getattr(config, name, None)
            if isinstance(value, (list, tuple)) and len(value) == n and 0 <= layer.layer_idx < len(value):
                out.append((name, repr(value[layer.layer_idx])))
    return tuple(out)