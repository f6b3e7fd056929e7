"""End-to-end decode benchmark: a model with DeepSeek-V3.2's attention dimensions, decode step by step exactly as
HF ``generate`` calls the forward, under DCP (``dcp``), head-parallel attention with a replicated cache (``tp``)
and the unmodified HF model on one GPU (``hf``), eager / Inductor / CUDA graphs.

    torchrun --nproc-per-node 4 benchmarks/bench_e2e.py --out /tmp/e2e                 # NCCL, one GPU a rank
    python benchmarks/bench_e2e.py --batch 1 8 --context 8192 32768                     # one GPU, one process
    torchrun --nproc-per-node 2 benchmarks/bench_e2e.py --smoke --out /tmp/smoke        # CPU, gloo, tiny dims
    ... --profile                     # + torch.profiler tables of the decode step, kernel time per step
    ... --profile-prefill             # + torch.profiler tables of one prefill chunk per mode
    ... --first-use-profile           # + cProfile of each mode's first prefill (compiles, set-up)
    ... --record calls.pt             # + the dcp op calls of one prefill chunk and one decode step
                                      #   (then: python benchmarks/bench_kernels.py --recorded calls.pt)

The model (``real_dims_config``): DeepSeek-V3.2's attention verbatim (hidden 7168, 128 heads, q_lora 1536,
kv_lora 512, rope 64, nope 128, v 128, a 64 x 128 indexer keeping the top 2048) with ``--layers`` layers
(default 4), a small dense MLP (``--intermediate``, default 2048; ``--mlp moe`` for HF's real MoE with
``--experts`` routed experts, replicated on every rank), a small vocabulary, random bf16 weights (the same on
every rank), built directly on the GPU. No rope scaling (the checkpoint's yarn factor changes only the softmax
scale's value).

For each mode, a fresh model (``dcp``: ``dcp_compile.apply(model, mesh)``; ``tp``: ``apply(..., dcp_size=1)``;
``hf``: unmodified, rank 0 only, where the projected memory fits); for each (batch, context): one cache
(``model.dcp.new_cache`` / HF ``DynamicCache``), the context prefilled through the model in chunks (``--chunk``
tokens per forward over the whole batch: B sequences x chunk/B positions; HF's prefill chunk shrinks to keep its
[B, S, 64, T] fp32 indexer scores under ``--hf-prefill-gb``), always with the eager forward (a throw-away small
prefill first warms the kernels); then, for each compile mode, warm-up decode steps and timed decode steps
(CUDA events around each step: median, p90), and the cache cropped back to the context for the next compile
mode. A decode step is one ``model(input_ids=[B, 1], cache=cache, position_ids=[B, 1], use_cache=True,
logits_to_keep=1)``: what generate passes for an unpadded batch (it drops an all-ones attention mask;
``--mask`` passes the growing 2-D mask instead, as for a padded batch). Not in the step: generate's own work
around the forward (token selection, its per-step rank-agreed stop all-reduce) and its once-per-call rank check
(``apply(..., verify_ranks=False)`` here, else every plain forward would be checked).

Reported per (mode, compile, batch, context): decode step ms (median, p90), tokens/s (B / step), prefill s
(eager), cache bytes per rank (``cache.storage_bytes()``; HF: its keys, values and indexer keys), peak memory
per rank (``torch.cuda.max_memory_allocated``, decode and prefill). Per mode: the longest context that fits,
PROJECTED (not run) from the device memory left after the weights and the largest decode transient, and the
measured cache bytes per token per rank. ``--profile``: per (mode, compile), torch.profiler over
``--profile-steps`` decode steps at one (batch, context), writing the top CUDA and CPU ops tables, and the sum of
CUDA kernel time per step next to the step time (GPU-bound when step <= 1.3 x kernel sum). ``--profile-prefill``:
per mode, after the kernel warm-up, torch.profiler over ONE prefill chunk at the largest batch, the cache holding
the smallest context less that chunk (the chunk's attention reads a realistic number of keys): the top 40 ops by
device time, top 30 by CPU time, and total kernel ms (NCCL's apart), CPU ms and wall ms of the chunk.
``--first-use-profile``: cProfile of each mode's first prefill (by cumulative and by own time).

Writes to ``--out`` (default ``$OUT``, else benchmarks/out/e2e): results.json (every row, raw; while running,
results.partial.json holds rank 0's rows so far), step_time.png
and capacity.png (if matplotlib is there), profile_<mode>_<compile>_b<B>_t<T>.txt (--profile),
profile_prefill_<mode>.txt, first_use_profile_<mode>.txt, and prints progress lines and a table (rank 0).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import pathlib
import socket
import statistics
import sys
import time
import traceback
import typing

import torch
import torch.distributed as dist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # record_op_calls

MODES = ("dcp", "tp", "hf")
COMPILES = ("eager", "inductor", "cudagraphs")
# Headroom left out of the projected capacity: allocator fragmentation, NCCL and CUDA-graph pools.
CAPACITY_RESERVE_BYTES = 4 << 30
PER_RANK_FIELDS = ("cache_bytes", "cache_bytes_per_token", "decode_peak_bytes", "prefill_peak_bytes",
                   "decode_transient_bytes")


# ------------------------------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--compile", nargs="+", default=["eager", "inductor", "cudagraphs"], choices=COMPILES,
                   dest="compiles")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="from {1, 8, 32, 64}")
    p.add_argument("--context", nargs="+", type=int, default=[8192, 32768], help="tokens, from {8K, 32K, 128K}")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mlp", choices=["dense", "moe"], default="dense")
    p.add_argument("--intermediate", type=int, default=2048, help="dense MLP width")
    p.add_argument("--experts", type=int, default=256, help="routed experts with --mlp moe")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=4096, help="prefill tokens per forward over the whole batch")
    p.add_argument("--prefill-compile", default="eager", choices=["eager", "inductor"],
                   help="the forward prefill runs through: eager, or torch.compile(inductor) as README's usage "
                   "(its compile then counts as first use)")
    p.add_argument("--hf-prefill-gb", type=float, default=16.0,
                   help="HF prefill: bound on its [B, S, 64, T] fp32 indexer scores per chunk")
    p.add_argument("--warmup", type=int, default=5, help="decode steps before timing (CUDA graphs record here)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--fill", choices=["prefill", "random"], default="prefill",
                   help="how the context gets into the cache: prefilled through the model (timed), or random latents "
                   "and index keys written straight into the dcp/tp cache pools (decode timing at contexts whose "
                   "prefill would take minutes, e.g. 64 x 128K; hf always prefills)")
    p.add_argument("--first-use-profile", action="store_true",
                   help="cProfile each mode's first prefill (rank 0): first_use_profile_<mode>.txt, the 30 costliest "
                   "calls by cumulative time and the 30 by own time (it slows that prefill: its first-use time is "
                   "then not comparable)")
    p.add_argument("--profile-prefill", action="store_true",
                   help="per mode, once the kernels are warm: torch.profiler over one prefill chunk (batch "
                   "max(--batch)) attending over min(--context) minus a chunk of cached positions: "
                   "profile_prefill_<mode>.txt, top ops by device and CPU time, kernel / NCCL / CPU ms")
    p.add_argument("--trace-prefill", action="store_true",
                   help="with --profile-prefill: every rank writes the chunk's Chrome trace "
                   "(trace_prefill_<mode>_rank<r>.json; analyse with benchmarks/trace_collectives.py)")
    p.add_argument("--mask", action="store_true", help="pass the growing 2-D attention mask (a padded batch)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over decode steps, per mode x compile")
    p.add_argument("--profile-at", type=int, nargs=2, metavar=("BATCH", "CONTEXT"),
                   help="the (batch, context) to profile (default: the largest batch, the smallest context)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--record", metavar="FILE", help="record the dcp op calls of one prefill chunk and one decode "
                   "step of one dcp (else tp) config (rank 0's calls) to FILE (see record_op_calls.py)")
    p.add_argument("--record-at", type=int, nargs=2, metavar=("BATCH", "CONTEXT"),
                   help="the (batch, context) to record (default: --profile-at's)")
    p.add_argument("--device-memory-gb", type=float, default=None,
                   help="memory per device for the capacity projection (default: the GPU's; CPU: 1)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "e2e"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU + gloo, tiny dims, small contexts: a functional test")
    args = p.parse_args(argv)
    if args.smoke:
        if args.batch == p.get_default("batch"):
            args.batch = [1, 2]
        if args.context == p.get_default("context"):
            args.context = [40, 96]
        if args.chunk == p.get_default("chunk"):
            args.chunk = 32
        if args.compiles == p.get_default("compiles"):
            args.compiles = ["eager"]
        args.steps, args.warmup = min(args.steps, 4), min(args.warmup, 2)
        args.page_size, args.profile_steps = min(args.page_size, 8), min(args.profile_steps, 2)
    return args


def real_dims_config(args):
    """DeepSeek-V3.2's attention verbatim (the config class's defaults), few layers, small MLP and vocabulary."""
    from transformers import DeepseekV32Config

    moe = args.mlp == "moe"
    max_tokens = max(args.context) + args.warmup + args.steps + args.profile_steps + 64
    kwargs = dict(num_hidden_layers=args.layers, first_k_dense_replace=0 if moe else args.layers,
                  intermediate_size=args.intermediate, vocab_size=args.vocab,
                  max_position_embeddings=max(max_tokens, 4096), pad_token_id=None, bos_token_id=0,
                  eos_token_id=None)
    if moe:
        kwargs["n_routed_experts"] = args.experts
        kwargs["n_group"] = kwargs["topk_group"] = 1 if args.experts < 8 else None
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if args.smoke:
        from dcp_compile.testing import tiny_deepseek_v32_config

        kw = {k: v for k, v in kwargs.items() if k not in ("vocab_size", "intermediate_size", "n_routed_experts")}
        return tiny_deepseek_v32_config(**kw)
    return DeepseekV32Config(**kwargs)


def build_model(cfg, dtype, device, attn, seed):
    """The model with random weights, made on ``device`` directly; weights N(0, 1/fan_in) as in the tests'
    tiny models (far from uniform attention, well separated indexer scores), the same on every rank."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
    return model.eval()


