"""``warm_up(model)``: before a server takes traffic, run the requests that compile what its first real ones would.

    dcp_compile.apply(model, mesh, cache_budget_tokens=...)
    dcp_compile.compile_decode(model)
    dcp_compile.warm_up(model, batch_sizes=(1, 8, 32), contexts=(8192, 32768))   # every rank, same arguments

Without it the first requests pay (README, "What to expect the first time"): the Triton kernels of each shape
class at its first call (the local top-k's long-context kernels only once a rank holds more keys than the
indexer's top-k, 6.1 s on a cold 2 × H200 machine), and under ``compile_decode`` one compile and CUDA-graph
recording of the decode step per (batch size, capacity bucket), 2-18 s each. vLLM and SGLang do the same at
start-up (profile runs, CUDA-graph capture for a list of batch sizes).

The requests, all greedy with ``decode_steps`` new tokens (3: CUDA-graph trees run a step, record the next,
replay the third), token ids 0, 1, 2, ... modulo the vocabulary, the same on every rank:
1. ``long prompt``: batch 1, index_topk × the DCP size + one page of tokens, so that every rank holds more keys
   than the top-k: the prefill's long-context kernels. Not run for a model without an indexer, or where a fixed
   pool (``cache_budget_tokens``) cannot hold it (such a pool never holds a request that needs them).
2. per batch size (the largest first) and context: a one-page prompt decoded in a cache reserved for ``context``
   positions (``model.dcp.new_cache``): the decode step of that batch size and that context's capacity bucket,
   compiled (and recorded) as a request of that size and length will replay it. ``contexts=None``: the
   smallest bucket.
   Not run where a fixed pool cannot hold ``batch × context`` positions.
Each returns a record: what, batch, prompt and cache positions, seconds (None where skipped) and skipped (why
not, or None).
The skips depend on shapes and the model only, so every rank skips the same requests.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .runtime import DCPRuntime


def _runtime(model: nn.Module) -> DCPRuntime:
    runtime = getattr(model, "dcp", None)
    if not isinstance(runtime, DCPRuntime):
        raise TypeError("warm_up needs a model rewritten by dcp_compile.apply (model.dcp is missing)")
    return runtime


def _fits(runtime: DCPRuntime, batch: int, positions: int) -> bool:
    """Whether a fixed pool holds ``batch`` sequences of ``positions`` (the check ``reserve`` makes for DCP rank
    0, which owns the most); per-request pools are sized to the request."""
    if runtime.cache_budget_tokens is None:
        return True
    pages = -(-runtime.cache_budget_tokens // runtime.layout.page_size)
    return batch * runtime.layout.pages(positions, 0) <= pages


def warm_up(model: nn.Module, batch_sizes=(1,), contexts=None, decode_steps: int = 3) -> list[dict]:
    """Run the warm-up requests (module docstring) through ``model.generate`` on this rank; every rank of the
    model's mesh must call it with the same arguments, as it would ``generate``. Returns one record a request."""
    runtime = _runtime(model)
    if decode_steps < 1:
        raise ValueError(f"decode_steps = {decode_steps}: at least one decode step (the step that compiles)")
    page = runtime.layout.page_size
    contexts = [None] if contexts is None else list(contexts)
    for context in contexts:
        if context is not None and context < page + decode_steps:
            raise ValueError(f"context {context} is shorter than the warm-up prompt ({page} tokens) + {decode_steps} "
                             "decode steps")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes {tuple(batch_sizes)}: each at least 1")
    vocab = model.get_input_embeddings().num_embeddings
    kwargs = dict(max_new_tokens=decode_steps, min_new_tokens=decode_steps, do_sample=False)
    if model.generation_config.pad_token_id is None:
        kwargs["pad_token_id"] = 0  # HF's generate wants one for its padding of finished rows

    def prompt(batch: int, tokens: int) -> torch.Tensor:
        return torch.arange(batch * tokens, device=runtime.device).remainder_(vocab).view(batch, tokens)

    def run(record: dict, ids: torch.Tensor, cache=None) -> dict:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs,
                           **({} if cache is None else {"cache": cache}))
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        return {**record, "seconds": round(time.perf_counter() - start, 3), "skipped": None}

    records = []
    if runtime.index_topk is None:
        records.append(dict(what="long prompt", batch=1, prompt=None, positions=None, seconds=None,
                            skipped="no indexer in the model"))
    else:
        tokens = runtime.index_topk * runtime.dcp_size + page
        record = dict(what="long prompt", batch=1, prompt=tokens, positions=tokens + decode_steps)
        if _fits(runtime, 1, tokens + decode_steps):
            records.append(run(record, prompt(1, tokens)))
        else:
            records.append({**record, "seconds": None,
                            "skipped": f"the fixed pool of {runtime.cache_budget_tokens} tokens cannot hold it"})
    # the largest batch first: its block table is the one every smaller batch then shares (cache.py, _set_batch)
    for batch in sorted(set(batch_sizes), reverse=True):
        for context in contexts:
            positions = page + decode_steps if context is None else context
            record = dict(what="decode", batch=batch, prompt=page, positions=positions)
            if not _fits(runtime, batch, positions):
                records.append({**record, "seconds": None, "skipped": f"the fixed pool of "
                                f"{runtime.cache_budget_tokens} tokens cannot hold {batch} x {positions} positions"})
                continue
            cache = runtime.new_cache(batch, positions)
            records.append(run(record, prompt(batch, page), cache))
            del cache
    return records


__all__ = ["warm_up"]
