"""Run a function on N CPU processes joined by gloo — the multi-rank harness of the tests and the demo.

    results = run_ranks(fn, world_size, *args)   # fn(rank, world_size, *args) on every rank

``fn`` must be importable by module path (a module-level function). The first failing rank's traceback
is raised in the parent; stragglers are killed; the port is picked free.
"""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn, args, kwargs, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        result = fn(rank, world, *args, **kwargs)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 — everything goes back to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(RuntimeError):
    pass


def run_ranks(fn, world: int, *args, timeout: float = 600, **kwargs) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` gloo processes; return the per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, kwargs, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception as exc:  # queue.Empty
                raise RankFailed(f"ranks {sorted(set(range(world)) - results.keys() - errors.keys())} gave no result in {timeout}s") from exc
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RankFailed(f"rank {rank} of {world} failed:\n{errors[rank]}")
    return [results[r] for r in range(world)]


def tiny_deepseek_v32_config(**overrides):
    """A DeepSeek-V3.2 config small enough for CPU tests and the demo: 2 layers (dense MLP, then MoE), 4 MLA
    heads, an 8-head lightning indexer keeping the top 8 positions."""
    from transformers import DeepseekV32Config

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, index_n_heads=8, index_head_dim=16, index_topk=8, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    kwargs.update(overrides)
    return DeepseekV32Config(**kwargs)


def tiny_deepseek_v32(seed: int = 0, dtype=None, attn_implementation: str = "eager", **overrides):
    """The tiny model with deterministic random weights (the same on every rank for the same seed)."""
    import torch
    from transformers import DeepseekV32ForCausalLM

    cfg = tiny_deepseek_v32_config(**overrides)
    cfg._attn_implementation = attn_implementation
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(cfg)
    # HF initialises with std 0.02: scale the weights up so attention is far from uniform and the indexer's
    # scores are well separated (no near-ties at the top-k boundary).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model = model.to(dtype) if dtype is not None else model
    return model.eval()
