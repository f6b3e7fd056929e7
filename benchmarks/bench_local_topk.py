"""The indexer's local top-k with ties to the lower position: stable full sort vs topk + tie fill vs the
radix-select kernel (ops/triton/local_topk.py); and the whole decode selection (local top-k + candidate_keys
+ topk_select).

    pip install -e . && python benchmarks/bench_local_topk.py   # on a GPU; prints the tables, writes local_topk.json and .png to $OUT
    python benchmarks/bench_local_topk.py --parts schemes breakdown   # some tables only
    ncu -k regex:local_topk_split python benchmarks/bench_local_topk.py --ncu 64 131072   # profile one shape

All three local versions give the same columns (checked on data with many exact ties, as relu makes them).
Decode shapes: T queries (batch) x L local keys, k = 2048; the sort versions see the row padded with k -inf
columns (as distributed_topk padded it before the kernel), the kernel pads virtually.

Selection table (world 1): local top-k + dcp::candidate_keys + dcp::topk_select at T x L, old = stable sort +
the sort-based references, new = the three kernels. Floor = bytes the new path must move / HBM bandwidth: the
scores read once (4·T·L) + candidates written and read back (T·k·(4 + 8) each way) + slots and counts
written (4·T·(k + 1)).

Scheme table: the radix kernel's two schemes (ops/triton/local_topk.py), five-pass (4 histogram passes +
compaction: the row read 5 times, 6 launches) vs candidates (a 1/16 sample's histogram, the window histogram,
split, refinement: the row read about twice, 5 launches + 6 gated ones where L > 16384), each timed as CUDA-graph
replays (launch overhead as in a decode graph), at T in {8, 64} x L in {10240, 40960, 131072, 163840}, k = 2048, on (a) indexer-like scores (sum over 64 heads of w_h·relu(q_h·k),
weights of both signs, -inf on the last fifth: bucket padding), (b) random normal, (c) a narrow range (every
score in [1, 1.01): one coarse bin, the candidate scheme's row fallback). Both schemes' sets are checked equal
first. GB/s and % of floor count one read of the scores (4·T·L bytes).
"""
import json
import os

import torch
import torch.nn.functional as F

import plotting  # benchmarks/: this script's folder is on the path

from dcp_compile.ops import reference
from dcp_compile.ops.distributed import local_topk_sorted

# Through the ops, as the model calls them: in eager a triton op launches its kernels directly, where a direct
# call of a host wrapper (ops/triton/*.py) goes through torch's traceable-launch dispatch (~0.1 ms a launch).
local_topk_kernel = torch.ops.dcp.local_topk
topk_select_kernel = torch.ops.dcp.topk_select

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # datasheet peaks; the first name in the device name wins


