"""The indexer's local top-k with ties to the lower position: stable full sort vs topk + tie fill.

    python benchmarks/bench_local_topk.py          # on a GPU; prints a table, writes local_topk.json to $OUT

Both give the same columns (checked on data with many exact ties, as relu makes them). Decode shapes: T
queries (batch) x L local keys (+ k padding columns), k = 2048.
"""
import json
import os

import torch

def _load_distributed():
    # By file path: putting ops/ on sys.path would shadow the real triton with ops/triton.
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ops", "distributed.py")
    spec = importlib.util.spec_from_file_location("dcp_ops_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_dist = _load_distributed()
local_topk, local_topk_sorted = _dist.local_topk, _dist.local_topk_sorted


def main():
    dev = "cuda"
    from triton.testing import do_bench

    k, rows = 2048, []
    for T in (1, 8, 64):
        for L in (8192, 65536, 131072):
            x = torch.randn(T, L + k, device=dev)
            x = torch.where(torch.rand_like(x) < 0.3, torch.zeros_like(x), x)  # exact ties at 0
            x[:, L:] = float("-inf")
            a = local_topk(x, k)[1].sort(-1).values
            b = local_topk_sorted(x, k)[1].sort(-1).values
            assert torch.equal(a, b), (T, L)
            t_sort = do_bench(lambda: local_topk_sorted(x, k), warmup=25, rep=200, return_mode="median")
            t_topk = do_bench(lambda: local_topk(x, k), warmup=25, rep=200, return_mode="median")
            rows.append(dict(T=T, L=L, sort_us=t_sort * 1e3, topk_us=t_topk * 1e3))
    print(f"{torch.cuda.get_device_name()}\n| T | L | stable sort µs | topk + tie fill µs | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['L']} | {r['sort_us']:.1f} | {r['topk_us']:.1f} | {r['sort_us'] / r['topk_us']:.2f} |")
    out = os.environ.get("OUT", "benchmarks/out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "local_topk.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
