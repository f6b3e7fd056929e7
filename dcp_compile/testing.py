"""Run a function on N CPU processes joined by gloo — the multi-rank harness of the tests and the demo.

    results = run_ranks(fn, world_size, *args, **kwargs)   # fn(rank, world_size, *args, **kwargs) on every rank

``fn`` must be importable by module path (a module-level function). The port is picked free. A failed run
raises ``RankFailed`` once every process is gone (survivors are killed at once), and says how the failure was
detected in ``RankFailed.how``:

- ``"raised"``: a rank raised; its traceback is in the message.
- ``"died"``: a rank exited without reporting a result (segfault, OOM kill, ``os._exit``): noticed from its
  exit code within about a second, without waiting for ``timeout``.
- ``"timeout"``: no failure was seen, but not every rank returned within ``timeout`` seconds (a hang).

``timeout`` and ``pg_timeout`` are the harness's own keywords and are never passed on to ``fn``.
"""
from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, rendezvous_s: float, pg_timeout: float, fn, args, kwargs, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        # The store waits for slow-starting peers as long as the run may last; only the group's collectives get
        # pg_timeout (a short one would otherwise fail the rendezvous of ranks that start seconds apart).
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=rendezvous_s))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout))
        result = fn(rank, world, *args, **kwargs)
        # Serialised, not sent as shared-memory tensors: those die with this process.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 — everything goes back to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(RuntimeError):
    """A multi-rank run failed. ``how``: ``"raised"``, ``"died"`` or ``"timeout"`` (see the module docstring);
    ``ranks``: the ranks it is about (the one that raised or died; those that gave no result by the timeout);
    ``exitcodes``: every process's exit code after the teardown (negative: killed by that signal)."""

    RAISED, DIED, TIMEOUT = "raised", "died", "timeout"

    def __init__(self, message: str, how: str, ranks: list[int], exitcodes: list[int | None]):
        super().__init__(message)
        self.how, self.ranks, self.exitcodes = how, ranks, exitcodes


