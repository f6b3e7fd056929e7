"""A real-dimension DeepSeek-V3.2 slice, saved and loaded the way users load the model, DCP against TP, with the
memory per GPU split and a capacity projection for the full 61-layer model on 8 x H100 and 8 x H200.

    torchrun --nproc-per-node 4 examples/real_dims_slice.py --out /tmp/slice            # NCCL, one GPU a rank
    torchrun --nproc-per-node 4 examples/real_dims_slice.py --ep --fp8                   # + HF expert parallelism,
                                                                                         #   a block-FP8 checkpoint
    torchrun --nproc-per-node 4 examples/real_dims_slice.py --dtype float32 --context 8192   # exact parity check
    torchrun --nproc-per-node 2 examples/real_dims_slice.py --smoke --out /tmp/smoke     # CPU, gloo, tiny dims

Verdict (exit status 0 / 1): bf16, the same first greedy token for every sequence and first-step logits within
2 % (relative L2) between DCP and TP (and the reference, if run); float32, every token equal and the logits
within 1e-4. Random weights make bf16 comparisons noisy where a discrete choice is close (the tiny --smoke model's
top-8-of-40 indexer selection: 30 % between bf16 and fp32 HF), so the test checks exact parity in float32.

What it does (progress lines on rank 0, a table at the end, ``--out``/results.json):

1. **Build and save.** DeepSeek-V3.2's published configuration (transformers' ``DeepseekV32Config`` defaults are
   its values: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128, indexer 64 heads x 128
   keeping the top 2048, 256 routed experts top-8 in 8 groups (top 4 groups), moe_intermediate 2048,
   intermediate 18432, vocabulary 129280, 61 layers, the first 3 dense; plus the checkpoint's yarn rope scaling,
   factor 40, which the defaults lack: ``PUBLISHED``), truncated to ``--layers`` (default 5: 3 dense + 2 MoE) and
   ``--experts`` routed experts (default 16; 256 is the real count; top-8 kept, groups kept valid). Random bf16
   weights: the model is made on the meta device, materialised on rank 0's device and filled per tensor
   (N(0, 1/fan_in), norms 1), then ``save_pretrained`` (safetensors) to ``--dir`` by rank 0; the others wait. A
   directory holding the same slice (``slice.json``) is reused. ``--fp8`` then rewrites the files as a block-FP8
   checkpoint like DeepSeek's release (float8_e4m3fn weights, a float32 ``weight_scale_inv`` per 128 x 128 block,
   ``quantization_config`` in config.json; embeddings, LM head, routers, the indexer's ``weights_proj`` and
   norms stay bf16; see ``FP8_KEEP_BF16`` for kv_a_proj_with_mqa).
2. **Load like a user.** ``dcp_compile.from_pretrained(dir, ep_size=N if --ep, dcp_size=...)``: HF tensor
   parallelism over all ranks (``tp_plan="auto"``, routed experts by expert with ``--ep``), then ``apply``. Twice,
   each a fresh load: DCP over the N ranks (``dcp_size=N``) and plain TP (``dcp_size=1``, the cache replicated).
   FP8: loaded dequantized (``FineGrainedFP8Config(dequantize=True)``; ``kv_a_proj_with_mqa`` is saved in bf16
   because that load rejects its partial edge block). ``apply`` also adopts HF's tensor-parallel shards of FP8
   linears kept as FP8 (``tests/test_fp8_tp.py``, the README's recipe), but running them needs HF's FP8 kernels,
   which transformers fetches from the Hub (the ``kernels`` package): not available offline, so not used here.
3. **Generate.** Random prompt ids, ``--batch`` x ``--context`` tokens (default 1 x 32768), greedy
   ``model.generate`` for ``--new-tokens`` (default 8) into a cache made with ``model.dcp.new_cache``. DCP against
   TP: how many leading greedy tokens agree per sequence, and the first step's logits relative L2 error (must be
   < 2 % with the same first tokens: bf16 rounds differently along the two paths, later tokens may drift).
   ``--reference``: rank 0 also runs the unmodified model on one device first, if it fits (HF materialises its
   [B, S, 64, S] fp32 indexer scores and the attention scores in prefill), and both are compared with it.
4. **Memory per GPU** (CUDA): weights (the bytes of the parameters this rank holds), cache
   (``cache.storage_bytes()``), activations (``torch.cuda.max_memory_allocated`` during generate, minus the two),
   and the cache bytes per token per layer per rank (pool bytes / (batch x tokens reserved x layers)).
5. **Capacity, PROJECTED** to the full 61-layer, 256-expert model on 8 x H100 (81559 MiB, what nvidia-smi reports
   for the 80 GB part) and 8 x H200 (143771 MiB, the 141 GB part), DCP 8 against TP 8: weights per GPU from the
   full configuration's parameters, placed as the loaded slice holds them (each parameter, layer numbers as
   ``*``: sharded over the ranks, or whole on every rank), in bf16 and in block FP8 (the release's format: FP8
   linears at 1 byte per weight + 4 bytes per 128 x 128 block; embeddings, LM head, routers, weights_proj, norms
   in bf16; kv_b_proj in bf16 because ``apply`` dequantizes it); the memory left for the cache after the
   weights and an activation reserve (the slice's measured activations of that mode + ``HEADROOM_BYTES``
   for NCCL and the allocator, or ``--activation-reserve-gb``); the context tokens the 8 GPUs hold and the
   longest context per sequence at batch 1 and ``--batch``, with the cache as measured (bf16) and with an FP8
   latent cache (656 B per token per layer for the latent, as DeepSeek's: 512 fp8 + 64 bf16 rope + 16 B of
   scales, plus the indexer keys as dcp_compile holds them) — a projection: dcp_compile has no FP8 cache yet.
   Configurations whose weights alone do not fit say so.

The slice's decode is eager HF ``generate`` (no compile): this checks the real-dims path end to end and measures
memory; step times are bench_e2e.py's job.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import pathlib
import re
import sys
import time

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIRST_STEP_RTOL = 2e-2  # bf16: first-step logits relative L2 error bound (as examples/generate.py)
FP32_RTOL = 1e-4  # float32: the two paths differ by summation order only
HEADROOM_BYTES = 4 << 30  # on top of the measured activations: NCCL buffers, allocator fragmentation
FULL_LAYERS = 61
GPUS = 8
MACHINES = {"8 x H100 80GB": 81559 * 2**20, "8 x H200 141GB": 143771 * 2**20}  # per GPU, as nvidia-smi reports
FP8_BLOCK = (128, 128)
SMOKE_FP8_BLOCK = (16, 16)
# Kept bf16 in the FP8 checkpoint: as in DeepSeek's release (embeddings, LM head, the MoE routers, the indexer's
# weights_proj), and kv_a_proj_with_mqa, which the release stores in FP8 with a partial edge block (576 rows =
# 4.5 blocks of 128: a 5-row scale grid): transformers 5.24's dequantizing load raises "Weight shape (576, 7168)
# not divisible by scale grid (5, 56)" on it (Fp8Dequantize derives the block from the grid), so the slice keeps
# it bf16. The capacity projection counts it as FP8, as the release holds it.
FP8_KEEP_BF16 = ("embed_tokens.weight", "lm_head.weight", "weights_proj.weight", "mlp.gate.weight",
                 "kv_a_proj_with_mqa.weight")
# DeepSeek-V3.2's config.json (deepseek-ai/DeepSeek-V3.2), the values that shape the model.
PUBLISHED = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, norm_topk_prob=True,
    max_position_embeddings=163840, rms_norm_eps=1e-6, first_k_dense_replace=3, index_topk=2048,
    index_head_dim=128, index_n_heads=64, tie_word_embeddings=False,
)
PUBLISHED_ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=5, help="decoder layers (the first 3 dense, then MoE)")
    p.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (the real model: 256)")
    p.add_argument("--context", type=int, default=32768, help="prompt tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--dir", help="where the slice checkpoint is saved (default: a directory under /tmp named by "
                                 "the slice; reused when it holds the same slice)")
    p.add_argument("--fp8", action="store_true", help="save a block-FP8 checkpoint (loaded dequantized)")
    p.add_argument("--ep", action="store_true", help="HF expert parallelism (ep_size = the world size)")
    p.add_argument("--reference", action="store_true",
                   help="also run the unmodified model on rank 0's device, if it fits")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--activation-reserve-gb", type=float, default=None,
                   help="activation reserve of the projection (default: measured activations + 4 GiB; CPU: 16)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "out" / "slice"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU + gloo, tiny dims: a functional test")
    args = p.parse_args(argv)
    if args.smoke:
        if args.context == p.get_default("context"):
            args.context = 40  # > the tiny index_topk 8: the indexer selects
        if args.experts == p.get_default("experts"):
            args.experts = 8
        args.page_size = min(args.page_size, 8)
    dense = min(3, args.layers)
    if args.layers <= dense:
        p.error(f"--layers {args.layers}: needs more than 3 layers (the first 3 are dense) to hold an MoE layer")
    top_k = 2 if args.smoke else PUBLISHED["num_experts_per_tok"]
    if args.experts < top_k:
        p.error(f"--experts {args.experts}: fewer than the {top_k} experts each token is routed to")
    if args.dir is None:
        name = (f"dcp_slice_{'smoke_' if args.smoke else ''}{args.layers}L_{args.experts}E{'_fp8' if args.fp8 else ''}"
                f"{'_fp32' if args.dtype == 'float32' else ''}")
        args.dir = os.path.join("/tmp", name)
    return args


# ------------------------------------------------------------------------------------------------ the slice

def expert_groups(experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group) for ``experts``: the real 8 groups / top 4 where they stay valid (every group holds at
    least 2 experts, HF scores a group by its top 2, and the kept groups hold at least top_k experts), else 1 / 1."""
    n_group, topk_group = PUBLISHED["n_group"], PUBLISHED["topk_group"]
    if experts % n_group == 0 and experts // n_group >= 2 and topk_group * (experts // n_group) >= top_k:
        return n_group, topk_group
    return 1, 1


