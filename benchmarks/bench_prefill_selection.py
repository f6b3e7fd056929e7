"""Prefill selection: the candidate scheme (N·K (score, position) candidates per query all-gathered) against the
key-gather scheme (every index key all-gathered, queries split N ways, K int32 positions per query all-gathered),
docs/design.md §4.2. Times ``IndexerTopK.select`` (indexer scores + top-k + exchanges + compaction) with each
scheme forced, prints the bytes each all-gathers (``selection_bytes``), the cost model's choice, and checks that the
two select the same rows (slots and counts equal on every rank: the exactness of the key gather on this GPU).

Real dims by default: a chunk of 8 × 4096 queries at total 32K (past 28K), Hi = 64, Di = 128, K = 2048, bf16 keys.

    torchrun --nproc-per-node 4 benchmarks/bench_prefill_selection.py --cuda
    torchrun --nproc-per-node 4 benchmarks/bench_prefill_selection.py --cuda --past 0 --steps 4096   # a first chunk
    python benchmarks/bench_prefill_selection.py --world 2 --small     # gloo CPU smoke run, tiny dims
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def _time_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(rank, world, args, device_type="cpu"):
    from dcp_compile.attention import AttentionConfig, IndexerTopK
    from dcp_compile.cache import StepPositions
    from dcp_compile.contract import LayerCacheState
    from dcp_compile.ops.distributed import (
        CANDIDATES, KEY_GATHER, choose_selection_scheme, force_selection_scheme, selection_bytes,
    )
    from dcp_compile.ops.layout import DCPLayout

    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, S, past, Hi, Di, K = args.batch, args.steps, args.past, args.heads, args.index_dim, args.topk
    total = past + S
    layout = DCPLayout(world, args.interleave, args.page_size)
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    pages = -(-layout.local_bound(total) // layout.page_size)
    block_table = torch.arange(B * pages, dtype=torch.int32, device=device).view(B, pages)
    # The keys of this rank's positions (what paged_write would have stored); values only matter for timing.
    pool = torch.randn(B * pages * layout.page_size, Di, generator=gen, device=device).to(dtype)
    gen_q = torch.Generator(device=device).manual_seed(99)  # the step's queries: the same on every rank
    index_q = torch.randn(B, S, Hi, Di, generator=gen_q, device=device).to(dtype)
    index_w = torch.randn(B, S, Hi, generator=gen_q, device=device) * Hi ** -0.5
    mask = None
    if args.left_pad:
        keep = torch.arange(total, device=device)[None, :] >= torch.arange(B, device=device)[:, None] * args.left_pad
        mask = keep[:, None, None, :].expand(B, 1, S, total)
    group = dist.group.WORLD.group_name if world > 1 else None
    config = AttentionConfig(heads=1, nope_dim=1, rope_dim=1, latent_dim=1, v_dim=1, topk=K, attn_scale=1.0,
                             index_scale=Di ** -0.5, layout=layout, rank=rank, group_name=group)
    at = StepPositions.of(layout, rank, block_table, past, S, B)
    state = LayerCacheState(pool.new_empty(0, 1), pool, block_table, at.new, at.keys, at.key_slots)
    selection = IndexerTopK(config)

    results, selected = {}, {}
    for scheme in (CANDIDATES, KEY_GATHER):
        force_selection_scheme(scheme)
        run = lambda: selection.select(mask, state, at, index_q=index_q, index_w=index_w)  # noqa: E731
        selected[scheme] = run()  # also the warm-up (Triton autotuning)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = _time_ms(run, args.repeats, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results[scheme] = (ms, peak)
    force_selection_scheme(None)
    (slots_c, counts_c), (slots_k, counts_k) = selected[CANDIDATES], selected[KEY_GATHER]
    differing = int(((slots_c != slots_k).any(-1) | (counts_c != counts_k)).sum())
    bytes_c, bytes_k = (B * b for b in selection_bytes(S, total, world, K, Di, pool.element_size(), args.interleave))
    choice = choose_selection_scheme(S, total, world, K, Di, pool.element_size(), args.interleave)
    return dict(results=results, differing=differing, queries=B * S, bytes={CANDIDATES: bytes_c, KEY_GATHER: bytes_k},
                choice=choice)


def report(per_rank, world, backend, args):
    from dcp_compile.ops.distributed import CANDIDATES, KEY_GATHER

    total = args.past + args.steps
    print(f"{world} ranks ({backend}): {args.batch} × {args.steps} queries at total {total}, Hi {args.heads}, "
          f"Di {args.index_dim}, K {args.topk}, interleave {args.interleave}, page {args.page_size}, "
          f"left pad step {args.left_pad}; median of {args.repeats}; cost model picks {per_rank[0]['choice']}")
    print(f"| {'scheme':10s} | {'ms (slowest rank)':>17s} | {'MiB all-gathered':>16s} | {'peak GiB':>8s} |")
    print(f"|{'-' * 12}|{'-' * 19}|{'-' * 18}|{'-' * 10}|")
    for scheme in (CANDIDATES, KEY_GATHER):
        ms = max(r["results"][scheme][0] for r in per_rank)
        peak = max(r["results"][scheme][1] for r in per_rank)
        print(f"| {scheme:10s} | {ms:17.2f} | {per_rank[0]['bytes'][scheme] / 2**20:16.3f} | {peak:8.2f} |")
    differing = [r["differing"] for r in per_rank]
    print(f"queries whose rows differ between the schemes, per rank: {differing} of {per_rank[0]['queries']}"
          + ("" if not any(differing) else "  <-- NOT EXACT"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="gloo CPU ranks (without --cuda)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4096, help="queries per sequence in the chunk")
    p.add_argument("--past", type=int, default=32768 - 4096, help="tokens already cached per sequence")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--interleave", type=int, default=1)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--left-pad", type=int, default=0, help="sequence b is left padded by b × this many tokens")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--small", action="store_true", help="tiny dims for a CPU smoke run")
    p.add_argument("--cuda", action="store_true", help="under torchrun: NCCL on one GPU per rank")
    args = p.parse_args()
    if args.small:
        args.batch, args.steps, args.past, args.heads, args.index_dim, args.topk = 2, 64, 192, 4, 16, 16
        args.page_size, args.left_pad, args.repeats = 4, 5, 3
    if args.cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        world = dist.get_world_size()
        mine = measure(dist.get_rank(), world, args, "cuda")
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
        dist.destroy_process_group()
        if int(os.environ["RANK"]) == 0:
            report(per_rank, world, "nccl", args)
    else:
        from dcp_compile.testing import run_ranks

        report(run_ranks(measure, args.world, args), args.world, "gloo", args)


if __name__ == "__main__":
    main()
