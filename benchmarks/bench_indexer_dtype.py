"""The indexer op with the query dtype the rewritten model passes: before the match took the query ahead of
HF's ``q.float()`` the bf16 model handed ``dcp::indexer_scores`` an fp32 query with bf16 keys (the kernel's
cast + IEEE-fp32 path); now it hands the bf16 query (tensor cores; the same fp32-exact products). DeepSeek-V3.2
indexer dims (64 heads x 128), decode (one query per sequence) and a prefill chunk. Compares the two paths'
scores and times both (CUDA events, median after warm-up), with the memory floor of the key scan.

    python benchmarks/bench_indexer_dtype.py [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import dcp_compile  # noqa: F401  registers the dcp ops

HI, DI = 64, 128
CASES = [  # (sequences, query tokens per sequence, local keys per sequence)
    (8, 1, 8192), (64, 1, 32768), (8, 128, 8192),
]


def time_us(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args()
    dev = torch.device("cuda")
    bw = 3.35e12 if "H100" in torch.cuda.get_device_name() else 4.8e12  # datasheet HBM bandwidth
    rows = []
    for B, S, L in CASES:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, S, HI, DI, device=dev, dtype=torch.bfloat16, generator=g)
        w = torch.randn(B, S, HI, device=dev, generator=g) * HI**-0.5
        pool = torch.randn(B * L, DI, device=dev, dtype=torch.bfloat16, generator=g)
        slots = torch.arange(B * L, device=dev, dtype=torch.int32).view(B, L)
        allowed = torch.ones(B, S, L, device=dev, dtype=torch.bool)
        op = torch.ops.dcp.indexer_scores
        fp32 = op(q.float(), w, pool, slots, allowed, DI**-0.5)
        bf16 = op(q, w, pool, slots, allowed, DI**-0.5)
        err = ((bf16 - fp32).abs().max() / fp32.abs().max()).item()
        t_fp32 = time_us(lambda: op(q.float(), w, pool, slots, allowed, DI**-0.5))
        t_bf16 = time_us(lambda: op(q, w, pool, slots, allowed, DI**-0.5))
        floor = (B * L * DI * 2 + B * S * L * 4) / bw * 1e6  # keys read once + fp32 scores written
        rows.append(dict(B=B, S=S, L=L, fp32_query_us=t_fp32, bf16_query_us=t_bf16, speedup=t_fp32 / t_bf16,
                         floor_us=floor, pct_of_floor=100 * floor / t_bf16, max_rel_diff=err))
    print(f"{torch.cuda.get_device_name()}, indexer {HI} heads x {DI}, bf16 keys")
    print("| B | S | local keys | fp32 query (before) µs | bf16 query (now) µs | speed-up | floor µs | % of floor | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['S']} | {r['L']} | {r['fp32_query_us']:.1f} | {r['bf16_query_us']:.1f} | "
              f"{r['speedup']:.0f}x | {r['floor_us']:.1f} | {r['pct_of_floor']:.0f} % | {r['max_rel_diff']:.1e} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "indexer_dtype.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
