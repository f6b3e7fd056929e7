"""Sweep the launch config of ``dcp::indexer_scores`` at the shapes the model passes, against the fixed table
(``ops/triton/indexer_scores.py: choose_config``) and the op's floor.

The cases are the decode and prefill calls of DeepSeek-V3.2's indexer (64 heads x 128, bf16 query and keys,
fp32 head weights, paged keys) at the local key counts DCP 1/4 and TP give at 8K-128K contexts (the decode
shapes bench_e2e.py --record captured from the model are among them). Each config is timed as the model runs it, from CUDA-graph replays (no launch cost; ``bench_kernels.time_us``), and reported as % of its
floor: max(bytes / copy bandwidth, flops / bf16 matmul rate), both measured in the same run.

    python benchmarks/tune_indexer.py --out /tmp/tune            # one GPU; prints a table, writes results.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (B, S, L): decode (S = 1) at batch 1/8/64 and the local key counts of 32K and 128K contexts on 1 and 4 ranks
# (the static width is the capacity bucket: 40960 for a 32K context, 163840 for 128K); prefill chunks of
# 4096 tokens over 8 sequences (S = 512) at 8K and 32K local keys.
CASES = [(1, 1, 8192), (8, 1, 10240), (8, 1, 40960), (64, 1, 10240), (64, 1, 40960), (64, 1, 163840),
         (8, 512, 8192), (8, 512, 32768)]
BLOCK_L = (32, 64, 128, 256)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3)


def make_inputs(B, S, L, Hi=64, Di=128, page=64, dtype=torch.bfloat16, device="cuda"):
    """Keys on random pages of a pool holding exactly the batch's keys, as the paged cache lays them out."""
    n_pages = B * L // page
    k_pool = torch.randn(B * L, Di, device=device, dtype=dtype)
    perm = torch.randperm(n_pages, device=device).view(B, L // page)
    key_slots = (perm[:, :, None] * page + torch.arange(page, device=device)).reshape(B, L).to(torch.int32)
    q = torch.randn(B, S, Hi, Di, device=device, dtype=dtype)
    w = torch.randn(B, S, Hi, device=device) * Hi ** -0.5
    allowed = torch.ones(B, S, L, dtype=torch.bool, device=device)
    return q, w, k_pool, key_slots, allowed


def cost(q, k_pool, key_slots):
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    nbytes = B * L * (Di * k_pool.element_size() + 4 + S * (1 + 4)) + B * S * Hi * (Di * q.element_size() + 4)
    return nbytes, 2 * B * S * Hi * L * Di


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "tune_indexer"))
    args = p.parse_args()
    from bench_kernels import measure_ceilings, time_us

    from dcp_compile.ops.triton import indexer_scores as ix

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw, rate = measure_ceilings()
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    cases = list(CASES)
    rows = []
    for B, S, L in cases:
        q, w, k_pool, key_slots, allowed = make_inputs(B, S, L)
        scale = q.shape[-1] ** -0.5
        nbytes, flops = cost(q, k_pool, key_slots)
        floor_us = max(nbytes / bw, flops / rate) * 1e6
        block_s = 1 if S == 1 else max(1, 128 // 64)
        table = ix.choose_config(block_s, 64, False)
        ref = ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=table)
        timings = {}
        for cfg in itertools.product(BLOCK_L, WARPS, STAGES):
            try:
                got = ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=cfg)
                if not torch.equal(got, ref):  # a config may change the summation order, not the set of values
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
                timings[cfg] = time_us(lambda: ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=cfg),
                                       target_ms=2.0, replays=7)
            except Exception as exc:  # out of resources for a tile: skip that config
                timings[cfg] = None
                print(f"  B={B} S={S} L={L} {cfg}: {type(exc).__name__}", flush=True)
        ok = {c: t for c, t in timings.items() if t is not None}
        best = min(ok, key=ok.get)
        row = dict(B=B, S=S, L=L, floor_us=floor_us, bytes=nbytes, flops=flops, table=list(table),
                   table_us=ok.get(table), best=list(best), best_us=ok[best],
                   all={"x".join(map(str, c)): t for c, t in timings.items()})
        rows.append(row)
        print(f"B={B:3d} S={S:4d} L={L:6d} | floor {floor_us:7.1f} us | table {table} {row['table_us']:8.1f} us "
              f"({100 * floor_us / row['table_us']:5.1f} %) | best {best} {ok[best]:8.1f} us "
              f"({100 * floor_us / ok[best]:5.1f} %)", flush=True)
        del q, w, k_pool, key_slots, allowed, ref
        torch.cuda.empty_cache()
    (out / "results.json").write_text(json.dumps(dict(device=name, bw=bw, rate=rate, rows=rows), indent=1))
    print(f"\n==== indexer configs: {name} (BLOCK_L, warps, stages); % of floor ====")
    print("| B | S | L | floor µs | table | µs | % | best | µs | % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['S']} | {r['L']} | {r['floor_us']:.1f} | {tuple(r['table'])} | {r['table_us']:.1f} | "
              f"{100 * r['floor_us'] / r['table_us']:.0f} | {tuple(r['best'])} | {r['best_us']:.1f} | "
              f"{100 * r['floor_us'] / r['best_us']:.0f} |")


if __name__ == "__main__":
    main()
