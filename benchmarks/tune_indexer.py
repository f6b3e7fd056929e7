"""Sweep the launch configs of ``dcp::indexer_scores`` at the shapes the model passes, against the fixed tables
(``ops/triton/indexer_scores.py``: ``choose_config`` for decode, ``choose_prefill_config`` for prefill) and the
op's floor.

The cases are the decode and prefill calls of DeepSeek-V3.2's indexer (64 heads x 128, bf16 query and keys,
fp32 head weights, paged keys) at the local key counts DCP 1/4 and TP give at 8K-128K contexts (the decode
shapes bench_e2e.py --record captured from the model are among them). Each config is timed as the model runs
it, from CUDA-graph replays (no launch cost; ``bench_kernels.time_us``), and reported as % of its floor:
max(bytes / copy bandwidth, flops / bf16 matmul rate), both measured in the same run; a causal case counts
the flops of its allowed pairs only.

Decode (S = 1) sweeps the one-tile kernel's (BLOCK_L, warps, stages). Prefill sweeps the prefill kernel's
PrefillConfig (block_s, block_l, warps, stages, tiles) over ``PREFILL_TILES_GRID`` x ``PREFILL_KEYS`` (keys a
program: tiles = keys // block_l, 0 = all of L; tiles is a run-time argument, so it costs no compile), and
times the one-tile kernel at its old prefill config beside it (``one_tile``). Every config's scores are
checked against the table config's (1e-5) and the prefill table's against the one-tile kernel's.

    python benchmarks/tune_indexer.py --out /tmp/tune                    # one GPU; a table, results.json
    python benchmarks/tune_indexer.py --cases prefill --out /tmp/tune    # the prefill cases only
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

# (B, S, L, causal): decode (S = 1) at batch 1/8/64 and the local key counts of 32K and 128K contexts on 1
# and 4 ranks (the static width is the capacity bucket: 40960 for a 32K context, 163840 for 128K); prefill
# chunks of 4096 tokens over 8 sequences (S = 512) at 8K and 32K local keys (every pair allowed: a later
# chunk), and a first chunk of 2 x 2048 tokens (causal: about half the key tiles have no allowed pair).
DECODE_CASES = [(1, 1, 8192, False), (8, 1, 10240, False), (8, 1, 40960, False), (64, 1, 10240, False),
                (64, 1, 40960, False), (64, 1, 163840, False)]
PREFILL_CASES = [(8, 512, 8192, False), (8, 512, 32768, False), (2, 2048, 2048, True)]
BLOCK_L = (32, 64, 128, 256)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3)
# (block_s, block_l, warps, stages) of the prefill kernel: the table's and its neighbours that build for
# sm_90a without spilling (ptxas, offline): 2 queries x 128 keys on 8 warps with 2-4 stages and 4 warps; 64-
# and 256-key tiles; 1 and 4 queries a program (N = 64 / 256 columns of the dot). Session 9 also swept 5 stages
# (the fewest at which Triton 3.6 keeps a key tile in flight across the dot): 25-90 % slower in every case
# (RESULTS.md, session 9), so they are no longer swept.
PREFILL_TILES_GRID = [(2, 128, 8, 3), (2, 128, 8, 2), (2, 128, 8, 4), (2, 128, 4, 3), (2, 64, 4, 3), (2, 64, 8, 3),
                      (4, 64, 4, 3), (4, 64, 4, 2), (4, 128, 8, 2), (1, 128, 4, 3), (1, 64, 4, 3), (2, 256, 8, 3),
                      (1, 256, 8, 3)]
PREFILL_KEYS = (0, 2048, 4096)   # keys a program (0: all of L)
ONE_TILE_PREFILL = (128, 8, 3)   # the one-tile kernel's prefill config before the prefill kernel


def make_inputs(B, S, L, causal=False, Hi=64, Di=128, page=64, dtype=torch.bfloat16, device="cuda"):
    """Keys on random pages of a pool holding exactly the batch's keys, as the paged cache lays them out.
    causal: query s sits at position L - S + s (a chunk ending at the last key)."""
    n_pages = B * L // page
    k_pool = torch.randn(B * L, Di, device=device, dtype=dtype)
    perm = torch.randperm(n_pages, device=device).view(B, L // page)
    key_slots = (perm[:, :, None] * page + torch.arange(page, device=device)).reshape(B, L).to(torch.int32)
    q = torch.randn(B, S, Hi, Di, device=device, dtype=dtype)
    w = torch.randn(B, S, Hi, device=device) * Hi ** -0.5
    if causal:
        qpos = (L - S) + torch.arange(S, device=device)
        allowed = (torch.arange(L, device=device)[None, :] <= qpos[:, None])[None].expand(B, S, L).contiguous()
    else:
        allowed = torch.ones(B, S, L, dtype=torch.bool, device=device)
    return q, w, k_pool, key_slots, allowed


def cost(q, k_pool, key_slots, allowed):
    """(bytes, flops) of the op: keys, slots, allowed and scores once; q and w once; the dot of the allowed
    (query, key) pairs."""
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    nbytes = B * L * (Di * k_pool.element_size() + 4 + S * (1 + 4)) + B * S * Hi * (Di * q.element_size() + 4)
    pairs = int(allowed.sum())
    return nbytes, 2 * Hi * Di * pairs


def sweep(run, configs, ref, label):
    """{config: µs or None} for ``run(config)``, each checked against ``ref``."""
    from bench_kernels import time_us

    timings = {}
    for cfg in configs:
        try:
            got = run(cfg)
            if not torch.equal(got, ref):  # a config may change the summation order, not the set of values
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            timings[cfg] = time_us(lambda: run(cfg), target_ms=2.0, replays=7)
        except Exception as exc:  # out of resources for a tile: skip that config
            timings[cfg] = None
            print(f"  {label} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return timings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "tune_indexer"))
    p.add_argument("--cases", choices=("all", "decode", "prefill"), default="all")
    args = p.parse_args()
    from bench_kernels import measure_ceilings, time_us

    from dcp_compile.ops.triton import indexer_scores as ix

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw, rate = measure_ceilings()
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    cases = {"all": DECODE_CASES + PREFILL_CASES, "decode": DECODE_CASES, "prefill": PREFILL_CASES}[args.cases]
    rows = []
    for B, S, L, causal in cases:
        q, w, k_pool, key_slots, allowed = make_inputs(B, S, L, causal)
        scale = q.shape[-1] ** -0.5
        nbytes, flops = cost(q, k_pool, key_slots, allowed)
        floor_us = max(nbytes / bw, flops / rate) * 1e6

        def run(cfg):
            return ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=cfg)

        label = f"B={B} S={S} L={L}{' causal' if causal else ''}"
        one_tile_us = None
        if S == 1:
            table = ix.choose_config(1, 64, False)
            ref = run(table)
            timings = sweep(run, list(dict.fromkeys([table, *itertools.product(BLOCK_L, WARPS, STAGES)])), ref, label)
        else:
            table = ix.choose_prefill_config(64, False)
            ref = run(table)
            one_tile = run(ONE_TILE_PREFILL)
            assert torch.equal(torch.isneginf(one_tile), torch.isneginf(ref)), "the kernels' masks differ"
            torch.testing.assert_close(one_tile, ref, rtol=1e-5, atol=1e-5)
            one_tile_us = time_us(lambda: run(ONE_TILE_PREFILL), target_ms=2.0, replays=7)
            configs = [ix.PrefillConfig(bs, bl, wa, st, keys // bl) for (bs, bl, wa, st), keys
                       in itertools.product(PREFILL_TILES_GRID, PREFILL_KEYS)]
            timings = sweep(run, list(dict.fromkeys([table] + configs)), ref, label)
        ok = {c: t for c, t in timings.items() if t is not None}
        best = min(ok, key=ok.get)
        row = dict(B=B, S=S, L=L, causal=causal, floor_us=floor_us, bytes=nbytes, flops=flops, table=list(table),
                   table_us=ok.get(tuple(table)), best=list(best), best_us=ok[best], one_tile_us=one_tile_us,
                   all={"x".join(map(str, c)): t for c, t in timings.items()})
        rows.append(row)
        extra = f" | one-tile kernel {ONE_TILE_PREFILL} {one_tile_us:8.1f} us" if one_tile_us else ""
        print(f"{label:28s} | floor {floor_us:7.1f} us | table {tuple(table)} {row['table_us']:8.1f} us "
              f"({100 * floor_us / row['table_us']:5.1f} %) | best {tuple(best)} {ok[best]:8.1f} us "
              f"({100 * floor_us / ok[best]:5.1f} %){extra}", flush=True)
        del q, w, k_pool, key_slots, allowed, ref
        torch.cuda.empty_cache()
    (out / "results.json").write_text(json.dumps(dict(device=name, bw=bw, rate=rate, rows=rows), indent=1))
    print(f"\n==== indexer configs: {name}; decode (BLOCK_L, warps, stages), prefill PrefillConfig(block_s, "
          "block_l, warps, stages, tiles); % of floor ====")
    print("| B | S | L | causal | floor µs | table | µs | % | best | µs | % | one-tile kernel µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = f"{r['one_tile_us']:.1f}" if r["one_tile_us"] else "-"
        print(f"| {r['B']} | {r['S']} | {r['L']} | {'yes' if r['causal'] else 'no'} | {r['floor_us']:.1f} | "
              f"{tuple(r['table'])} | {r['table_us']:.1f} | {100 * r['floor_us'] / r['table_us']:.0f} | "
              f"{tuple(r['best'])} | {r['best_us']:.1f} | {100 * r['floor_us'] / r['best_us']:.0f} | {one} |")


if __name__ == "__main__":
    main()
