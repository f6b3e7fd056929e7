"""Where dcp_compile meets transformers outside the rewritten layers: every use of HF's generate internals
is in this module.

The model's own ``forward`` is left in place (HF ``generate`` reads its signature to decide whether to build
an attention mask, position ids, ``logits_to_keep``...). Instead:

- a forward pre-hook gives a call without a cache a ``ShardedPagedCache`` sized for its input, rejects what
  DCP cannot return (``output_attentions``) and a model moved to another dtype/device after ``apply``,
  checks that every rank runs the same plain forward, and opens the cache's step (``begin_step``: capacity,
  the length's device copy, the step's widths; a 2-D attention mask is padded to the step's mask width, so a
  decode step's inputs have the same shapes at every length); a forward hook closes it (``end_step``). Both
  run outside a compiled ``model.forward``: the compiled step sees only fixed shapes and device tensors;
- ``_prepare_cache_for_generation`` (HF's cache factory inside ``generate``) makes the sharded cache for the
  expanded batch (``num_return_sequences``), or sizes a cache the user holds; there, once the generation
  settings are final and before the first forward, the ranks verify that they run the same request and, for
  sampling, take rank 0's random state;
- ``_get_stopping_criteria`` makes the stop decision rank-agreed;
- ``generate`` is wrapped (signature kept) to scope the above and to name a failing rank;
- ``save_pretrained`` refuses: the attention weights on each rank are head shards.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn

from .agreement import RankAgreedStopping, comparable_settings, settings_digest, sync_sampling_rng, tensor_digest, verify_same
from .cache import ShardedPagedCache


def _ids_fields(prefix: str, t: torch.Tensor | None) -> list[tuple[str, int]]:
    if t is None:
        return [(f"{prefix} shape", -1), (f"{prefix} checksum", 0), (f"{prefix} position checksum", 0)]
    total, weighted = tensor_digest(t)
    return [(f"{prefix} shape", _shape_code(t.shape)), (f"{prefix} checksum", total), (f"{prefix} position checksum", weighted)]


def _shape_code(shape) -> int:
    code = len(shape)
    for d in shape:
        code = code * 1_000_003 + int(d)
    return code % (1 << 62)


def _first_tensor(args: tuple, kwargs: dict, *names: str) -> torch.Tensor | None:
    for i, name in enumerate(names):
        value = kwargs.get(name)
        if value is None and len(args) > i and name == names[0]:
            value = args[0]
        if isinstance(value, torch.Tensor):
            return value
    return None


class GenerationHooks:
    """Installs the hooks above on ``model`` and holds the per-call state they share."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.runtime = model.dcp
        self.in_generate = 0
        self.request: dict = {}
        self.open_cache: ShardedPagedCache | None = None  # the cache whose step the running forward is in

    # -- install ---------------------------------------------------------------------------------------------------------
    def install(self) -> None:
        model, cls = self.model, type(self.model)
        model.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        model.register_forward_hook(self.after_forward)
        model._prepare_cache_for_generation = types.MethodType(self.prepare_cache, model)
        model._get_stopping_criteria = types.MethodType(self.stopping_criteria, model)
        model.generate = self.wrap_generate(cls.generate.__get__(model))
        model.save_pretrained = types.MethodType(_refuse_save, model)

    # -- generate ---------------------------------------------------------------------------------------------------------
    def wrap_generate(self, generate):
        hooks = self

        @functools.wraps(generate)
        def dcp_generate(*args, **kwargs):
            hooks.request = {
                "inputs": _first_tensor(args, kwargs, "inputs", "input_ids", "inputs_embeds"),
                "attention_mask": kwargs.get("attention_mask"),
            }
            hooks.in_generate += 1
            try:
                with hooks.runtime.failures.guard("generate"):
                    return generate(*args, **kwargs)
            finally:
                hooks.in_generate -= 1
                hooks.request = {}

        return dcp_generate

    def prepare_cache(self, model, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        runtime = self.runtime
        expanded = batch_size * max(generation_config.num_beams, generation_config.num_return_sequences)
        held = model_kwargs.get("cache")
        # First the ranks agree (one collective that every rank reaches): a rank-specific error below could
        # otherwise leave its peers waiting in the first forward's collectives.
        if runtime.verify_ranks and runtime.ranks.active:  # a group of one has nothing to compare
            self._verify_request(generation_config, expanded, max_cache_length, held)
        if generation_config.num_beams > 1:
            raise NotImplementedError("dcp_compile does not support beam search yet (num_beams > 1)")
        if held is not None and not isinstance(held, ShardedPagedCache):
            raise TypeError(f"a DCP model needs a ShardedPagedCache (model.dcp.new_cache), got {type(held).__name__}")
        if held is not None and held.num_sequences != expanded:
            raise ValueError(
                f"the cache passed to generate holds {held.num_sequences} sequence(s) but this request has {expanded} "
                f"(batch {batch_size} x {max(generation_config.num_beams, generation_config.num_return_sequences)} "
                f"return sequences); make it with model.dcp.new_cache({expanded}, tokens)"
            )
        if generation_config.do_sample:
            sync_sampling_rng(runtime.ranks, runtime.device)
        if held is not None:
            held._is_user_defined = True
            held.reserve(max_cache_length)
        elif generation_config.use_cache is not False:
            model_kwargs["cache"] = runtime.new_cache(expanded, max_cache_length)
        # use_cache=False: no cache is kept; every forward then gets a fresh one sized for its input.

    def _verify_request(self, generation_config, expanded: int, max_cache_length: int, held) -> None:
        settings = comparable_settings(generation_config.to_dict())
        fields = [
            ("batch size", expanded),
            *_ids_fields("inputs", self.request.get("inputs")),
            *_ids_fields("attention_mask", self.request.get("attention_mask")),
            ("max cache length", max_cache_length),
            ("positions already in the held cache", -1 if held is None else held.get_seq_length()),
            ("generation settings digest", settings_digest(settings)),
            ("weights fingerprint", self.runtime.fingerprint[0]),
            ("weights position fingerprint", self.runtime.fingerprint[1]),
        ]
        verify_same(self.runtime.ranks, fields, "generate requests", details=settings)

    def stopping_criteria(self, model, *args, **kwargs):
        criteria = type(model)._get_stopping_criteria(model, *args, **kwargs)
        if not self.runtime.ranks.active:
            return criteria
        return RankAgreedStopping(list(criteria), self.runtime.ranks)

    # -- every forward ----------------------------------------------------------------------------------------------------
    def before_forward(self, model, args, kwargs):
        runtime = self.runtime
        wants_attentions = kwargs.get("output_attentions")
        if wants_attentions is None:
            wants_attentions = getattr(model.config, "output_attentions", False)
        if wants_attentions:
            raise NotImplementedError(
                "output_attentions=True is not available under dcp_compile: DCP never forms the dense attention "
                "matrix (each rank scores only the top-k positions it owns)"
            )
        runtime.check_parameters()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        tokens = _first_tensor(args, kwargs, "input_ids", "inputs_embeds")
        if tokens is None:
            raise ValueError("dcp_compile: a forward needs input_ids or inputs_embeds")
        # Before anything that could fail on one rank only; a group of one has nothing to compare (and the input
        # digests would cost a host sync per forward).
        if not self.in_generate and runtime.verify_ranks and runtime.ranks.active:
            fields = [
                *_ids_fields("inputs", tokens),
                *_ids_fields("attention_mask", kwargs.get("attention_mask")),
                ("positions already in the cache", -1 if cache is None else cache.get_seq_length()),
                ("weights fingerprint", runtime.fingerprint[0]),
                ("weights position fingerprint", runtime.fingerprint[1]),
            ]
            verify_same(runtime.ranks, fields, "forward inputs")
        # A call without a cache (a plain forward) gets one sized for its input, as HF's model would make a
        # DynamicCache. The rewritten layers always need one, so under use_cache=False a fresh one is made for
        # every call (HF hands the previous output's cache back; it must not be appended to).
        fresh = kwargs.get("use_cache") is False and getattr(cache, "made_for_one_call", False)
        if cache is None or fresh:
            kwargs.pop("past_key_values", None)
            cache = kwargs["cache"] = runtime.new_cache(tokens.shape[0], tokens.shape[1])
            cache.made_for_one_call = True
        if not isinstance(cache, ShardedPagedCache):
            return args, kwargs  # the layers raise their clear error
        steps = tokens.shape[1]
        cache.begin_step(steps)
        self.open_cache = cache
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] < cache.mask_width:
            # Zeros past the sequence: those columns are masked anyway. A decode step's mask then has the
            # static width at every length (HF pads it the same way inside; here it is done before the graph).
            kwargs["attention_mask"] = torch.nn.functional.pad(mask.bool(), (0, cache.mask_width - mask.shape[-1]))
        return args, kwargs

    def after_forward(self, model, args, output):
        cache, self.open_cache = self.open_cache, None
        if cache is not None and cache.step_owner == "model":
            cache.end_step()


def _refuse_save(self, *args, **kwargs):
    raise RuntimeError(
        "save_pretrained after dcp_compile.apply would write this rank's attention head shards, not the model: "
        "save the model before apply (or reload the original checkpoint)"
    )


def install_hooks(model: nn.Module) -> None:
    GenerationHooks(model).install()


__all__ = ["GenerationHooks", "install_hooks"]