def run_ranks(fn, world: int, *args, timeout: float = 600, pg_timeout: float = 120, **kwargs) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` gloo processes; return the per-rank results.

    timeout: seconds the whole run may take (a guard against hangs; failures are reported as soon as seen).
    pg_timeout: the process group's collective timeout in seconds (``init_process_group(timeout=...)``), e.g.
        a few seconds for a test that expects a collective to time out. Groups made later with
        ``dist.new_group`` do not inherit it (torch gives them its own default unless they pass ``timeout``).
    Both are consumed here: a keyword of ``fn`` with one of these names cannot be passed through ``run_ranks``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world, port, timeout, pg_timeout, fn, args, kwargs, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()

    results, errors, failure = {}, {}, None
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
                (results if status == "ok" else errors)[rank] = payload
                continue
            except queue_module.Empty:
                pass
            # A rank that exited without reporting fails the run now. Exit codes first, then the queue: a rank
            # that reported just before exiting has its message in the pipe by the time its exit code is set.
            dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
            if dead and queue.empty():
                codes = ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in dead)
                failure = (RankFailed.DIED, dead, f"rank {dead[0]} of {world} died without reporting a result "
                                                  f"(no traceback; {codes})")
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - results.keys())
                failure = (RankFailed.TIMEOUT, missing, f"timeout: ranks {missing} of {world} gave no result in "
                                                        f"{timeout}s and none failed")
                break
    finally:
        ok = len(results) == world
        for p in procs:
            if not ok:
                p.kill()  # the run has failed: peers blocked in a collective would wait out pg_timeout
            p.join(timeout=5 if ok else 30)
            if p.is_alive():
                p.kill()
                p.join(timeout=30)
        queue.close()
    exitcodes = [p.exitcode for p in procs]
    if errors:
        rank = min(errors)
        raise RankFailed(f"rank {rank} of {world} raised:\n{errors[rank]}", RankFailed.RAISED, [rank], exitcodes)
    if failure is not None:
        how, ranks, message = failure
        raise RankFailed(message, how, ranks, exitcodes)
    import torch

    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world)]


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
    return tiny_model(tiny_deepseek_v32_config(**overrides), seed, dtype, attn_implementation)


def tiny_model(cfg, seed: int = 0, dtype=None, attn_implementation: str = "eager", auto_class=None):
    """The model of ``cfg`` (``auto_class.from_config``, default ``AutoModelForCausalLM``) with deterministic random
    weights (the same on every rank for the same seed), in eval mode, cast to ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = (auto_class or AutoModelForCausalLM).from_config(cfg, attn_implementation=attn_implementation)
    if dtype == torch.float64:
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    # HF initialises with std 0.02: scale the weights up so attention is far from uniform and the indexer's
    # scores are well separated (no near-ties at the top-k boundary).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model = model.to(dtype) if dtype is not None else model
    return model.eval()


# The shapes of the tiny MLA models of the tests (config keyword arguments), for any MLA family: 4 heads, latent
# 32 + rotary 8, no-RoPE 16, value 16, a small MoE; TINY_INDEXER adds an 8-head lightning indexer keeping 8.
TINY_MLA = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
    eos_token_id=None,
)
TINY_INDEXER = dict(index_topk=8, index_head_dim=16, index_n_heads=8)


# DeepSeek-V3 / R1 (and Kimi-K2, the same architecture): dense MLA, no indexer. The structure of the real config
# (q_lora 1536: q_a_proj → norm → q_b_proj; kv_lora 512; rope 64 interleaved; nope 128; v 128; the first layers
# dense, then MoE), scaled down.
def tiny_deepseek_v3(seed: int = 0, dtype=None, attn_implementation: str = "eager", **overrides):
    """A tiny DeepSeek-V3 (``DeepseekV3ForCausalLM``): 2 layers (dense MLP, then MoE), 4 MLA heads, q_lora 32."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(**{**TINY_MLA, "num_hidden_layers": 2, "first_k_dense_replace": 1, "q_lora_rank": 32,
                              "n_group": 1, "topk_group": 1, **overrides})
    return tiny_model(cfg, seed, dtype, attn_implementation)


def tiny_deepseek_v2(seed: int = 0, dtype=None, attn_implementation: str = "eager", **overrides):
    """A tiny DeepSeek-V2-Lite (``DeepseekV2ForCausalLM``): no q_lora (the query is one ``q_proj``, as in
    V2-Lite), complex-valued rotary embedding, 2 layers (dense MLP, then MoE), 4 MLA heads."""
    from transformers import DeepseekV2Config

    cfg = DeepseekV2Config(**{**TINY_MLA, "num_hidden_layers": 2, "first_k_dense_replace": 1, "q_lora_rank": None,
                              **overrides})
    return tiny_model(cfg, seed, dtype, attn_implementation)


def left_padded_prompts(lengths, vocab: int = 128, seed: int = 0, pad_id: int = 0):
    """A batch of random prompts of the given lengths, left padded: (input_ids, attention_mask)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(2, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


class TopkGapRecorder:
    """Watches every ``Tensor.topk(k)`` over a last dim longer than k (the indexer's selection) and keeps the
    smallest gap between the k-th and (k+1)-th *unmasked* scores: parity tests assert it is far above
    rounding, so that no exact or near tie at the top-k boundary can make two correct runs differ."""

    def __init__(self, k: int, masked_below: float = -1e30):
        self.k, self.masked_below, self.min_gap, self.calls = k, masked_below, float("inf"), 0

    def __enter__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        recorder = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func in (torch.Tensor.topk, torch.topk) and len(args) > 1 and args[1] == recorder.k:
                    recorder._observe(args[0])
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def _observe(self, scores) -> None:
        import torch

        if scores.shape[-1] <= self.k:
            return
        self.calls += 1
        top = torch.topk(scores.detach().double().reshape(-1, scores.shape[-1]), self.k + 1, dim=-1).values
        boundary = top[:, self.k] > self.masked_below  # more than k unmasked candidates
        if boundary.any():
            gap = (top[:, self.k - 1] - top[:, self.k])[boundary].min().item()
            self.min_gap = min(self.min_gap, gap)


def hf_cache_bytes(cache) -> int:
    """Bytes HF's own cache holds (keys, values and indexer keys of every layer)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "indexer_keys"):
            t = getattr(layer, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def write_block_fp8(path, block, quantize_key, modules_to_not_convert, device=None) -> list[str]:
    """Rewrite the safetensors files that ``save_pretrained`` wrote to ``path`` as a block-FP8 checkpoint in the
    format of DeepSeek's release: every weight whose key ``quantize_key(key, tensor)`` accepts becomes
    float8_e4m3fn with a float32 ``weight_scale_inv`` per ``block`` block (``dcp_compile.fp8.quantize``; edge
    blocks may be partial), and config.json gets the ``quantization_config`` transformers reads (quant_method
    "fp8", ``weight_block_size``, ``modules_to_not_convert``). ``device``: where to quantize (e.g. "cuda" for large
    weights). Returns the quantized keys."""
    import json

    from safetensors.torch import load_file, save_file

    from .fp8 import quantize

    done = []
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        out = {}
        for key, value in load_file(os.path.join(path, file)).items():
            if quantize_key(key, value):
                weight, scale = quantize(value if device is None else value.to(device), tuple(block))
                out[key], out[key[: -len("weight")] + "weight_scale_inv"] = weight.cpu(), scale.cpu()
                done.append(key)
            else:
                out[key] = value
        save_file(out, os.path.join(path, file), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block),
                                     "modules_to_not_convert": list(modules_to_not_convert)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return done


def assert_parity_and_sharded_cache(where: str, tokens, logits, cache_bytes: int, one_page: int, want_tokens,
                                    want_logits, reference_bytes: int, world: int, logit_tol: float) -> None:
    """A DCP rank's generate against the reference's: the same tokens, logits within ``logit_tol``, and a cache of
    at most 1/``world`` of the reference's plus one page per sequence per pool (and less than all of it)."""
    import torch

    assert torch.equal(tokens, want_tokens), f"{where}: tokens differ from the reference"
    err = (logits - want_logits).abs().max().item()
    assert err < logit_tol, f"{where}: logits differ by {err:.2e}"
    assert cache_bytes <= reference_bytes / world + one_page, (where, cache_bytes, reference_bytes, one_page)
    assert cache_bytes < reference_bytes, f"{where}: the cache is not sharded"