def local_topk_tie_fill(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row ([T, L], L >= k), ties to the lower column, without a full sort: the alternative to
    ``local_topk_sorted`` (the one ops/ uses), same columns but 1.5-4x slower on an H100 at k = 2048
    (torch.topk's large-k select is slow).

    ``torch.topk`` finds the k-th value; everything above it is in, and the ties *at* it are taken in column
    order (a cumulative count). A second ``topk`` over a key that is unique and decreasing in the column
    gathers exactly those k columns. Returned in column order (callers re-sort by score anyway).
    """
    cols = scores.shape[-1]
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]
    above = scores > kth
    at = scores == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (at & (torch.cumsum(at.to(torch.int32), dim=-1) <= room))
    key = torch.where(chosen, cols - torch.arange(cols, device=scores.device), 0)
    idx = torch.topk(key, k, dim=-1).indices
    return torch.gather(scores, -1, idx), idx


def bandwidth(name: str) -> float:
    for key, value in HBM_BYTES_PER_S.items():
        if key in name:
            return value
    return 4.8e12


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # µs


def bench_graph(fn):
    """µs per call of ``fn`` replayed in a CUDA graph (what a decode step sees: no Python, no launch cost)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def score_cases(T, L, dev, gen):
    """The scheme table's distributions: name -> [T, L] fp32."""
    H, D = 64, 32
    q = torch.randn(T, H, D, device=dev, generator=gen)
    keys = torch.randn(L, D, device=dev, generator=gen)
    w = torch.randn(T, H, device=dev, generator=gen)
    indexer = torch.zeros(T, L, device=dev)
    for h in range(H):  # one head at a time: [T, L] temporaries only
        indexer += w[:, h:h + 1] * torch.relu(q[:, h] @ keys.T)
    indexer[:, L - L // 5:] = float("-inf")
    return {
        "indexer": indexer,
        "normal": torch.randn(T, L, device=dev, generator=gen),
        "narrow": 1.0 + 0.01 * torch.rand(T, L, device=dev, generator=gen),
    }


def scheme_table(dev, k, hbm):
    from dcp_compile.ops.triton.local_topk import local_topk as kernel

    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for T in (8, 64):
        for L in (10240, 40960, 131072, 163840):
            for name, x in score_cases(T, L, dev, gen).items():
                old = kernel(x, k, scheme="five_pass")[1]
                new = kernel(x, k)[1]
                assert torch.equal(old, new.sort(-1).values), (T, L, name)
                one_read = 4 * T * L
                floor_us = one_read / hbm * 1e6
                t_old = bench_graph(lambda: kernel(x, k, scheme="five_pass"))
                t_new = bench_graph(lambda: kernel(x, k))
                rows.append(dict(T=T, L=L, scores=name, five_pass_us=t_old, candidates_us=t_new,
                                 five_pass_gbs=one_read / t_old / 1e3, candidates_gbs=one_read / t_new / 1e3,
                                 floor_us=floor_us, five_pass_pct=100 * floor_us / t_old,
                                 candidates_pct=100 * floor_us / t_new))
    return rows


def local_table(dev, k):
    rows = []
    for T in (1, 8, 64):
        for L in (8192, 65536, 131072):
            x = torch.randn(T, L, device=dev)
            x = torch.where(torch.rand_like(x) < 0.3, torch.zeros_like(x), x)  # exact ties at 0
            padded = F.pad(x, (0, k), value=float("-inf"))
            a = local_topk_tie_fill(padded, k)[1].sort(-1).values
            b = local_topk_sorted(padded, k)[1].sort(-1).values
            c = local_topk_kernel(x, k)[1].sort(-1).values  # the kernel's order is not the sort's
            assert torch.equal(a, b) and torch.equal(b, c), (T, L)
            rows.append(dict(
                T=T, L=L,
                sort_us=bench(lambda: local_topk_sorted(F.pad(x, (0, k), value=float("-inf")), k)),
                topk_us=bench(lambda: local_topk_tie_fill(F.pad(x, (0, k), value=float("-inf")), k)),
                kernel_us=bench(lambda: local_topk_kernel(x, k)),
            ))
    return rows


def selection_table(dev, k, hbm):
    rows = []
    for T, L in [(T, L) for T in (1, 8, 64) for L in (8192, 32768, 131072)] + [(64, 163840)]:
        x = torch.randn(T, L, device=dev)
        x = torch.where(torch.rand_like(x) < 0.3, torch.zeros_like(x), x)
        positions = F.pad(torch.arange(L, device=dev), (0, k), value=2**31 - 2)
        seq_index = torch.arange(T, device=dev)
        block_table = torch.arange(T * triton_cdiv(L, 64), device=dev, dtype=torch.int32).view(T, -1)

        def old():
            v, i = local_topk_sorted(F.pad(x, (0, k), value=float("-inf")), k)
            keys = reference.candidate_keys(v, positions[i])[None]
            return reference.topk_select(keys, seq_index, block_table, k, 0, 1, 1, 64)

        def new():
            v, i = local_topk_kernel(x, k)
            keys = torch.ops.dcp.candidate_keys(v, positions[i])[None]
            return topk_select_kernel(keys, seq_index, block_table, k, 0, 1, 1, 64)

        (so, co), (sn, cn) = old(), new()
        assert torch.equal(co, cn) and torch.equal(so, sn), (T, L)
        floor_bytes = 4 * T * L + 2 * T * k * 12 + 4 * T * (k + 1)
        floor_us = floor_bytes / hbm * 1e6
        t_old, t_new = bench(old), bench_graph(new)  # the kernels as a decode graph replays them
        rows.append(dict(T=T, L=L, old_us=t_old, new_us=t_new, floor_us=floor_us,
                         pct_of_floor=100 * floor_us / t_new))
    return rows


def kernel_breakdown(dev, k, cases=((8, 10240, "indexer"), (64, 32768, "indexer"), (64, 131072, "indexer"),
                                    (64, 163840, "indexer"), (64, 163840, "narrow"))):
    """Device µs per kernel of one ``local_topk`` call (torch.profiler over 20 calls, averaged), per case: which
    pass costs what (the histogram passes are compute-bound on ``tl.histogram``'s warp ballots)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for T, L, name in cases:
        x = score_cases(T, L, dev, gen)[name]
        for _ in range(3):
            local_topk_kernel(x, k)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                local_topk_kernel(x, k)
            torch.cuda.synchronize()
        per = {e.key: e.self_device_time_total / 20 for e in prof.key_averages() if e.self_device_time_total > 0}
        rows.append(dict(T=T, L=L, scores=name, kernels_us=per))
    return rows


def triton_cdiv(a, b):
    return -(-a // b)


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["schemes", "local", "selection", "breakdown"],
                        choices=["schemes", "local", "selection", "breakdown"], help="which tables to run")
    parser.add_argument("--ncu", nargs=2, type=int, metavar=("T", "L"),
                        help="only call local_topk a few times on indexer-like T x L scores (a target for ncu)")
    args = parser.parse_args()
    parts = args.parts
    dev, k = "cuda", 2048
    if args.ncu:
        x = score_cases(*args.ncu, dev, torch.Generator(device=dev).manual_seed(1))["indexer"]
        for _ in range(3):
            local_topk_kernel(x, k)
        torch.cuda.synchronize()
        return
    name = torch.cuda.get_device_name()
    hbm = bandwidth(name)
    scheme_rows = scheme_table(dev, k, hbm) if "schemes" in parts else []
    local_rows = local_table(dev, k) if "local" in parts else []
    select_rows = selection_table(dev, k, hbm) if "selection" in parts else []
    breakdown = kernel_breakdown(dev, k) if "breakdown" in parts else []
    print(f"{name} (HBM {hbm / 1e12:.1f} TB/s), k = {k}\n")
    print("radix kernel schemes, CUDA-graph replays (GB/s and % of floor: one read of the scores)\n"
          "| T | L | scores | five-pass µs | GB/s | % floor | candidates µs | GB/s | % floor | speed-up |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in scheme_rows:
        print(f"| {r['T']} | {r['L']} | {r['scores']} | {r['five_pass_us']:.1f} | {r['five_pass_gbs']:.0f} | "
              f"{r['five_pass_pct']:.0f} % | {r['candidates_us']:.1f} | {r['candidates_gbs']:.0f} | "
              f"{r['candidates_pct']:.0f} % | {r['five_pass_us'] / r['candidates_us']:.2f}x |")
    print()
    print("| T | L | stable sort µs | topk + tie fill µs | radix kernel µs | sort / kernel |\n|---|---|---|---|---|---|")
    for r in local_rows:
        print(f"| {r['T']} | {r['L']} | {r['sort_us']:.1f} | {r['topk_us']:.1f} | {r['kernel_us']:.1f} | "
              f"{r['sort_us'] / r['kernel_us']:.1f}x |")
    print("\nlocal_topk per kernel (torch.profiler, µs per call)")
    for r in breakdown:
        parts = ", ".join(f"{key.split('(')[0]} {us:.1f}" for key, us in sorted(r["kernels_us"].items(), key=lambda kv: -kv[1]))
        print(f"  T={r['T']} L={r['L']} {r['scores']}: {parts}")
    print("\nselection (local top-k + candidate_keys + topk_select, world 1; kernels as CUDA-graph replays)\n"
          "| T | L | sort + reference µs | kernels µs | floor µs | % of floor |\n|---|---|---|---|---|---|")
    for r in select_rows:
        print(f"| {r['T']} | {r['L']} | {r['old_us']:.1f} | {r['new_us']:.1f} | {r['floor_us']:.1f} | "
              f"{r['pct_of_floor']:.0f} % |")
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "local_topk.json"), "w") as f:
        json.dump(dict(device=name, schemes=scheme_rows, local=local_rows, selection=select_rows,
                       kernel_breakdown=breakdown), f, indent=1)
    plot(scheme_rows, select_rows, os.path.join(out, "local_topk.png"), title=f"{name}, k = {k}")


SELECTION_TARGET_US = 150  # issue 10: the decode selection at 64 queries x 128K local keys


def plot(scheme_rows, select_rows, path, title=""):
    """local_topk.png: µs against L for each scheme (a panel per T; indexer-like solid, normal dashed, narrow
    dotted) and the selection chain against L per T with the target. Returns the path, or None without
    matplotlib or rows."""
    plt = plotting.pyplot()
    if plt is None:
        return None
    Ts = sorted({r["T"] for r in scheme_rows})
    panels = len(Ts) + (1 if select_rows else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = axes[0]
    styles = {"indexer": "-", "normal": "--", "narrow": ":"}
    for ax, T in zip(axes, Ts):
        for scores, style in styles.items():
            rs = sorted((r for r in scheme_rows if r["T"] == T and r["scores"] == scores), key=lambda r: r["L"])
            if rs:
                ax.plot([r["L"] for r in rs], [r["five_pass_us"] for r in rs], "o" + style, color="C0",
                        label=f"five-pass, {scores}")
                ax.plot([r["L"] for r in rs], [r["candidates_us"] for r in rs], "s" + style, color="C1",
                        label=f"candidates, {scores}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L (keys a row)")
        ax.set_ylabel("µs (CUDA-graph replay)")
        ax.set_title(f"local top-k, T = {T}")
        ax.legend(fontsize=7)
    if select_rows:
        ax = axes[-1]
        for T in sorted({r["T"] for r in select_rows}):
            rs = sorted((r for r in select_rows if r["T"] == T), key=lambda r: r["L"])
            ax.plot([r["L"] for r in rs], [r["new_us"] for r in rs], "o-", label=f"T = {T}")
        ax.axhline(SELECTION_TARGET_US, color="gray", ls=":", label=f"target {SELECTION_TARGET_US} µs (T = 64)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L (local keys)")
        ax.set_ylabel("µs (CUDA-graph replay)")
        ax.set_title("decode selection: local top-k + keys + select")
        ax.legend(fontsize=7)
    return plotting.save(fig, path, title)


if __name__ == "__main__":
    main()