def slice_config(args, *, layers=None, experts=None):
    """The published DeepSeek-V3.2 configuration with ``layers`` layers and ``experts`` routed experts (``--smoke``:
    the tests' tiny dims with the same layer structure). Positions: room for the prompt and the new tokens."""
    from transformers import DeepseekV32Config

    layers = args.layers if layers is None else layers
    experts = args.experts if experts is None else experts
    positions = max(PUBLISHED["max_position_embeddings"], args.context + args.new_tokens)
    if args.smoke:
        from dcp_compile.testing import tiny_deepseek_v32_config

        n_group, topk_group = expert_groups(experts, 2)
        return tiny_deepseek_v32_config(num_hidden_layers=layers, first_k_dense_replace=3, n_routed_experts=experts,
                                        n_group=n_group, topk_group=topk_group, max_position_embeddings=positions,
                                        rope_parameters=dict(PUBLISHED_ROPE))
    n_group, topk_group = expert_groups(experts, PUBLISHED["num_experts_per_tok"])
    return DeepseekV32Config(**dict(PUBLISHED, num_hidden_layers=layers, n_routed_experts=experts, n_group=n_group,
                                    topk_group=topk_group, max_position_embeddings=positions),
                             rope_parameters=dict(PUBLISHED_ROPE))


def full_config():
    """DeepSeek-V3.2 as published: 61 layers, 256 routed experts, yarn rope."""
    from transformers import DeepseekV32Config

    return DeepseekV32Config(**PUBLISHED, rope_parameters=dict(PUBLISHED_ROPE))


