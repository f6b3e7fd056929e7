"""Demo: HF generate with decode context parallelism, checked against the single-device model.

    python examples/generate.py                                       # spawns 2 CPU ranks (gloo) itself
    python examples/generate.py --nproc 4 --dtype bfloat16            # 4 CPU ranks, bfloat16
    torchrun --nproc-per-node 2 examples/generate.py                  # torchrun starts the ranks
    torchrun --nproc-per-node 2 examples/generate.py --compile        # with torch.compile(inductor)
    torchrun --nproc-per-node 2 examples/generate.py --cudagraphs     # decode steps replayed as CUDA graphs
    torchrun --nproc-per-node 2 examples/generate.py --model PATH     # a model saved with save_pretrained

Started without torchrun (no RANK / WORLD_SIZE in the environment) it spawns ``--nproc`` CPU processes joined
by gloo (``dcp_compile.testing.run_ranks``). Under torchrun, on a machine with at least as many GPUs as
processes, it runs on CUDA with NCCL, else on CPU with gloo. Every rank runs the unmodified model too (the
reference), then the DCP model; rank 0 prints the tokens, how many of them equal HF's, the verdict and the
cache bytes per rank against the single-device cache.

Verdict and exit status:

- float32: every generated token must equal the single-device HF model's, on every rank; exit 1 otherwise.
- bfloat16 / float16: absorbed MLA rounds differently from HF's expanded keys, so greedy tokens can drift apart
  after some steps. The demo exits 0 if the *first* step agrees on every rank: the same first token for every
  prompt and first-step logits within 2 % of HF's (relative L2 error < 0.02); exit 1 otherwise. It reports
  how many generated tokens equal HF's, per prompt and in total, counted up to each prompt's first
  divergence (after it the two continue from different contexts), and where the first divergence is.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

import dcp_compile
from dcp_compile.testing import RankFailed, hf_cache_bytes, left_padded_prompts, run_ranks, tiny_deepseek_v32

FIRST_STEP_RTOL = 2e-2  # reduced precision: first-step logits relative error bound


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a DeepSeek-V3.2 checkpoint directory (default: the tiny embedded config)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks to spawn when not started by torchrun")
    p.add_argument("--dcp-size", type=int, default=None, help="ranks sharing one cache (default: all)")
    p.add_argument("--page-size", type=int, default=4)
    p.add_argument("--interleave", type=int, default=1)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[7, 23, 40], help="one prompt per length (left padded)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--compile", action="store_true", help="torch.compile(model.forward, backend='inductor')")
    p.add_argument("--cudagraphs", action="store_true",
                   help="dcp_compile.compile_decode(model): decode steps compiled once (static shapes) and replayed "
                        "as CUDA graphs (mode='reduce-overhead'; on CPU, compiled without graphs)")
    return p.parse_args(argv)


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[list[int], str]:
    """Per prompt, the generated tokens equal to HF's before the first divergence, and a line about them."""
    equal_prefix = (got == want).long().cumprod(dim=1).sum(dim=1).tolist()
    steps = got.shape[1]
    line = (f"tokens equal to HF's: {sum(equal_prefix)} of {steps * len(equal_prefix)} "
            f"(per prompt {equal_prefix} of {steps}")
    diverged = [(n, row) for row, n in enumerate(equal_prefix) if n < steps]
    if diverged:
        step, row = min(diverged)
        line += (f"; first divergence at step {step} for prompt {row}: HF {want[row, step].item()}, "
                 f"DCP {got[row, step].item()}")
    return equal_prefix, line + ")"


