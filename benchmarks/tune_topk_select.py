"""Sweep ``dcp::topk_select``'s launch (candidates a tile, warps) at the shapes the DCP decode step passes it,
against the wrapper's own choice (``ops/triton/topk_select.py``).

The candidates are what ``distributed_topk`` gathers: every rank's local top-k (k = 2048) of random indexer-like
scores (relu'd weighted sums: non-negative, many near-equal exponents), rank-major, C = world·k per query.
Timed as the model runs it, from CUDA-graph replays (``bench_kernels.time_us``); every config's slots are
checked against the wrapper's choice (the same set per query) first.

Measured on 2 x H200 in session 4's CUDA-graph step: 33 µs a call at 8 x 4096 candidates, 62 µs at 64 x 4096,
13 µs at 8 x 2048 (one program per query row: the passes are serial).

    python benchmarks/tune_topk_select.py --out /tmp/tune_topk      # one GPU: a table, results.json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

K = 2048
CASES = [(1, 2), (8, 2), (8, 4), (64, 2), (64, 4), (8, 8), (64, 8)]  # (queries T, ranks N): C = N·K
# (candidates a tile, warps); a tile >= C keeps the row in registers (one load)
CONFIGS = [(2048, 4), (2048, 8), (2048, 16), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32)]


def candidates(T: int, world: int, L: int, gen: torch.Generator):
    """Each rank's local top-K of random non-negative scores over its L keys (interleave 1: rank r owns
    positions r, r + N, ...), gathered rank by rank as distributed_topk ships them: ([T, N·K] fp32,
    [T, N·K] int64)."""
    scores, positions = [], []
    for r in range(world):
        x = torch.relu(torch.randn(T, L, device="cuda", generator=gen)) * torch.rand(T, 1, device="cuda", generator=gen)
        top, idx = torch.ops.dcp.local_topk(x, K)
        scores.append(top)
        positions.append(idx * world + r)
    return torch.cat(scores, -1), torch.cat(positions, -1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-keys", type=int, default=40960, help="keys per rank and query (8 x 32K at DCP 1: 40960)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "tune_topk_select"))
    args = p.parse_args()
    from bench_kernels import time_us

    import dcp_compile  # noqa: F401  registers the dcp ops
    from dcp_compile.ops.triton import topk_select as tks

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    name = torch.cuda.get_device_name()
    rows = []
    for T, world in CASES:
        s, pos = candidates(T, world, args.local_keys, gen)
        seq = torch.arange(T, device="cuda") % 8
        pages = -(-args.local_keys // 64) + 1
        table = torch.arange(8 * pages, device="cuda", dtype=torch.int32).view(8, pages)
        call = lambda **kw: tks.topk_select(s, pos, seq, table, K, 0, world, 1, 64, **kw)  # noqa: E731
        want_slots, want_counts = call()
        want = [set(r[: int(c)].tolist()) for r, c in zip(want_slots.cpu(), want_counts.cpu())]
        default_us = time_us(lambda: call(), target_ms=2.0, replays=7)
        timings = {}
        for block, warps in CONFIGS:
            try:
                got_slots, got_counts = call(block=block, num_warps=warps)
                got = [set(r[: int(c)].tolist()) for r, c in zip(got_slots.cpu(), got_counts.cpu())]
                if got != want:
                    raise AssertionError("a different selection")
                timings[(block, warps)] = time_us(lambda: call(block=block, num_warps=warps), target_ms=2.0,
                                                  replays=7)
            except Exception as exc:  # out of registers / shared memory for a config: skip it
                timings[(block, warps)] = None
                print(f"  T={T} C={world * K} {(block, warps)}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
        ok = {c: t for c, t in timings.items() if t is not None}
        best = min(ok, key=ok.get)
        rows.append(dict(T=T, world=world, C=world * K, default_us=default_us, best=list(best), best_us=ok[best],
                         all={f"{b}x{w}": t for (b, w), t in timings.items()}))
        print(f"T={T:3d} C={world * K:6d} | default {default_us:7.1f} us | best {best} {ok[best]:7.1f} us", flush=True)
    (out / "results.json").write_text(json.dumps(dict(device=name, local_keys=args.local_keys, rows=rows), indent=1))
    print(f"\n==== topk_select launches: {name}, k = {K} (tile candidates, warps) ====")
    print("| T | C | default µs | best | best µs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['C']} | {r['default_us']:.1f} | {tuple(r['best'])} | {r['best_us']:.1f} |")


if __name__ == "__main__":
    main()
