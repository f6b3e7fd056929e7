"""The decode selection's kernels at the shapes the DCP decode step passes them: ``dcp::candidate_keys`` (a
rank's local top-k as sorted order keys) and ``dcp::topk_select`` (this rank's share of the global top-k by
binary searches of every rank's sorted keys), their launch configs against the wrappers' choice, and the
whole local chain (local top-k of L keys + keys + select; the all-gather between them is not on one GPU).

Inputs are what ``distributed_topk`` makes: every simulated rank's local top-k (k = 2048) of random
indexer-like scores (relu'd weighted sums: non-negative, many near-equal exponents), interleave 1. Timed as
the model runs them, from CUDA-graph replays (``bench_kernels.time_us``); every config's output is checked
equal to the wrapper's choice first, and the wrappers' outputs equal to the PyTorch reference
(``ops/reference.py``: ``torch.sort`` for the keys, a sort of all world·k keys for the select), which is
the baseline of the same run.

Floors (bytes / the copy bandwidth measured in the run): candidate_keys reads T·k·12 B and writes T·k·8 B;
topk_select reads this rank's T·k keys once (the searches of the other blocks hit L2 after their first
touch: counted once, N·T·k·8 B) and writes T·k·4 + T·4 B. Both are latency chains at decode sizes (a few MB),
so % of floor is low by nature; the number that matters is µs per layer next to the old kernel's
(session 5, 4 × H200: 50 µs at 8 × 8192 candidates, 83 µs at 64 × 8192).

    python benchmarks/tune_topk_select.py --out /tmp/tune_topk      # one GPU: tables, results.json
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
CASES = [(1, 4), (8, 1), (8, 2), (8, 4), (8, 8), (64, 2), (64, 4), (64, 8)]  # (queries T, ranks N)
KEY_WARPS = [1, 2, 4, 8, 16]
SELECT_CONFIGS = [(64, 2), (128, 4), (256, 4), (256, 8), (512, 4), (512, 8)]  # (lanes a program, warps)
CHAIN_CASES = [(8, 4, 8192), (64, 4, 32768), (8, 2, 16384), (64, 2, 65536)]  # (T, N, local keys L)


def local_top(T: int, world: int, L: int, gen: torch.Generator):
    """Per rank: (local top-k scores [T, K], their global positions [T, K]) as distributed_topk makes them."""
    out = []
    for r in range(world):
        x = torch.relu(torch.randn(T, L, device="cuda", generator=gen)) * torch.rand(T, 1, device="cuda", generator=gen)
        top, idx = torch.ops.dcp.local_topk(x, K)
        out.append((top, torch.where(idx < L, idx * world + r, 2**31 - 2)))
    return out


def sweep(fn, configs, check, time_us):
    """{config: µs or None (failed / differs)} for fn(**config)."""
    timings = {}
    for cfg in configs:
        try:
            check(fn(**cfg))
            timings[tuple(cfg.values())] = time_us(lambda: fn(**cfg), target_ms=2.0, replays=7)
        except Exception as exc:  # a config out of registers / shared memory, or a wrong result
            print(f"  config {cfg}: {type(exc).__name__}: {str(exc)[:160]}")
            timings[tuple(cfg.values())] = None
    return timings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-keys", type=int, default=8192, help="keys per rank and query for the kernel cases")
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "tune_topk_select"))
    args = p.parse_args()
    from bench_kernels import measure_ceilings, time_us

    import dcp_compile  # noqa: F401  registers the dcp ops
    from dcp_compile.ops import reference
    from dcp_compile.ops.triton import candidate_keys as ck
    from dcp_compile.ops.triton import local_topk as ltk
    from dcp_compile.ops.triton import topk_select as tks

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    name = torch.cuda.get_device_name()
    bw, _ = measure_ceilings()
    rows, chain = [], []
    for T, world in CASES:
        per_rank = local_top(T, world, args.local_keys, gen)
        s, pos = per_rank[0]
        keys_ref = reference.candidate_keys(s, pos)
        keys_default = ck.candidate_keys(s, pos)
        assert torch.equal(keys_default, keys_ref), (T, world)

        def same_keys(k):
            assert torch.equal(k, keys_ref), "different keys"
        key_us = sweep(lambda **kw: ck.candidate_keys(s, pos, **kw), [{"num_warps": w} for w in KEY_WARPS],
                       same_keys, time_us)
        key_default_us = time_us(lambda: ck.candidate_keys(s, pos), target_ms=2.0, replays=7)
        key_torch_us = time_us(lambda: ck.candidate_keys(s, pos, method="torch"), target_ms=2.0, replays=7)

        keys = torch.stack([ck.candidate_keys(v, q) for v, q in per_rank])
        seq = torch.arange(T, device="cuda") % 8
        pages = -(-args.local_keys // 64) + 1
        table = torch.arange(8 * pages, device="cuda", dtype=torch.int32).view(8, pages)
        rank = world - 1
        call = lambda **kw: tks.topk_select(keys, seq, table, K, rank, world, 1, 64, **kw)  # noqa: E731
        want = reference.topk_select(keys, seq, table, K, rank, world, 1, 64)
        got = call()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (T, world)

        def same_selection(res):
            assert torch.equal(res[0], want[0]) and torch.equal(res[1], want[1]), "different selection"
        select_us = sweep(call, [{"block": b, "num_warps": w} for b, w in SELECT_CONFIGS], same_selection, time_us)
        select_default_us = time_us(lambda: call(), target_ms=2.0, replays=7)
        select_ref_us = time_us(lambda: reference.topk_select(keys, seq, table, K, rank, world, 1, 64),
                                target_ms=2.0, replays=7)
        key_floor = T * K * 20 / bw * 1e6
        select_floor = (world * T * K * 8 + T * K * 4 + T * 4) / bw * 1e6
        rows.append(dict(T=T, world=world, keys_default_us=key_default_us, keys_torch_us=key_torch_us,
                         keys_by_warps={str(k[0]): v for k, v in key_us.items()}, keys_floor_us=key_floor,
                         select_default_us=select_default_us, select_reference_us=select_ref_us,
                         select_by_config={f"{k[0]}x{k[1]}": v for k, v in select_us.items()},
                         select_floor_us=select_floor))
        print(f"T={T} N={world}: keys {key_default_us:.1f} µs (torch.sort {key_torch_us:.1f}), select "
              f"{select_default_us:.1f} µs (reference {select_ref_us:.1f})", flush=True)

    for T, world, L in CHAIN_CASES:  # the local chain of one rank: local top-k + keys + select
        scores = torch.relu(torch.randn(T, L, device="cuda", generator=gen))
        others = torch.stack([ck.candidate_keys(v, q) for v, q in local_top(T, world, L, gen)])
        seq = torch.arange(T, device="cuda") % 8
        table = torch.arange(8 * (L // 64 + 1), device="cuda", dtype=torch.int32).view(8, -1)
        positions = torch.nn.functional.pad(torch.arange(L, device="cuda") * world, (0, K), value=2**31 - 2)

        def chain_step():
            v, i = ltk.local_topk(scores, K)
            mine = ck.candidate_keys(v, positions[i])
            keys = torch.cat([mine[None], others[1:]])  # as gathered: this rank's block is block 0
            return tks.topk_select(keys, seq, table, K, 0, world, 1, 64)
        us = time_us(chain_step, target_ms=4.0, replays=7)
        local_us = time_us(lambda: ltk.local_topk(scores, K), target_ms=4.0, replays=7)
        chain.append(dict(T=T, world=world, local_keys=L, chain_us=us, local_topk_us=local_us))
        print(f"chain T={T} N={world} L={L}: {us:.1f} µs (local top-k {local_us:.1f})", flush=True)

    print(f"\n==== decode selection kernels: {name}, k = {K}, copy {bw / 1e9:.0f} GB/s ====")
    print("| T | N | keys µs (warps: µs) | keys torch.sort µs | select µs (lanes x warps: µs) | select reference µs "
          "| keys + select µs | floor µs |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        kw = ", ".join(f"{w}: {v:.1f}" if v else f"{w}: -" for w, v in r["keys_by_warps"].items())
        sc = ", ".join(f"{c}: {v:.1f}" if v else f"{c}: -" for c, v in r["select_by_config"].items())
        print(f"| {r['T']} | {r['world']} | **{r['keys_default_us']:.1f}** ({kw}) | {r['keys_torch_us']:.1f} | "
              f"**{r['select_default_us']:.1f}** ({sc}) | {r['select_reference_us']:.1f} | "
              f"{r['keys_default_us'] + r['select_default_us']:.1f} | {r['keys_floor_us'] + r['select_floor_us']:.1f} |")
    print("\n| T | N | local keys | local top-k µs | local top-k + keys + select µs |\n|---|---|---|---|---|")
    for c in chain:
        print(f"| {c['T']} | {c['world']} | {c['local_keys']} | {c['local_topk_us']:.1f} | {c['chain_us']:.1f} |")
    (out / "results.json").write_text(json.dumps(dict(device=name, copy_bw=bw, k=K, rows=rows, chain=chain), indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