def demo(rank: int, world: int, args, device: torch.device) -> tuple[list[str], bool]:
    """One rank's demo (the process group is up): returns rank 0's report lines and whether every rank passed."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    dtype = getattr(torch, args.dtype)

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn).eval()
    else:
        model = tiny_deepseek_v32(seed=0, dtype=dtype, attn_implementation=args.attn)
    model = model.to(device)
    reference = copy.deepcopy(model)

    vocab = model.config.vocab_size
    ids, mask = left_padded_prompts(args.prompt_lengths, vocab=vocab, seed=0, pad_id=model.config.pad_token_id or 0)
    ids, mask = ids.to(device), mask.to(device)
    gen = dict(attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True,
               output_logits=True)

    with torch.no_grad():
        want = reference.generate(ids, **gen)
    single_device_bytes = hf_cache_bytes(want.cache)
    del reference

    dcp_compile.apply(model, mesh, dcp_size=args.dcp_size, page_size=args.page_size, interleave=args.interleave)
    if args.cudagraphs:
        dcp_compile.compile_decode(model, mode="reduce-overhead" if model.dcp.device.type == "cuda" else None)
    elif args.compile:
        model.forward = torch.compile(model.forward, backend="inductor")
    got = model.generate(ids, **gen)
    if args.cudagraphs:  # before the process group goes: recorded CUDA graphs hold the NCCL communicator
        dcp_compile.release_decode(model)

    new = slice(ids.shape[1], None)
    _, agree_line = agreement(got.sequences[:, new].cpu(), want.sequences[:, new].cpu())
    first_err = ((got.logits[0] - want.logits[0]).norm() / want.logits[0].norm()).item()
    first_tokens_equal = bool((got.sequences[:, new][:, 0] == want.sequences[:, new][:, 0]).all())
    if dtype == torch.float32:
        same = torch.equal(got.sequences, want.sequences)
        rule = "float32: every generated token equal to HF's, on every rank"
    else:
        same = first_tokens_equal and first_err < FIRST_STEP_RTOL
        rule = (f"{args.dtype}: same first tokens and first-step logits within {FIRST_STEP_RTOL * 100:g} % on every "
                f"rank; later tokens may drift in reduced precision")
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (got.cache.storage_bytes(), same))
    ok = all(s for _, s in per_rank)
    if rank != 0:
        return [], ok
    lines = [f"world {world}, dcp_size {model.dcp.dcp_size}, device {device.type}, dtype {args.dtype}, "
             f"page {args.page_size}, interleave {args.interleave}, compile {'cudagraphs' if args.cudagraphs else args.compile}"]
    for row, length in enumerate(args.prompt_lengths):
        lines.append(f"prompt {row} ({length} tokens) -> {got.sequences[row, new].tolist()}")
    lines.append(agree_line)
    lines.append(f"first step: tokens {'equal' if first_tokens_equal else 'DIFFERENT'}, "
                 f"logits rel. error {first_err:.1e}")
    failed = [r for r, (_, s) in enumerate(per_rank) if not s]
    lines.append(f"parity with single-device HF: {'PASS' if ok else f'FAIL on ranks {failed}'} ({rule})")
    lines.append(f"single-device HF cache: {single_device_bytes} bytes")
    for r, (b, _) in enumerate(per_rank):
        lines.append(f"rank {r} DCP cache: {b} bytes ({b / single_device_bytes:.3f} of single-device)")
    if args.cudagraphs:  # compile_decode sizes per-request pools by capacity bucket (>= 256 positions)
        lines.append("(--cudagraphs: pools sized by capacity bucket, at least 256 positions: large next to these "
                     "tiny prompts)")
    return lines, ok


def spawned_rank(rank: int, world: int, args) -> tuple[list[str], bool]:
    return demo(rank, world, args, torch.device("cpu"))


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:  # not under torchrun: start the ranks here
        try:
            results = run_ranks(spawned_rank, args.nproc, args, timeout=24 * 3600)
        except RankFailed as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        lines, ok = results[0]
        print("\n".join(lines))
        return 0 if ok else 1

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (see the device notes)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        lines, ok = demo(dist.get_rank(), world, args, device)
        if lines:
            print("\n".join(lines), flush=True)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