class Env:
    """Ranks, device, the process groups (the default one for the model; a gloo one, long timeout, for the
    benchmark's own result exchange and for the ranks waiting while rank 0 runs the HF model)."""

    def __init__(self, smoke: bool):
        if "RANK" not in os.environ:  # one process without torchrun
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = torch.cuda.is_available() and not smoke
        if not self.cuda and not smoke:
            sys.exit("bench_e2e needs CUDA (or --smoke for the CPU functional run)")
        if self.cuda:
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (device notes)
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group("nccl" if self.cuda else "gloo", timeout=datetime.timedelta(minutes=10))
        self.cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2)) if self.world > 1 else None

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier(group=self.cpu_group)

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def log(self, *parts):
        if self.rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ timing

class StepTimer:
    """Per-step times in ms: CUDA events on the current stream (no sync inside the timed loop), perf_counter on
    CPU."""

    def __init__(self, env: Env):
        self.env, self.marks = env, []

    def mark(self):
        if self.env.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        self.env.synchronize()
        if self.env.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def peak_bytes(env):
    return torch.cuda.max_memory_allocated(env.device) if env.cuda else None


def reset_peak(env):
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(env.device)


def allocated_bytes(env):
    return torch.cuda.memory_allocated(env.device) if env.cuda else None


