"""Launch configs of the candidate scheme's passes (ops/triton/local_topk.py: WINDOW_PASS, SPLIT_PASS,
REFINE_PASS): each pass's kernel timed alone (torch.profiler, device µs per call over 20 calls) at the
selection's shapes, one pass's config varied at a time (the others at their defaults), every config's output
checked equal to the default's (columns and order).

    python benchmarks/tune_local_topk.py [--shapes 64x131072 64x32768] [--out DIR]   # on a GPU

Prints one table per pass (µs per shape, the default marked) and the best config per pass; writes
tune_local_topk.json and tune_local_topk.png. Scores: indexer-like (bench_local_topk.score_cases), k = 2048.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import plotting  # noqa: E402
from bench_local_topk import score_cases  # noqa: E402

from dcp_compile.ops.triton import local_topk as ltk  # noqa: E402

KERNEL = {"WINDOW_PASS": "local_topk_window_kernel", "SPLIT_PASS": "local_topk_split_kernel",
          "REFINE_PASS": "local_topk_refine_kernel"}
CANDIDATES = {
    "WINDOW_PASS": [ltk.PassConfig(b, w, p) for b in (2048, 4096, 8192) for w in (4, 8) for p in (True, False)],
    "SPLIT_PASS": [ltk.PassConfig(b, w, p) for b in (1024, 2048, 4096) for w in (4, 8) for p in (True, False)],
    "REFINE_PASS": [ltk.PassConfig(b, w) for b in (2048, 4096, 8192) for w in (8, 16)],
}


def kernel_us(x, k, name):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        ltk.local_topk(x, k)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            ltk.local_topk(x, k)
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.key.startswith(name)) / 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["64x131072", "64x32768"])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    args = parser.parse_args()
    k, dev = 2048, "cuda"
    gen = torch.Generator(device=dev).manual_seed(3)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    inputs = {shape: score_cases(*shape, dev, gen)["indexer"] for shape in shapes}
    want = {shape: ltk.local_topk(x, k) for shape, x in inputs.items()}
    results = {}
    for attr, configs in CANDIDATES.items():
        default = getattr(ltk, attr)
        rows = []
        for config in configs:
            setattr(ltk, attr, config)
            row = dict(config=config.__dict__, default=config == default)
            for shape, x in inputs.items():
                values, idx = ltk.local_topk(x, k)
                assert torch.equal(idx, want[shape][1]) and torch.equal(values, want[shape][0]), (attr, config, shape)
                row["x".join(map(str, shape))] = kernel_us(x, k, KERNEL[attr])
            rows.append(row)
        setattr(ltk, attr, default)
        results[attr] = rows
        cols = ["x".join(map(str, s)) for s in shapes]
        print(f"\n{attr} ({KERNEL[attr]}), µs per call\n| block | warps | prefetch | " + " | ".join(cols) + " |\n"
              + "|---" * (3 + len(cols)) + "|")
        for r in rows:
            c = r["config"]
            mark = " (default)" if r["default"] else ""
            print(f"| {c['block']} | {c['num_warps']} | {c['prefetch']}{mark} | "
                  + " | ".join(f"{r[col]:.1f}" for col in cols) + " |")
        best = min(rows, key=lambda r: r[cols[0]])
        print(f"best at {cols[0]}: {best['config']} ({best[cols[0]]:.1f} µs)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_local_topk.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), k=k, results=results), f, indent=1)
    plot(results, os.path.join(args.out, "tune_local_topk.png"), title=torch.cuda.get_device_name())


def config_label(config):
    return f"{config['block']}x{config['num_warps']}w" + (" pf" if config["prefetch"] else "")


def plot(results, path, title=""):
    """tune_local_topk.png: per pass, µs of each config at each shape (bars; the default's label starred).
    Returns the path, or None without matplotlib."""
    plt = plotting.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (attr, rows) in zip(axes[0], results.items()):
        shapes = [key for key in rows[0] if key not in ("config", "default")]
        width = 0.8 / max(1, len(shapes))
        for j, shape in enumerate(shapes):
            ax.bar([i + j * width for i in range(len(rows))], [r[shape] for r in rows], width, label=shape)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_xticklabels([config_label(r["config"]) + ("*" if r["default"] else "") for r in rows],
                           rotation=60, fontsize=7)
        ax.set_ylabel("µs a call")
        ax.set_title(f"{attr} ({KERNEL[attr]})")
        ax.legend(fontsize=7)
    return plotting.save(fig, path, title)


if __name__ == "__main__":
    main()
