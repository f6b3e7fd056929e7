"""Composing with Hugging Face's own tensor and expert parallelism.

A model loaded with ``from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto", ep_size=...))``
holds its sharded weights as DTensors: HF's DeepSeek plan shards the attention heads (``q_b_proj`` and
``kv_b_proj`` colwise, ``o_proj`` rowwise: exactly dcp_compile's head plan), the dense MLPs and shared experts,
the routed experts (by tensor, or by expert under EP), the embeddings and the LM head, and wraps the forward of
each sharded module to redistribute and reduce. ``apply`` takes such a model as it is:

- the mesh: ``tensor_parallel_mesh(model)`` reads it off the model's DTensor parameters (their public
  ``device_mesh``, the 1-D mesh named ``"tp"``); ``apply(model)`` without a mesh uses it;
- the attention heads: each layer is traced on its whole (global-shape) weights with the class forward of the
  modules HF wrapped (``tp_wrapped_submodules``); ``shard.check_head_shards`` accepts HF's head shards and
  ``shard.shard_heads`` adopts them (this rank's block, the same one apply would cut), so an attention layer
  holds plain local tensors afterwards and its rewrite all-reduces ``o_proj`` itself. A plan that keeps the
  attention replicated (``"replicate"`` for its four entries) works too: apply then cuts the heads;
- everything else (MoE, MLPs, embeddings, head) stays as HF sharded it, run by HF's own wrappers;
- the rank check fingerprints the values every rank holds whole and the shapes of the shards
  (``agreement.weight_fingerprint``).

``from_pretrained`` loads and applies in one call.
"""
from __future__ import annotations

import os

from torch import nn

__all__ = ["tensor_parallel_mesh", "tp_wrapped_submodules", "from_pretrained"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def tensor_parallel_mesh(model: nn.Module):
    """The 1-D tensor-parallel ``DeviceMesh`` transformers loaded ``model`` over (the mesh of its DTensor
    parameters whose one dim is named ``"tp"``), or None for a model not loaded with HF tensor parallelism."""
    meshes = []
    for _, param in model.named_parameters():
        if is_dtensor(param) and param.device_mesh.mesh_dim_names == ("tp",):
            mesh = param.device_mesh
            if not any(m.mesh.tolist() == mesh.mesh.tolist() for m in meshes):
                meshes.append(mesh)
    if len(meshes) > 1:
        raise ValueError(
            f"{type(model).__name__} holds DTensors on {len(meshes)} different tensor-parallel meshes "
            f"({', '.join(str(m.mesh.tolist()) for m in meshes)}): pass apply the mesh to run attention on"
        )
    return meshes[0] if meshes else None


def tp_wrapped_submodules(model: nn.Module, layer_name: str, layer: nn.Module) -> tuple[str, ...]:
    """The submodules of ``layer`` (names relative to it) whose forward HF tensor parallelism replaced by a
    wrapper: those its plan (public ``model.tp_plan``, layer numbers as ``*``) names and that carry a forward of
    their own. The trace runs their class forward (``capture.trace_layer``)."""
    plan = getattr(model, "tp_plan", None) or {}
    if not plan or (getattr(model, "tp_size", None) or 1) <= 1:
        return ()
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    wrapped = []
    for name, sub in layer.named_modules():
        full = f"{layer_name}.{name}" if name else layer_name
        if "forward" in vars(sub) and replace_layer_number_by_wildcard(full) in plan:
            wrapped.append(name)
    return tuple(wrapped)


def from_pretrained(path, *, ep_size: int | None = None, tp_size: int | None = None, model_class=None,
                    dcp_size: int | None = None, page_size: int = 64, interleave: int = 1,
                    cache_budget_tokens: int | None = None, verify_ranks: bool = True, **kwargs):
    """Load ``path`` with Hugging Face tensor parallelism over all ranks (HF's ``tp_plan="auto"``; with
    ``ep_size`` the routed experts are split by expert instead) and apply DCP over the same tensor-parallel
    mesh, in one call. Every rank runs it, e.g. under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set;
    transformers initialises the process group, NCCL on GPUs, and binds each rank to its local GPU).

    tp_size: defaults to the world size. ep_size: ranks splitting the experts (HF requires a multiple of tp_size
        dividing the world: ``ep_size=tp_size``). model_class: default ``AutoModelForCausalLM``.
    dcp_size, page_size, interleave, cache_budget_tokens, verify_ranks: as for ``apply``.
    Other keyword arguments go to ``from_pretrained`` (``dtype``, ``attn_implementation``, ...); pass
    ``distributed_config`` yourself to use another plan (e.g. attention replicated: apply shards it).
    """
    import torch.distributed as dist

    from .api import apply

    config = kwargs.pop("distributed_config", None)
    if config is None:
        from transformers.distributed import DistributedConfig

        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        config = DistributedConfig(tp_plan="auto", tp_size=tp_size or world, ep_size=ep_size)
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    model = model_class.from_pretrained(path, distributed_config=config, **kwargs)
    mesh = tensor_parallel_mesh(model)
    if mesh is None:
        raise ValueError(
            "dcp_compile.from_pretrained: the model was not loaded with tensor parallelism over more than one rank "
            "(run under torchrun with WORLD_SIZE > 1, or load it yourself and call apply(model, mesh))"
        )
    return apply(model, mesh, dcp_size=dcp_size, page_size=page_size, interleave=interleave,
                 cache_budget_tokens=cache_budget_tokens, verify_ranks=verify_ranks)
