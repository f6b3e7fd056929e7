"""The two prefill indexer kernels side by side at tune_indexer's prefill cases (the model's 4096-token chunks over
8K and 32K keys, and a causal first chunk of 2 × 2048): the portable Triton kernel at its table config and, on
an H100/H200, the warp-specialised Gluon kernel (``ops/triton/kernels/indexer_scores_prefill_ws.py``) at its
default key runs and a sweep of them (``indexer_scores_ws.choose_tiles``). Both are given the uint8 mask (what
the compiled model passes; ``bench_prefill_indexer_probe.py`` times the op with the bool mask too).

Each time is the median of CUDA-graph replays (``bench_kernels.time_us``) after a warm-up; % is of the math
floor (2 · heads · dim · allowed pairs / the 8192^3 bf16 matmul rate of the same run). Every kernel's scores are
checked against the Triton kernel's first (1e-5).

    python benchmarks/bench_prefill_indexer_kernels.py [label]    # one H100/H200, ~30 s: a table; results.json
                                                                  # and prefill_kernels.png in $OUT
A label (any words) tags the run's lines, for A/B runs of a kernel edit in one device call.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_kernels import measure_ceilings, time_us  # noqa: E402
from tune_indexer import PREFILL_CASES, cost, make_inputs  # noqa: E402

from dcp_compile.ops.triton import indexer_scores as ix  # noqa: E402
from dcp_compile.ops.triton import indexer_scores_ws  # noqa: E402

TILE_SWEEP = (16, 32, 64, 128, 10**6)     # key tiles a program (10**6: all of L)


def main():
    label = " ".join(sys.argv[1:])
    out_dir = pathlib.Path(os.environ.get("OUT") or HERE / "out" / "prefill_kernels")
    out_dir.mkdir(parents=True, exist_ok=True)
    _, rate = measure_ceilings()
    name = torch.cuda.get_device_name()
    table = ix.choose_prefill_config(64, fp32_dots=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for B, S, L, causal in PREFILL_CASES:
        q, w, k_pool, key_slots, allowed = make_inputs(B, S, L, causal=causal)
        u8 = allowed.to(torch.uint8)
        scale = q.shape[-1] ** -0.5
        floor = cost(q, k_pool, key_slots, allowed)[1] / rate * 1e6
        runs = {"triton": lambda: ix.indexer_scores(q, w, k_pool, key_slots, u8, scale, config=table)}
        if indexer_scores_ws.serves(q, k_pool):
            default = indexer_scores_ws.choose_tiles(B, S, L, sms)
            runs[f"ws tiles={default} (default)"] = lambda: indexer_scores_ws.run(q, w, k_pool, key_slots, u8, scale)
            for tiles in TILE_SWEEP:
                if tiles != default:
                    runs[f"ws tiles={tiles}"] = lambda t=tiles: indexer_scores_ws.run(q, w, k_pool, key_slots, u8,
                                                                                       scale, tiles=t)
        ref = runs["triton"]()
        for kernel, fn in runs.items():
            got = fn()
            assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), kernel
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            t = time_us(fn, target_ms=20, replays=9)
            rows.append(dict(B=B, S=S, L=L, causal=causal, kernel=kernel, us=t, floor_us=floor))
            print(f"{label} B={B} S={S} L={L} causal={causal} {kernel}: {t:.1f} us, {100 * floor / t:.1f} % of "
                  f"{floor:.1f}", flush=True)
        del q, w, k_pool, key_slots, allowed, u8, ref
        torch.cuda.empty_cache()
    result = dict(device=name, rate=rate, label=label, table_config=table, rows=rows)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir)
    print(f"\n==== prefill indexer kernels: {name}; µs (% of the math floor at {rate / 1e12:.0f} TFLOP/s) ====")
    print("| B × S × L | causal | kernel | µs | % of floor |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} × {r['S']} × {r['L']} | {r['causal']} | {r['kernel']} | {r['us']:.0f} | "
              f"{100 * r['floor_us'] / r['us']:.0f} % |")


def plot(result, out_dir):
    """% of the math floor of each kernel (and key-run split), per case: prefill_kernels.png."""
    from plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        return
    cases = sorted({(r["B"], r["S"], r["L"], r["causal"]) for r in result["rows"]}, key=lambda c: (c[3], c[2]))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = [r for r in result["rows"] if (r["B"], r["S"], r["L"], r["causal"]) == case]
        ax.barh([r["kernel"] for r in rows], [100 * r["floor_us"] / r["us"] for r in rows])
        ax.axvline(80, color="k", ls="--", lw=0.8)
        ax.set_title(f"{case[0]}x{case[1]}x{case[2]}" + (" causal" if case[3] else ""), fontsize=9)
        ax.set_xlabel("% of the math floor")
        ax.tick_params(labelsize=7)
    save(fig, out_dir / "prefill_kernels.png", f"{result['device']}: prefill indexer kernels")


if __name__ == "__main__":
    main()
