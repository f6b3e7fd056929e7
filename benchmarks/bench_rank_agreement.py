"""What the rank-agreement check costs: the start-of-generate verification (input digests + one all-gather of
the named fields), the sampling RNG broadcast, and the per-step stop all-reduce, on N gloo CPU ranks (or
NCCL GPUs under torchrun). Prints a table of medians in microseconds.

    python benchmarks/bench_rank_agreement.py            # 2 gloo ranks on this machine
    torchrun --nproc-per-node 2 benchmarks/bench_rank_agreement.py --cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from dcp_compile.agreement import RankAgreedStopping, RankGroup, sync_sampling_rng, tensor_digest, verify_same
from dcp_compile.testing import run_ranks


def _median_us(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def measure(rank, world, batch, prompt, repeats, device_type="cpu"):
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    group = RankGroup(dist.group.WORLD, rank, world)
    ids = torch.randint(0, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)

    def verify():
        fields = [("batch", batch), *[(f"ids{i}", v) for i, v in enumerate(tensor_digest(ids))],
                  *[(f"mask{i}", v) for i, v in enumerate(tensor_digest(mask))], ("settings", 1), ("w0", 2), ("w1", 3)]
        verify_same(group, fields, "requests")

    stop = RankAgreedStopping([], group)
    scores = torch.zeros(batch, 8, device=device)
    rows = {
        "verify request (digests + all-gather)": _median_us(verify, repeats, device),
        "sampling RNG broadcast": _median_us(lambda: sync_sampling_rng(group, device), repeats, device),
        "stop decision all-reduce (per step)": _median_us(lambda: stop(ids, scores), repeats, device),
    }
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--cuda", action="store_true", help="under torchrun: NCCL on one GPU per rank")
    args = p.parse_args()
    if args.cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        rows = measure(dist.get_rank(), dist.get_world_size(), args.batch, args.prompt, args.repeats, "cuda")
        world, backend = dist.get_world_size(), "nccl"
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return
    else:
        rows = run_ranks(measure, args.world, args.batch, args.prompt, args.repeats)[0]
        world, backend = args.world, "gloo"
    print(f"{world} ranks, {backend}, batch {args.batch}, prompt {args.prompt} tokens, median of {args.repeats}")
    print(f"| {'step':42s} | {'µs':>8s} |\n|{'-' * 44}|{'-' * 10}|")
    for name, us in rows.items():
        print(f"| {name:42s} | {us:8.1f} |")


if __name__ == "__main__":
    main()