def published_config_differences() -> dict:
    """The published values transformers' ``DeepseekV32Config()`` defaults differ on: {name: (default, published)}."""
    from transformers import DeepseekV32Config

    default = DeepseekV32Config()
    out = {k: (getattr(default, k), v) for k, v in PUBLISHED.items() if getattr(default, k) != v}
    rope = default.rope_parameters or {}
    if any(rope.get(k) != v for k, v in PUBLISHED_ROPE.items()):
        out["rope_parameters"] = (rope, PUBLISHED_ROPE)
    return out


def meta_model(cfg):
    """The model of ``cfg`` on the meta device: names and global shapes of every parameter, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def build_slice(cfg, dtype, device, seed):
    """The slice with random weights: made on meta, materialised on ``device`` and filled per tensor (no HF init
    pass): weights N(0, 1/fan_in) as the tests' tiny models (attention far from uniform, indexer scores well
    separated), norms 1, biases and the routers' score-correction bias 0."""
    model = meta_model(cfg).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
            else:
                p.zero_()
        for name, b in model.named_buffers():  # the persistent one (e_score_correction_bias) is saved
            if "rotary" not in name:
                b.zero_()
    return model.eval()


def quantize_checkpoint(path, block) -> int:
    """Rewrite the saved safetensors files as a block-FP8 checkpoint: every 2-D ``.weight`` but ``FP8_KEEP_BF16``
    (the linears; routed experts are saved one linear per expert) as float8_e4m3fn + ``weight_scale_inv``, and the
    ``quantization_config`` in config.json. Returns the number of quantized weights."""
    from dcp_compile.testing import write_block_fp8

    device = "cuda" if torch.cuda.is_available() else None
    quantized = write_block_fp8(
        path, block, lambda key, value: key.endswith(".weight") and value.dim() == 2 and not key.endswith(FP8_KEEP_BF16),
        ["lm_head", "weights_proj", "kv_a_proj_with_mqa"], device=device)
    return len(quantized)