# ------------------------------------------------------------------------------------------ model + cache

class Runner:
    """One mode's model and how to make its cache, prefill and step it."""

    def __init__(self, mode, args, env, cfg):
        self.mode, self.args, self.env, self.cfg = mode, args, env, cfg
        self.dtype = getattr(torch, args.dtype)
        self.model = build_model(cfg, self.dtype, env.device, args.attn, args.seed)
        if mode in ("dcp", "tp"):
            import dcp_compile
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(env.device.type, (env.world,))
            # verify_ranks=False: a plain forward is otherwise checked against the other ranks on every call (an
            # all-gather and input digests), which generate does once per call, not per step.
            dcp_compile.apply(self.model, mesh, dcp_size=None if mode == "dcp" else 1, page_size=args.page_size,
                              verify_ranks=False)
        self.eager_forward = self.model.forward
        self.compiled = {}
        self.weight_bytes = sum(t.numel() * t.element_size() for t in
                                (*self.model.parameters(), *self.model.buffers()))

    def new_cache(self, batch, tokens):
        if self.mode == "hf":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        return self.model.dcp.new_cache(batch, tokens)

    def cache_bytes(self, cache) -> int:
        if self.mode == "hf":
            from dcp_compile.testing import hf_cache_bytes

            return hf_cache_bytes(cache)
        return cache.storage_bytes()

    def use(self, compile_mode):
        """Point model.forward at the eager forward or a compiled one (each made once per model)."""
        if compile_mode == "eager":
            self.model.forward = self.eager_forward
            return
        if compile_mode not in self.compiled:
            if compile_mode == "inductor":
                self.compiled[compile_mode] = torch.compile(self.eager_forward, backend="inductor")
            else:
                # What dcp_compile.compile_decode compiles decode steps with (this benchmark times decode steps
                # only; its prefill always runs the eager forward).
                self.compiled[compile_mode] = torch.compile(self.eager_forward, mode="reduce-overhead", dynamic=False)
        self.model.forward = self.compiled[compile_mode]

    def prefill_chunk_positions(self, batch, context):
        """Positions per sequence per forward: --chunk tokens over the batch; HF: its indexer scores bounded."""
        per_seq = max(1, self.args.chunk // batch)
        if self.mode == "hf":
            heads = self.cfg.index_n_heads
            bound = int(self.args.hf_prefill_gb * 2**30 // (3 * 4 * heads * batch * max(context, 1)))
            per_seq = max(1, min(per_seq, bound))
        return per_seq

    def forward(self, ids, cache, positions, mask=None):
        if self.model.forward is self.compiled.get("cudagraphs"):
            torch.compiler.cudagraph_mark_step_begin()  # each step a new generation: the last outputs are dropped
        return self.model(input_ids=ids, cache=cache, position_ids=positions, attention_mask=mask,
                          use_cache=True, logits_to_keep=1)

    def prefill_forward(self):
        """The forward prefill chunks run through: the eager one, or with ``--prefill-compile inductor`` the
        forward compiled as README's usage compiles it (``torch.compile(model.forward, backend="inductor")``,
        automatic dynamic shapes: the chunks' growing context recompiles once, then stays symbolic)."""
        if self.args.prefill_compile == "eager":
            return self.eager_forward
        if "prefill" not in self.compiled:
            self.compiled["prefill"] = torch.compile(self.eager_forward, backend="inductor")
        return self.compiled["prefill"]

    def prefill(self, cache, batch, context, gen, start=0):
        """Chunks through the prefill forward (``prefill_forward``); returns the number of forwards."""
        per_seq, forwards = self.prefill_chunk_positions(batch, context), 0
        forward = self.prefill_forward()
        for s in range(start, context, per_seq):
            e = min(context, s + per_seq)
            ids = torch.randint(1, self.cfg.vocab_size, (batch, e - s), device=self.env.device, generator=gen)
            pos = torch.arange(s, e, device=self.env.device).expand(batch, -1)
            mask = torch.ones(batch, e, dtype=torch.long, device=self.env.device) if self.args.mask else None
            with torch.no_grad():
                forward(input_ids=ids, cache=cache, position_ids=pos, attention_mask=mask, use_cache=True,
                        logits_to_keep=1)
            forwards += 1
        return forwards

    def fill_random(self, cache, context, gen):
        """--fill random: the cache as if ``context`` positions per sequence were prefilled, holding random
        latents and index keys (N(0, 1), the model's dtype) in every pool row. A decode step's work does not
        depend on the values (the indexer scans every key, the top-k selects k of them, attention reads k rows),
        so its time is the prefilled cache's; not its tokens (random weights make those meaningless anyway)."""
        for pool in (*cache.latent.values(), *cache.index_keys.values()):
            for rows in pool.split(1 << 20):  # bounded fp32 temporaries (a 64 x 128K pool is 8M rows)
                rows.copy_(torch.randn(rows.shape, generator=gen, device=pool.device, dtype=torch.float32))
        cache.seq_length = context

    def close(self):
        self.model.forward = self.eager_forward
        self.compiled.clear()
        del self.model
        torch._dynamo.reset()
        gc.collect()
        if self.env.cuda:
            torch.cuda.empty_cache()


def decode_inputs(runner, batch, context, steps, gen):
    """Every step's inputs made before timing (generate makes them on the device too: no host work is hidden)."""
    dev = runner.env.device
    ids = [torch.randint(1, runner.cfg.vocab_size, (batch, 1), device=dev, generator=gen) for _ in range(steps)]
    pos = [torch.full((batch, 1), context + i, device=dev, dtype=torch.long) for i in range(steps)]
    masks = [torch.ones(batch, context + i + 1, device=dev, dtype=torch.long) if runner.args.mask else None
             for i in range(steps)]
    return list(zip(ids, pos, masks))


def hf_fits(runner, batch, context) -> str | None:
    """None if the HF model's decode and prefill at (batch, context) fit the free memory, else why not. HF's
    attention expands the whole latent cache to per-head keys and values every step: about
    B·T·H·(nope+v + nope+rope + rope)·2 bytes per layer at a time, plus [B, S, 64, T] fp32 indexer scores."""
    if not runner.env.cuda:
        return None
    c = runner.cfg
    heads = c.num_attention_heads
    expand = batch * context * heads * (c.qk_nope_head_dim * 2 + c.v_head_dim + c.qk_rope_head_dim * 2) * 2
    cache = batch * context * c.num_hidden_layers * ((c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 2)
    scores = 3 * 4 * c.index_n_heads * batch * runner.prefill_chunk_positions(batch, context) * context
    need = 2 * expand + cache + scores
    free, _ = torch.cuda.mem_get_info(runner.env.device)
    if need > 0.85 * free:
        return f"projected {need / 2**30:.1f} GiB > 85 % of {free / 2**30:.1f} GiB free"
    return None


# ------------------------------------------------------------------------------------------------- one run

class ProfileSums(typing.NamedTuple):
    """Totals over one profiled run, ms. kernel_ms and nccl_ms are None without CUDA."""
    kernel_ms: float | None  # every CUDA kernel, NCCL's included
    nccl_ms: float | None    # the ncclDevKernel* kernels alone
    cpu_ms: float            # self CPU time of every op
    wall_ms: float           # host clock around the work, device synchronized before and after, under the profiler


def profile_run(env, work, device_rows=30, cpu_rows=30, trace=None) -> tuple[ProfileSums, str]:
    """torch.profiler (CPU, and CUDA on GPUs) around ``work()`` on this rank (every rank runs it: the forwards'
    collectives need them all). Returns the sums and the text of two tables: the top ``device_rows`` ops by self
    device time (self CPU time without CUDA) and the top ``cpu_rows`` by self CPU time. ``trace``: a path this
    rank writes its Chrome trace to (every rank its own: the ranks share the host clock, so the traces line up and
    show which rank a collective waited for)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    env.synchronize()
    with profile(activities=activities) as prof, torch.no_grad():
        t0 = time.perf_counter()
        work()
        env.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA)
    # NCCL kernels' time includes waiting for the other ranks (it runs until the slowest arrives): counted
    # apart, so that the compute kernels' sum says how busy the GPU was.
    nccl_us = sum(e.self_device_time_total for e in averages
                  if e.device_type == DeviceType.CUDA and e.key.startswith("ncclDevKernel"))
    cpu_us = sum(e.self_cpu_time_total for e in averages)
    sort_device = "self_cuda_time_total" if env.cuda else "self_cpu_time_total"
    tables = (f"## top {device_rows} ops by self {'device' if env.cuda else 'CPU (no CUDA)'} time\n"
              f"{averages.table(sort_by=sort_device, row_limit=device_rows)}\n\n"
              f"## top {cpu_rows} ops by self CPU time\n"
              f"{averages.table(sort_by='self_cpu_time_total', row_limit=cpu_rows)}\n")
    sums = ProfileSums(kernel_ms=kernel_us / 1e3 if env.cuda else None, nccl_ms=nccl_us / 1e3 if env.cuda else None,
                       cpu_ms=cpu_us / 1e3, wall_ms=wall_ms)
    return sums, tables


def profile_decode(runner, cache, inputs, out_dir, tag):
    """torch.profiler over the given decode steps: tables written, (CUDA kernel ms per step, CPU ms per step,
    NCCL kernel ms per step)."""
    def steps():
        for ids, pos, mask in inputs:
            runner.forward(ids, cache, pos, mask)

    env = runner.env
    sums, tables = profile_run(env, steps)
    if env.rank == 0:
        (out_dir / f"profile_{tag}.txt").write_text(f"# {tag}: {len(inputs)} decode steps\n\n{tables}")
    n = max(1, len(inputs))
    return (sums.kernel_ms / n if env.cuda else None), sums.cpu_ms / n, (sums.nccl_ms / n if env.cuda else None)


def profile_prefill(runner, batch, context, gen, out_dir, trace=False) -> dict:
    """torch.profiler over ONE prefill chunk (the benchmark's chunk at this batch and context) that attends over
    ``context - chunk`` cached positions: a fresh cache is prefilled to there unprofiled, then the last chunk runs
    profiled. Writes profile_prefill_<mode>.txt (rank 0), with ``trace`` every rank's Chrome trace
    (trace_prefill_<mode>_rank<r>.json); returns the header's numbers and the sums."""
    env = runner.env
    chunk = min(context, runner.prefill_chunk_positions(batch, context))
    before = context - chunk
    cache = runner.new_cache(batch, context)
    runner.prefill(cache, batch, before, gen)
    # start=before: runner.prefill steps by its chunk size from there, so exactly one forward of `chunk` positions
    sums, tables = profile_run(env, lambda: runner.prefill(cache, batch, context, gen, start=before),
                               device_rows=40, cpu_rows=30,
                               trace=out_dir / f"trace_prefill_{runner.mode}_rank{env.rank}.json" if trace else None)
    del cache
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
    summary = prefill_profile_summary(sums)
    if env.rank == 0:
        header = (f"# prefill chunk profile: mode {runner.mode}, batch {batch}, chunk {chunk} positions per sequence "
                  f"({batch * chunk} tokens), context before the chunk {before}, world {env.world}\n"
                  f"# wall {sums.wall_ms:.3f} ms for the chunk (under the profiler)\n")
        (out_dir / f"profile_prefill_{runner.mode}.txt").write_text(f"{header}summary: {summary}\n\n{tables}")
    env.log(f"mode {runner.mode}: prefill chunk B={batch} x {chunk} after {before}: {summary}")
    return dict(batch=batch, chunk_positions=chunk, context_before=before, **sums._asdict())


def prefill_profile_summary(sums: ProfileSums) -> str:
    if sums.kernel_ms is None:
        kernels = "kernels - (no CUDA)"
    else:
        kernels = (f"kernels {sums.kernel_ms:.3f} ms (NCCL {sums.nccl_ms:.3f} ms, the rest "
                   f"{sums.kernel_ms - sums.nccl_ms:.3f} ms)")
    return f"{kernels}, CPU {sums.cpu_ms:.3f} ms, wall {sums.wall_ms:.3f} ms"


def write_first_use_profile(profiler, path, header):
    """cProfile's 30 costliest calls twice: by cumulative time (which call chains the time is under) and by
    own time (tottime: where it really goes: compiles, cudaMalloc, NCCL set-up, ...)."""
    import io
    import pstats

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"{header}\n## top 30 by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(30)
    text.write("\n## top 30 by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(30)
    path.write_text(text.getvalue())


def run_config(runner, batch, context, compiles, gen, out_dir, want_profile, recorder=None):
    """Cache, prefill, then per compile mode: warm-up, timed decode, (profile), crop back. Returns rows."""
    args, env = runner.args, runner.env
    extra = args.warmup + args.steps + (args.profile_steps if want_profile else 0)
    reset_peak(env)
    random_fill = args.fill == "random" and runner.mode != "hf"
    if args.prefill_compile != "eager" and not random_fill:
        # A compiled prefill recompiles for a new cache's shapes (and once more as its context grows): one
        # untimed prefill of the same shapes first, so that prefill_s is the compiled forward's, not the compiler's.
        warm = runner.new_cache(batch, context + extra)
        runner.prefill(warm, batch, context, gen)
        del warm
    cache = runner.new_cache(batch, context + extra)
    env.synchronize()
    t0 = time.perf_counter()
    if random_fill:
        runner.fill_random(cache, context, gen)
    elif recorder is not None:  # one recorded chunk first, the rest of the prefill as usual
        per_seq = runner.prefill_chunk_positions(batch, context)
        recorder.phase = "prefill"
        with recorder:
            runner.prefill(cache, batch, min(per_seq, context), gen)
        runner.prefill(cache, batch, context, gen, start=min(per_seq, context))
    else:
        runner.prefill(cache, batch, context, gen)
    env.synchronize()
    prefill_s = None if random_fill else time.perf_counter() - t0
    forwards = 0 if random_fill else math.ceil(context / runner.prefill_chunk_positions(batch, context))
    prefill_peak = peak_bytes(env)
    cache_bytes = runner.cache_bytes(cache)
    reserved_tokens = context + extra if runner.mode != "hf" else context
    base = dict(mode=runner.mode, batch=batch, context=context, world=env.world,
                dcp_size=runner.model.dcp.dcp_size if runner.mode != "hf" else 1,
                prefill_s=prefill_s, prefill_tokens_per_s=batch * context / prefill_s if prefill_s else None,
                prefill_forwards=forwards, fill="random" if random_fill else "prefill",
                prefill_positions_per_forward=runner.prefill_chunk_positions(batch, context),
                prefill_peak_bytes=prefill_peak, cache_bytes=cache_bytes,
                prefill_recorded=recorder is not None,  # the recorder's copies are in this prefill_s
                cache_bytes_per_token=cache_bytes / (batch * reserved_tokens), weight_bytes=runner.weight_bytes)
    filled = "random fill (no prefill)" if random_fill else f"prefill {prefill_s:.2f} s ({forwards} forwards, {runner.args.prefill_compile})"
    env.log(f"  {runner.mode} B={batch} T={context}: {filled}, "
            f"cache {cache_bytes / 2**20:.1f} MiB/rank")
    if recorder is not None:
        ids, pos, mask = decode_inputs(runner, batch, context, 1, gen)[0]
        recorder.phase = "decode"
        with recorder, torch.no_grad():
            runner.forward(ids, cache, pos, mask)
        cache.crop(-1)
    rows = []
    for compile_mode in compiles:
        row = dict(base, compile=compile_mode)
        if runner.mode == "hf" and compile_mode == "cudagraphs":
            rows.append(dict(row, status="skipped: HF's DynamicCache grows every step (a CUDA graph per step)"))
            continue
        try:
            from torch._dynamo.utils import counters

            skips_before = counters["inductor"]["cudagraph_skips"]
            runner.use(compile_mode)
            inputs = decode_inputs(runner, batch, context, extra, gen)
            t0 = time.perf_counter()
            with torch.no_grad():
                for ids, pos, mask in inputs[:args.warmup]:
                    runner.forward(ids, cache, pos, mask)
            env.synchronize()
            warm_s = time.perf_counter() - t0
            before = allocated_bytes(env)
            reset_peak(env)
            timer = StepTimer(env)
            timer.mark()
            with torch.no_grad():
                for ids, pos, mask in inputs[args.warmup:args.warmup + args.steps]:
                    runner.forward(ids, cache, pos, mask)
                    timer.mark()
            ms = timer.durations_ms()
            peak = peak_bytes(env)
            row.update(status="ok", step_ms_median=statistics.median(ms), step_ms_p90=percentile(ms, 0.9),
                       step_ms_all=ms, tokens_per_s=batch / (statistics.median(ms) / 1e3), warmup_s=warm_s,
                       decode_peak_bytes=peak,
                       decode_transient_bytes=(peak - before) if peak is not None else None,
                       # > 0: Inductor ran a graph of this config without CUDA graphs (why: TORCH_LOGS=perf_hints)
                       cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips_before)
            if want_profile:
                kernel_ms, cpu_ms, nccl_ms = profile_decode(runner, cache, inputs[args.warmup + args.steps:],
                                                            out_dir, f"{runner.mode}_{compile_mode}_b{batch}_t{context}")
                compute_ms = kernel_ms - nccl_ms if kernel_ms else None
                row.update(profile_kernel_ms_per_step=kernel_ms, profile_cpu_ms_per_step=cpu_ms,
                           profile_nccl_ms_per_step=nccl_ms, profile_compute_kernel_ms_per_step=compute_ms,
                           step_over_kernel=(row["step_ms_median"] / kernel_ms) if kernel_ms else None,
                           step_over_compute_kernel=(row["step_ms_median"] / compute_ms) if compute_ms else None)
            env.log(f"  {runner.mode} {compile_mode} B={batch} T={context}: step {row['step_ms_median']:.3f} ms "
                    f"(p90 {row['step_ms_p90']:.3f}), {row['tokens_per_s']:.0f} tok/s"
                    + (f", kernels {row['profile_kernel_ms_per_step']:.3f} ms/step (NCCL "
                       f"{row['profile_nccl_ms_per_step']:.3f})" if row.get("profile_kernel_ms_per_step") else "") + f" (warm-up {warm_s:.1f} s)"
                    + (f", CUDA graphs SKIPPED {row['cudagraph_skips']}x" if row["cudagraph_skips"] else ""))
        except torch.OutOfMemoryError as exc:
            row.update(status=f"oom: {str(exc).splitlines()[0][:200]}")
            env.log(f"  {runner.mode} {compile_mode} B={batch} T={context}: OOM")
        finally:
            if cache.get_seq_length() > context:  # back to the prefilled context (crop(0) would empty HF's)
                cache.crop(-(cache.get_seq_length() - context))
        rows.append(row)
    runner.use("eager")
    del cache
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
    return rows


def capacity(rows, env, args):
    """Per mode: the longest context per batch that fits (PROJECTED): memory left after the weights, the largest
    measured decode transient and a reserve, over the measured cache bytes per token per rank."""
    if args.device_memory_gb is not None:
        total = args.device_memory_gb * 2**30
    elif env.cuda:
        total = torch.cuda.mem_get_info(env.device)[1]
    else:
        total = 2**30
    out = {}
    for mode in {r["mode"] for r in rows}:
        ok = [r for r in rows if r["mode"] == mode and r.get("status") == "ok"]
        if not ok:
            continue
        per_token = max(r["cache_bytes_per_token_max_rank"] for r in ok)
        weights = max(r["weight_bytes"] for r in ok)
        transient = max((r.get("decode_transient_bytes_max_rank") or 0) for r in ok)
        reserve = CAPACITY_RESERVE_BYTES if env.cuda else 0
        free_for_cache = max(0.0, total - weights - transient - reserve)
        tokens = free_for_cache / per_token
        out[mode] = dict(projected=True, device_memory_bytes=total, weight_bytes_per_rank=weights,
                         decode_transient_bytes=transient, reserve_bytes=reserve,
                         cache_bytes_per_token_per_rank=per_token,
                         cache_bytes_per_token_per_layer_per_rank=per_token / args.layers,
                         tokens_per_rank=int(tokens),
                         longest_context={str(b): int(tokens // b) for b in sorted({1, *args.batch})})
    return out


# ---------------------------------------------------------------------------------------------------- plots

def plot(results, out_dir) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"no plots: matplotlib unavailable ({exc.__class__.__name__})"
    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    if not rows:
        return "no plots: no successful rows"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key in sorted({(r["mode"], r["compile"], r["batch"]) for r in rows}):
        rs = sorted([r for r in rows if (r["mode"], r["compile"], r["batch"]) == key], key=lambda r: r["context"])
        ax.plot([r["context"] for r in rs], [r["step_ms_median"] for r in rs], "o-", label="%s %s B=%d" % key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"decode step vs context, {results['info']['layers']} layers, world {results['info']['world']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "step_time.png", dpi=110)
    plt.close(fig)
    cap = results["capacity"]
    if cap:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        modes = sorted(cap)
        ax.bar(modes, [cap[m]["longest_context"]["1"] for m in modes])
        ax.set_yscale("log")
        ax.set_ylabel("longest context at batch 1 (tokens, PROJECTED)")
        ax.set_title(f"capacity per mode ({results['info']['layers']} layers, per-rank memory)")
        fig.tight_layout()
        fig.savefig(out_dir / "capacity.png", dpi=110)
        plt.close(fig)
    return "plots: step_time.png, capacity.png"


# ------------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    env = Env(args.smoke)
    out_dir = pathlib.Path(args.out)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("cache_size_limit", "recompile_limit"):  # batch sizes x compile modes share one code object
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    cfg = real_dims_config(args)
    info = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv, world=env.world, torch=torch.__version__,
                device=torch.cuda.get_device_name(env.device) if env.cuda else "cpu", layers=args.layers,
                mlp=args.mlp, dtype=args.dtype, attn=args.attn, page_size=args.page_size, chunk=args.chunk,
                mask=args.mask, smoke=args.smoke,
                dims={k: getattr(cfg, k) for k in ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                                   "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                                                   "index_n_heads", "index_head_dim", "index_topk", "vocab_size",
                                                   "intermediate_size", "num_hidden_layers")})
    env.log(f"bench_e2e: world {env.world}, {info['device']}, {args.layers} layers ({args.mlp} MLP), modes "
            f"{args.modes}, compile {args.compiles}, batch {args.batch}, context {args.context}")
    results = dict(info=info, rows=[], errors=[], notes=[])
    modes = list(args.modes)
    if env.world == 1 and "tp" in modes and "dcp" in modes:
        modes.remove("tp")
        results["notes"].append("world 1: tp is dcp (a group of one); tp not run")
    if "hf" in modes:  # rank 0 alone, after the collective modes
        modes = [m for m in modes if m != "hf"] + ["hf"]
    profile_at = tuple(args.profile_at) if args.profile_at else (max(args.batch), min(args.context))
    record_mode = next((m for m in ("dcp", "tp") if m in modes), None) if args.record else None
    record_at = tuple(args.record_at) if args.record_at else profile_at
    if args.record and record_at not in {(b, c) for b in args.batch for c in args.context}:
        sys.exit(f"--record-at {record_at} is not one of the configs run (batch {args.batch} x context {args.context})")
    rank_rows = []
    for mode in modes:
        if mode == "hf":
            gathered = env.gather(rank_rows)  # the per-rank numbers of the collective modes, before HF
            if env.rank != 0:
                continue
        env.log(f"mode {mode}: building the model" + (" and applying dcp_compile" if mode != "hf" else ""))
        t0 = time.perf_counter()
        runner = Runner(mode, args, env, cfg)
        env.log(f"mode {mode}: ready in {time.perf_counter() - t0:.1f} s, weights {runner.weight_bytes / 2**30:.2f} "
                f"GiB per rank")
        gen = torch.Generator(device=env.device).manual_seed(args.seed + 1)
        # Warm the kernels (Triton JIT / autotune, cuBLAS handles) with a small throw-away prefill and step.
        warm_ctx = min(min(args.context), max(16, runner.prefill_chunk_positions(max(args.batch), 64) * 2))
        # Timed twice: the first use's extra cost (kernel compilation, or loading it from Triton's and
        # Inductor's disk caches in a process after the first; cuBLAS set-up) is the difference. NCCL's
        # communicator is set up first, as apply's rank check (verify_ranks, on by default; off here) does.
        if env.world > 1 and mode != "hf":  # (hf runs on rank 0 alone)
            dist.all_reduce(torch.zeros(1, device=env.device))
            env.synchronize()
        first_use = []
        for attempt in range(2):
            warm = runner.new_cache(max(args.batch), warm_ctx + 1)
            env.synchronize()
            profiler = None
            if args.first_use_profile and attempt == 0 and env.rank == 0:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            t0 = time.perf_counter()
            runner.prefill(warm, max(args.batch), warm_ctx, gen)
            env.synchronize()
            first_use.append(time.perf_counter() - t0)
            if profiler is not None:
                profiler.disable()
                write_first_use_profile(profiler, out_dir / f"first_use_profile_{mode}.txt",
                                        f"# first prefill of mode {mode} in this process (rank 0), "
                                        f"B={max(args.batch)} x {warm_ctx} positions, {first_use[0]:.2f} s "
                                        f"under cProfile\n")
            del warm
        results.setdefault("first_use", {})[mode] = dict(first_prefill_s=first_use[0], again_s=first_use[1],
                                                         extra_s=first_use[0] - first_use[1])
        env.log(f"mode {mode}: first prefill in this process {first_use[0]:.2f} s, the same again "
                f"{first_use[1]:.2f} s: first use costs {first_use[0] - first_use[1]:.2f} s extra")
        if args.profile_prefill:  # the kernels are warm now
            batch, context = max(args.batch), min(args.context)
            if mode == "hf" and (why := hf_fits(runner, batch, context)):
                env.log(f"mode hf: prefill chunk profile skipped ({why})")
            else:
                try:
                    results.setdefault("prefill_profile", {})[mode] = profile_prefill(runner, batch, context, gen,
                                                                                     out_dir, args.trace_prefill)
                except Exception:  # noqa: BLE001 - the decode configs still run
                    tb = traceback.format_exc()
                    results["errors"].append(dict(mode=mode, phase="profile_prefill", rank=env.rank, tb=tb))
                    env.log(f"mode {mode}: prefill chunk profile FAILED\n{tb}")
        for batch in args.batch:
            for context in args.context:
                if mode == "hf" and (why := hf_fits(runner, batch, context)):
                    rank_rows += [dict(mode=mode, batch=batch, context=context, compile=c, status=f"skipped: {why}")
                                  for c in args.compiles]
                    env.log(f"  hf B={batch} T={context}: skipped ({why})")
                    continue
                recorder = None
                if mode == record_mode and (batch, context) == record_at:  # every rank runs them; rank 0 saves
                    from record_op_calls import OpCallRecorder

                    recorder, record_mode = OpCallRecorder(), None
                try:
                    rank_rows += run_config(runner, batch, context, args.compiles, gen, out_dir,
                                            args.profile and (batch, context) == profile_at, recorder)
                except Exception:  # noqa: BLE001 - keep going; the row says what failed
                    tb = traceback.format_exc()
                    results["errors"].append(dict(mode=mode, batch=batch, context=context, rank=env.rank, tb=tb))
                    env.log(f"  {mode} B={batch} T={context}: FAILED\n{tb}")
                if env.rank == 0:  # rank 0's rows so far: what a run cut short by a time limit leaves
                    partial = dict(results, rows=rank_rows, partial=True)
                    (out_dir / "results.partial.json").write_text(json.dumps(partial, indent=1, default=str))
                if recorder is not None and recorder.calls and env.rank == 0:
                    from record_op_calls import summarise

                    recorder.save(args.record, dict(info, mode=mode, batch=batch, context=context,
                                                    rank=env.rank))
                    env.log(f"recorded {len(recorder.calls)} distinct op calls to {args.record}:\n    "
                            + "\n    ".join(summarise(recorder.calls)))
        runner.close()
        del runner
        if mode != "hf":
            env.barrier()
    if "hf" not in modes:
        gathered = env.gather(rank_rows)
    if env.rank != 0:
        dist.destroy_process_group()
        return 0
    # Merge the ranks' rows of the collective modes: per-rank cache bytes and peaks, the max as the headline.
    def key(r):
        return r["mode"], r.get("compile"), r["batch"], r["context"]

    by_rank = [{key(r): r for r in rows} for rows in gathered]
    merged = []
    for row in gathered[0] + rank_rows[len(gathered[0]):]:  # then the HF rows (rank 0 only)
        row = dict(row)
        per_rank_rows = [m.get(key(row), {}) for m in by_rank] if row["mode"] != "hf" else [row]
        for name in PER_RANK_FIELDS:
            if name in row:
                per_rank = [r.get(name) for r in per_rank_rows]
                row[f"{name}_per_rank"] = per_rank
                row[f"{name}_max_rank"] = max((v for v in per_rank if v is not None), default=None)
        merged.append(row)
    results["rows"] = merged
    results["capacity"] = capacity(merged, env, args)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    results["notes"].append(plot(results, out_dir))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    dist.destroy_process_group()
    return 1 if results["errors"] else 0


def print_table(results):
    info = results["info"]
    print(f"\n==== bench_e2e: {info['device']} x {info['world']}, {info['layers']} layers, {info['dtype']} ====")
    print("| mode | compile | B | context | step ms (p50 / p90) | tok/s | kernels ms/step (NCCL) | prefill s | "
          "cache MiB/rank | peak GiB/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        if r.get("status") != "ok":
            print(f"| {r['mode']} | {r.get('compile')} | {r['batch']} | {r['context']} | {r.get('status')} |||||")
            continue
        kern = r.get("profile_kernel_ms_per_step")
        nccl = r.get("profile_nccl_ms_per_step") or 0.0
        peak = r.get("decode_peak_bytes_max_rank")
        print(f"| {r['mode']} | {r['compile']} | {r['batch']} | {r['context']} | {r['step_ms_median']:.3f} / "
              f"{r['step_ms_p90']:.3f} | {r['tokens_per_s']:.0f} | {f'{kern:.3f} ({nccl:.3f})' if kern else '-'} | "
              f"{'random fill' if r['prefill_s'] is None else format(r['prefill_s'], '.2f')} | "
              f"{r['cache_bytes_max_rank'] / 2**20:.1f} | "
              f"{f'{peak / 2**30:.2f}' if peak else '-'} |")
    for mode, c in sorted(results["capacity"].items()):
        print(f"capacity {mode} (PROJECTED): {c['cache_bytes_per_token_per_rank']:.0f} B/token/rank, "
              f"{c['tokens_per_rank']} tokens/rank; longest context per batch {c['longest_context']}")
    for mode, f in results.get("first_use", {}).items():
        print(f"first use {mode}: first prefill {f['first_prefill_s']:.2f} s, again {f['again_s']:.2f} s "
              f"({f['extra_s']:.2f} s extra; only the process's first mode compiles or loads the kernels)")
    for mode, pp in results.get("prefill_profile", {}).items():
        print(f"prefill chunk {mode}: B={pp['batch']} x {pp['chunk_positions']} after {pp['context_before']}: "
              + prefill_profile_summary(ProfileSums(**{k: pp[k] for k in ProfileSums._fields})))
    for n in results["notes"]:
        print("note:", n)
    if results["errors"]:
        print(f"ERRORS: {len(results['errors'])} (see results.json)")


if __name__ == "__main__":
    sys.exit(main())
