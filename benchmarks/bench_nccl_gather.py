"""All-gather bandwidth of this machine's NCCL at the sizes DCP moves, for the protocol NCCL picks itself and
for the ones forced by ``NCCL_PROTO`` (set it in the environment of the run; NCCL reads it once per process).

    torchrun --standalone --nproc-per-node 4 benchmarks/bench_nccl_gather.py --out DIR
    NCCL_PROTO=Simple torchrun --standalone --nproc-per-node 4 benchmarks/bench_nccl_gather.py --out DIR

Sizes: per-rank send buffers from a decode step's keys (8 × 2048 × 8 B = 128 KiB) to a prefill chunk's latent
rows (8 sequences × 8192 local rows × 1152 B = 75 MiB at 32K on 4 ranks). Timed with CUDA events around 20
back-to-back calls after 5 warm-up calls; "bus GB/s" is NCCL's convention for an all-gather: the bytes each rank
receives, (N-1)/N of the output, over the time. Rank 0 prints a table and writes ``nccl_gather_<proto>.json``.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

SIZES = [128 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20, 75 << 20, 128 << 20]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    proto = os.environ.get("NCCL_PROTO", "default")
    rows = []
    for size in SIZES:
        send = torch.randn(size // 2, dtype=torch.bfloat16, device="cuda")
        recv = torch.empty(world * send.numel(), dtype=send.dtype, device="cuda")
        for _ in range(5):
            dist.all_gather_into_tensor(recv, send)
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            dist.all_gather_into_tensor(recv, send)
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / args.iters
        # the gathered copy must be every rank's buffer: rank r's block equals what rank r sent
        check = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(check, send)
        assert torch.equal(recv, torch.cat(check)), "all_gather_into_tensor gathered wrong bytes"
        rows.append(dict(proto=proto, world=world, send_bytes=size, us=us, bus_gbs=size * (world - 1) / us / 1e3))
    if rank == 0:
        print(f"NCCL all-gather, {world} ranks, NCCL_PROTO={proto}, {torch.cuda.get_device_name()}")
        print("| per-rank MiB | µs | bus GB/s |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['send_bytes'] / 2**20:.3g} | {r['us']:.1f} | {r['bus_gbs']:.1f} |")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"nccl_gather_{proto}.json"), "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