def save_slice(args, env, cfg) -> dict:
    """Rank 0 builds and saves the slice (unless ``--dir`` holds it already); every rank returns what was done."""
    marker = pathlib.Path(args.dir) / "slice.json"
    want = dict(config=cfg.to_diff_dict(), fp8=args.fp8, seed=args.seed, dtype=args.dtype)
    info = {}
    if env.rank == 0:
        if marker.exists() and json.loads(marker.read_text()).get("slice") == json.loads(json.dumps(want)):
            info = dict(reused=True)
            env.log(f"slice: reusing {args.dir}")
        else:
            t0 = time.perf_counter()
            env.log(f"slice: building {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts on "
                    f"{env.device}")
            model = build_slice(cfg, getattr(torch, args.dtype), env.device, args.seed)
            params = sum(p.numel() for p in model.parameters())
            built = time.perf_counter()
            env.log(f"slice: {params / 1e9:.3f} B parameters built in {built - t0:.1f} s; saving to {args.dir}")
            marker.unlink(missing_ok=True)
            model.save_pretrained(args.dir, max_shard_size="5GB")
            del model
            gc.collect()
            env.empty_cache()
            saved = time.perf_counter()
            info = dict(reused=False, parameters=params, build_s=built - t0, save_s=saved - built)
            if args.fp8:
                info["fp8_weights"] = quantize_checkpoint(args.dir, SMOKE_FP8_BLOCK if args.smoke else FP8_BLOCK)
                info["quantize_s"] = time.perf_counter() - saved
                env.log(f"slice: {info['fp8_weights']} weights quantized to block FP8 in {info['quantize_s']:.1f} s")
            marker.write_text(json.dumps(dict(slice=want, **info), indent=1))
            env.log(f"slice: saved in {info['save_s']:.1f} s")
    env.barrier()
    return env.broadcast(info)


# ------------------------------------------------------------------------------------------------ the runs

class Env:
    """Ranks, device, the default process group (NCCL on GPUs, gloo with --smoke) and a gloo group with a long
    timeout for waiting while rank 0 saves or runs the reference, and for exchanging results."""

    def __init__(self, smoke: bool):
        if "RANK" not in os.environ:
            sys.exit("run it under torchrun (e.g. torchrun --nproc-per-node 4 examples/real_dims_slice.py)")
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.cuda = torch.cuda.is_available() and not smoke
        if not self.cuda and not smoke:
            sys.exit("real_dims_slice needs CUDA (or --smoke for the CPU functional run)")
        if self.cuda:
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # Bound to the device, as transformers would init it (its DeviceMesh then splits subgroups off this one).
        dist.init_process_group("nccl" if self.cuda else "gloo", timeout=datetime.timedelta(minutes=20),
                                device_id=self.device if self.cuda else None)
        self.cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))

    def log(self, *parts):
        if self.rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)

    def barrier(self):
        dist.barrier(group=self.cpu_group)

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def empty_cache(self):
        if self.cuda:
            torch.cuda.empty_cache()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def allocated(self):
        return torch.cuda.memory_allocated(self.device) if self.cuda else None


def load_kwargs(args) -> dict:
    kwargs = dict(dtype=getattr(torch, args.dtype), attn_implementation=args.attn)
    if args.smoke:
        kwargs["experts_implementation"] = "eager"  # CPU: no grouped_mm kernel for every dtype
    if args.fp8:
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    return kwargs


def local_parameters(model) -> dict[str, tuple[int, int]]:
    """{name: (elements this rank holds, bytes)}: a DTensor's local shard, else the whole tensor."""
    from dcp_compile.hf_parallel import is_dtensor

    out = {}
    for name, p in model.named_parameters():
        t = p.to_local() if is_dtensor(p) else p
        out[name] = (t.numel(), t.numel() * t.element_size())
    return out


def prompt(args, vocab, device):
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same ids on every rank
    return torch.randint(2, vocab, (args.batch, args.context), generator=gen).to(device)


def generate(model, ids, cache, args):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:].cpu(), out.logits[0].float().cpu()


def run_mode(mode, args, env) -> dict:
    """Load fresh with HF TP (EP), apply (DCP over every rank, or dcp_size=1), generate; this rank's numbers."""
    import dcp_compile

    dcp_size = env.world if mode == "dcp" else 1
    env.log(f"{mode}: dcp_compile.from_pretrained(tp {env.world}{f', ep {env.world}' if args.ep else ''}, "
            f"dcp_size {dcp_size})")
    t0 = time.perf_counter()
    model = dcp_compile.from_pretrained(args.dir, ep_size=env.world if args.ep else None, dcp_size=dcp_size,
                                        page_size=args.page_size, **load_kwargs(args))
    load_s = time.perf_counter() - t0
    params = local_parameters(model)
    weight_bytes = sum(b for _, b in params.values())
    env.log(f"{mode}: loaded and applied in {load_s:.1f} s (apply {model.dcp.apply_stats['seconds'].get('total', 0):.1f} s), "
            f"weights {weight_bytes / 2**30:.2f} GiB on rank 0")
    ids = prompt(args, model.config.vocab_size, model.device)
    tokens_reserved = args.context + args.new_tokens
    cache = model.dcp.new_cache(args.batch, tokens_reserved)
    cache_bytes = cache.storage_bytes()
    before = env.allocated()
    env.reset_peak()
    t0 = time.perf_counter()
    tokens, first_logits = generate(model, ids, cache, args)
    generate_s = time.perf_counter() - t0
    peak = env.peak()
    layers = len(model.dcp.cache_format.layer_ids)
    fmt = model.dcp.cache_format
    index_row_bytes = (fmt.index_dim or 0) * (fmt.index_dtype or fmt.dtype).itemsize
    row_bytes = fmt.latent_dim * fmt.dtype.itemsize + index_row_bytes
    # DeepSeek's FP8 MLA cache row (656 B at kv_lora 512, rope 64): the latent in fp8 with a float32 scale per 128
    # values, the rope part in bf16; the indexer keys as dcp_compile holds them.
    kv_lora, rope = model.config.kv_lora_rank, model.config.qk_rope_head_dim
    fp8_latent_row_bytes = kv_lora + 2 * rope + 4 * -(-kv_lora // 128)
    env.log(f"{mode}: generated {args.batch} x {args.new_tokens} tokens after a {args.context}-token prompt in "
            f"{generate_s:.1f} s; cache {cache_bytes / 2**20:.1f} MiB"
            + (f", peak {peak / 2**30:.2f} GiB" if peak is not None else "") + " on rank 0")
    result = dict(
        mode=mode, dcp_size=dcp_size, load_s=load_s, apply_stats=dict(model.dcp.apply_stats), generate_s=generate_s,
        weight_bytes=weight_bytes, cache_bytes=cache_bytes, peak_bytes=peak, allocated_before_bytes=before,
        activation_bytes=(peak - weight_bytes - cache_bytes) if peak is not None else None,
        cache_tokens_reserved=tokens_reserved, cache_layers=layers, cache_row_bytes=row_bytes,
        cache_index_row_bytes=index_row_bytes, cache_fp8_latent_row_bytes=fp8_latent_row_bytes + index_row_bytes,
        cache_bytes_per_token_per_layer=cache_bytes / (args.batch * tokens_reserved * layers),
        tokens=tokens, first_logits=first_logits, local_parameters=params,
    )
    del model, cache
    gc.collect()
    env.empty_cache()
    return result


def reference_fits(args, env, slice_parameters: int, cfg) -> str | None:
    """None if the unmodified model can run on rank 0's device, else why not: its weights, its cache (expanded
    keys and values, 128 x (192 + 128) per token per layer, and the indexer keys) and its prefill's [B, S, 64, S]
    fp32 indexer scores and [B, 128, S, S] attention scores."""
    if not env.cuda:
        return None
    s, b, L = args.context, args.batch, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    need = (slice_parameters * 2 + b * (s + args.new_tokens) * L * 2 * (heads * (cfg.qk_head_dim + cfg.v_head_dim)
                                                                        + cfg.index_head_dim)
            + b * s * s * (cfg.index_n_heads * 4 + heads * 2 * 2))
    free = torch.cuda.mem_get_info(env.device)[0]
    if need > 0.9 * free:
        return f"needs ~{need / 2**30:.0f} GiB on one GPU, {free / 2**30:.0f} GiB free"
    return None


def run_reference(args, env, cfg, slice_parameters) -> dict:
    """Rank 0: the unmodified model on its device; the others wait."""
    result = None
    if env.rank == 0:
        why = reference_fits(args, env, slice_parameters, cfg)
        if why:
            result = dict(status=f"skipped: {why}")
            env.log(f"reference: skipped ({why})")
        else:
            from transformers import AutoModelForCausalLM

            env.log("reference: the unmodified model on one device")
            kwargs = load_kwargs(args)
            model = AutoModelForCausalLM.from_pretrained(args.dir, device_map={"": env.device}, **kwargs).eval()
            tokens, first_logits = generate(model, prompt(args, model.config.vocab_size, env.device), None, args)
            result = dict(status="ok", tokens=tokens, first_logits=first_logits)
            del model
            gc.collect()
            env.empty_cache()
    env.barrier()
    return result


def compare(got, want, dtype: str) -> dict:
    """Leading equal greedy tokens per sequence, first-step logits relative L2, and the verdict: float32 every
    token equal and the logits within ``FP32_RTOL``; bf16 the first tokens equal and the logits within
    ``FIRST_STEP_RTOL`` (later tokens may drift apart)."""
    equal_prefix = (got["tokens"] == want["tokens"]).long().cumprod(dim=1).sum(dim=1).tolist()
    rel = ((got["first_logits"] - want["first_logits"]).norm() / want["first_logits"].norm()).item()
    first_equal = all(n >= 1 for n in equal_prefix)
    steps = got["tokens"].shape[1]
    if dtype == "float32":
        ok, rule = all(n == steps for n in equal_prefix) and rel < FP32_RTOL, f"every token, logits < {FP32_RTOL:g}"
    else:
        ok, rule = first_equal and rel < FIRST_STEP_RTOL, f"first tokens, first-step logits < {FIRST_STEP_RTOL:g}"
    return dict(equal_leading_tokens=equal_prefix, of=steps, first_tokens_equal=first_equal,
                first_step_logits_rel_l2=rel, rule=rule, ok=ok)


# ------------------------------------------------------------------------------------------- the projection

def pattern(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)


def placement(local: dict[str, tuple[int, int]], global_numel: dict[str, int]) -> dict[str, tuple[bool, int]]:
    """{parameter pattern: (sharded over the ranks?, bytes per element as loaded)}, read off what this rank holds
    against the global shapes (HF keeps the MoE routers in float32, for one)."""
    out = {}
    for name, (numel, nbytes) in local.items():
        out.setdefault(pattern(name), (numel < global_numel[name], nbytes // max(numel, 1)))
    return out


def fp8_bytes(name: str, shape: tuple[int, ...], release: bool, itemsize: int = 2) -> int:
    """Bytes of one parameter in the block-FP8 format: linears (and the fused routed experts) 1 byte per weight +
    a float32 scale per 128 x 128 block; the rest as loaded (``itemsize``: bf16, the routers float32); kv_b_proj
    bf16 (apply dequantizes it). ``release``: count kv_a_proj_with_mqa as FP8 (DeepSeek's release) rather than as
    the slice's checkpoint keeps it."""
    numel = math.prod(shape)
    keep = FP8_KEEP_BF16 if not release else tuple(k for k in FP8_KEEP_BF16 if k != "kv_a_proj_with_mqa.weight")
    linear = (name.endswith(".weight") and len(shape) == 2) or name.endswith(("experts.gate_up_proj",
                                                                                  "experts.down_proj"))
    if not linear or name.endswith(keep) or name.endswith("kv_b_proj.weight"):
        return numel * itemsize
    *experts, rows, cols = shape
    blocks = math.prod(experts) * -(-rows // FP8_BLOCK[0]) * -(-cols // FP8_BLOCK[1])
    return numel + 4 * blocks


def bf16_itemsize(name: str) -> int:
    """Bytes per element of a parameter in a bf16 model: 2, or 4 for what transformers always keeps in float32
    (DeepSeek-V3.2's routers: ``_keep_in_fp32_modules_strict``)."""
    from transformers import DeepseekV32ForCausalLM

    return 4 if any(k in name for k in DeepseekV32ForCausalLM._keep_in_fp32_modules_strict or ()) else 2


def weights_per_gpu(shapes: dict[str, tuple[int, ...]], placed: dict[str, tuple[bool, int]], gpus: int,
                    fp8: bool = False, as_loaded: bool = False) -> dict:
    """Bytes per GPU of a model with these parameter shapes, each sharded over ``gpus`` or whole as ``placed``
    says (whole for a parameter it does not name, listed in ``unplaced``), in bf16 (``bf16_itemsize``), in the
    block-FP8 format (``fp8``: ``fp8_bytes``) or ``as_loaded`` (the dtype ``placed`` read off the slice)."""
    sharded = whole = 0
    unplaced = []
    for name, shape in shapes.items():
        if pattern(name) not in placed:
            unplaced.append(name)
        is_sharded, loaded_itemsize = placed.get(pattern(name), (False, 2))
        itemsize = loaded_itemsize if as_loaded else bf16_itemsize(name)
        size = fp8_bytes(name, shape, release=True, itemsize=itemsize) if fp8 else math.prod(shape) * itemsize
        if is_sharded:
            sharded += size
        else:
            whole += size
    return dict(bytes=sharded / gpus + whole, sharded_bytes=sharded, whole_bytes=whole, unplaced=unplaced)


def capacity(args, modes: dict, placed: dict, full_shapes: dict) -> dict:
    """The PROJECTED capacity of the full model on 8 GPUs, DCP 8 vs TP 8 (see the module docstring, step 5)."""
    dcp, tp = modes["dcp"], modes["tp"]
    world = dcp["world"]
    # The whole cache per token per layer (TP's replicated pool holds it all), and DCP's per-rank share at 8.
    per_token = {"tp": tp["cache_bytes_per_token_per_layer_max_rank"],
                 "dcp": dcp["cache_bytes_per_token_per_layer_max_rank"] * world / GPUS}
    row, fp8_row = dcp["cache_row_bytes"], dcp["cache_fp8_latent_row_bytes"]
    reserve = {}
    for mode in ("dcp", "tp"):
        act = modes[mode].get("activation_bytes_max_rank")
        if args.activation_reserve_gb is not None:
            reserve[mode] = args.activation_reserve_gb * 2**30
        elif act is not None:
            reserve[mode] = act + HEADROOM_BYTES
        else:
            reserve[mode] = 16 * 2**30  # CPU: nothing measured
    weights = {w: weights_per_gpu(full_shapes, placed, GPUS, fp8=(w == "fp8")) for w in ("bf16", "fp8")}
    rows = []
    for machine, memory in MACHINES.items():
        for wdtype in ("bf16", "fp8"):
            for mode in ("dcp", "tp"):
                for cache_dtype in ("bf16", "fp8"):
                    w = weights[wdtype]["bytes"]
                    per = per_token[mode] * (fp8_row / row if cache_dtype == "fp8" else 1.0)
                    free = memory - w - reserve[mode]
                    r = dict(machine=machine, gpu_memory_bytes=memory, weights=wdtype, mode=f"{mode} {GPUS}",
                             cache=cache_dtype, weight_bytes_per_gpu=w, activation_reserve_bytes=reserve[mode],
                             cache_bytes_per_token_per_layer_per_gpu=per)
                    if free <= 0:
                        r.update(fits=False, free_for_cache_bytes=free, note="weights + reserve do not fit")
                    else:
                        # tokens of cache this GPU holds = the context tokens of the node (DCP: each GPU 1/8 of them)
                        tokens = int(free // (per * FULL_LAYERS))
                        r.update(fits=True, free_for_cache_bytes=free, context_tokens_per_node=tokens,
                                 longest_context={str(b): tokens // b for b in sorted({1, args.batch})})
                    rows.append(r)
    return dict(projected=True, gpus=GPUS, layers=FULL_LAYERS, measured_world=world,
                cache_bytes_per_token_per_layer={"tp": per_token["tp"], "dcp_at_8": per_token["dcp"],
                                                 "dcp_measured": dcp["cache_bytes_per_token_per_layer_max_rank"]},
                cache_row_bytes=row, fp8_latent_row_bytes=fp8_row, reserve_bytes=reserve,
                headroom_bytes=HEADROOM_BYTES, model_max_positions=PUBLISHED["max_position_embeddings"],
                full_model_parameters=sum(math.prod(s) for s in full_shapes.values()),
                weights={k: {kk: vv for kk, vv in v.items() if kk != "unplaced"} for k, v in weights.items()},
                unplaced=weights["bf16"]["unplaced"], rows=rows)


# ------------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    env = Env(args.smoke)
    out_dir = pathlib.Path(args.out)
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.dir).mkdir(parents=True, exist_ok=True)
    cfg = slice_config(args)
    diffs = published_config_differences()
    env.log(f"real_dims_slice: world {env.world}, {'CUDA/NCCL' if env.cuda else 'CPU/gloo'}, {args.layers} layers, "
            f"{args.experts} experts, batch {args.batch} x context {args.context}, +{args.new_tokens} tokens, "
            f"{'FP8 checkpoint' if args.fp8 else 'bf16 checkpoint'}{', EP' if args.ep else ''}")
    env.log("DeepseekV32Config() defaults vs the published config: "
            + ("; ".join(f"{k}: default {a}, published {b}" for k, (a, b) in diffs.items()) or "identical"))
    results = dict(info=dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv, world=env.world,
                             device=torch.cuda.get_device_name(env.device) if env.cuda else "cpu",
                             torch=torch.__version__, smoke=args.smoke, layers=args.layers, experts=args.experts,
                             context=args.context, batch=args.batch, new_tokens=args.new_tokens, fp8=args.fp8,
                             ep=args.ep, dtype=args.dtype, attn=args.attn, page_size=args.page_size, dir=args.dir,
                             config_defaults_vs_published={k: [str(a), str(b)] for k, (a, b) in diffs.items()}))
    results["slice"] = save_slice(args, env, cfg)
    shapes = {n: tuple(p.shape) for n, p in meta_model(cfg).named_parameters()}
    slice_parameters = sum(math.prod(s) for s in shapes.values())
    reference = run_reference(args, env, cfg, slice_parameters) if args.reference else None

    runs, modes = {}, {}
    for mode in ("dcp", "tp"):
        run = run_mode(mode, args, env)
        runs[mode] = run
        per_rank = env.gather({k: run[k] for k in ("weight_bytes", "cache_bytes", "peak_bytes", "activation_bytes",
                                                   "cache_bytes_per_token_per_layer", "allocated_before_bytes")})
        summary = {k: v for k, v in run.items() if k not in ("tokens", "first_logits", "local_parameters")}
        summary["world"] = env.world
        summary["tokens"] = run["tokens"].tolist()
        for key in per_rank[0]:
            values = [r[key] for r in per_rank]
            summary[f"{key}_per_rank"] = values
            summary[f"{key}_max_rank"] = None if None in values else max(values)
        modes[mode] = summary
        results["modes"] = modes
        if env.rank == 0:
            (out_dir / "results.partial.json").write_text(json.dumps(results, indent=1, default=str))

    placed = placement(runs["dcp"]["local_parameters"], {n: math.prod(s) for n, s in shapes.items()})
    predicted = weights_per_gpu(shapes, placed, env.world, as_loaded=True)["bytes"]
    if env.rank != 0:
        dist.destroy_process_group()
        return 0

    parity = dict(dcp_vs_tp=compare(runs["dcp"], runs["tp"], args.dtype))
    if reference is not None:
        parity["reference"] = reference["status"]
        if reference["status"] == "ok":
            parity["dcp_vs_reference"] = compare(runs["dcp"], reference, args.dtype)
            parity["tp_vs_reference"] = compare(runs["tp"], reference, args.dtype)
    results["parity"] = parity
    results["placement"] = dict(sharded=sorted(k for k, (v, _) in placed.items() if v),
                                whole=sorted(k for k, (v, _) in placed.items() if not v),
                                bytes_per_element={k: b for k, (_, b) in placed.items()},
                                slice_weight_bytes_predicted_rank0=predicted)
    # The projection is of the real model whatever the slice's dims (--smoke checks its arithmetic).
    full_shapes = {n: tuple(p.shape) for n, p in meta_model(full_config()).named_parameters()}
    results["capacity"] = capacity(args, modes, placed, full_shapes)
    ok = all(v["ok"] for k, v in parity.items() if isinstance(v, dict))
    results["ok"] = ok
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_report(results)
    env.log(f"wrote {out_dir / 'results.json'}")
    dist.destroy_process_group()
    return 0 if ok else 1


def gib(x):
    return "-" if x is None else f"{x / 2**30:.2f}"


def print_report(results):
    info, modes, cap = results["info"], results["modes"], results["capacity"]
    print(f"\n==== DeepSeek-V3.2 slice: {info['layers']} layers, {info['experts']} experts, {info['device']} x "
          f"{info['world']}, batch {info['batch']} x {info['context']} tokens, {info['dtype']}"
          f"{', FP8 checkpoint' if info['fp8'] else ''}{', EP' if info['ep'] else ''} ====")
    for name, c in results["parity"].items():
        if isinstance(c, dict):
            print(f"{name}: leading equal tokens {c['equal_leading_tokens']} of {c['of']}, first step logits rel L2 "
                  f"{c['first_step_logits_rel_l2']:.2e}: {'PASS' if c['ok'] else 'FAIL'} ({c['rule']})")
        else:
            print(f"{name}: {c}")
    print("\nmemory per GPU (max over ranks), GiB")
    print("| mode | weights | cache | activations | peak | cache B/token/layer/rank | load s | generate s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, m in modes.items():
        print(f"| {mode} {m['dcp_size'] if mode == 'dcp' else 1} | {gib(m['weight_bytes_max_rank'])} | "
              f"{gib(m['cache_bytes_max_rank'])} | {gib(m['activation_bytes_max_rank'])} | "
              f"{gib(m['peak_bytes_max_rank'])} | {m['cache_bytes_per_token_per_layer_max_rank']:.1f} | "
              f"{m['load_s']:.1f} | {m['generate_s']:.1f} |")
    w = cap["weights"]
    print(f"\ncapacity of the full model ({cap['full_model_parameters'] / 1e9:.1f} B parameters, {cap['layers']} "
          f"layers) on {cap['gpus']} GPUs, PROJECTED from the measured cache bytes: weights per GPU bf16 "
          f"{gib(w['bf16']['bytes'])} GiB, block FP8 {gib(w['fp8']['bytes'])} GiB; activation reserve "
          + ", ".join(f"{k} {gib(v)} GiB" for k, v in cap["reserve_bytes"].items())
          + f"; cache per token per layer per GPU: tp {cap['cache_bytes_per_token_per_layer']['tp']:.0f} B, dcp 8 "
          f"{cap['cache_bytes_per_token_per_layer']['dcp_at_8']:.0f} B (FP8 latent cache: x "
          f"{cap['fp8_latent_row_bytes']}/{cap['cache_row_bytes']}, a projection: dcp_compile has no FP8 cache)")
    batches = sorted({1, info["batch"]})
    print("| machine | weights | mode | cache | weights GiB/GPU | free for cache GiB/GPU | context tokens (node) | "
          + " | ".join(f"longest context B={b}" for b in batches) + " |")
    print("|---" * (7 + len(batches)) + "|")
    for r in cap["rows"]:
        head = (f"| {r['machine']} | {r['weights']} | {r['mode']} | {r['cache']} | {gib(r['weight_bytes_per_gpu'])} | ")
        if not r["fits"]:
            print(head + f"{r['note']} |" + " |" * (1 + len(batches)))
            continue
        longest = [r["longest_context"][str(b)] for b in batches]
        print(head + f"{gib(r['free_for_cache_bytes'])} | {r['context_tokens_per_node']:,} | "
              + " | ".join(f"{n:,}" + (" (> model max)" if n > cap["model_max_positions"] else "") for n in longest)
              + " |")
    print("note: FP8 weights are a projection: dcp_compile adopts HF's TP shards of bf16 attention weights only "
          "(FP8 checkpoints load dequantized under HF TP today)")
    print(f"verdict: {'PASS' if results['ok'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
