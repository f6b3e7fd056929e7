"""Where the collectives of a profiled step spend their time, from every rank's Chrome trace
(``bench_e2e.py --profile-prefill --trace-prefill`` writes trace_prefill_<mode>_rank<r>.json).

    python benchmarks/trace_collectives.py DIR/trace_prefill_dcp_rank*.json

An NCCL kernel runs from its launch until the transfer is done, and the transfer can only start once every rank
has launched its kernel: its time is waiting for the last rank plus moving the bytes. The ranks' traces share the
host clock, so the k-th NCCL kernel of every rank is one collective: per collective this prints each rank's launch
relative to the earliest, the wait for the last rank (latest launch - own launch) and the transfer (own end - latest
launch), and per rank the compute stream's busy time (kernels not NCCL's) and its idle time within the step.
"""
import gzip
import json
import sys
from pathlib import Path


def kernels(path):
    """The kernel events of one rank's trace (.json, or .json.gz as gpu_session.sh packs them), by start."""
    raw = Path(path).read_bytes()
    events = json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)["traceEvents"]
    out = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    return sorted(out, key=lambda e: e["ts"])


def union_us(spans):
    """Length of the union of [start, end) spans."""
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(spans):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def main(paths):
    ranks = [kernels(p) for p in sorted(paths)]
    nccl = [[k for k in r if k["name"].startswith("ncclDevKernel")] for r in ranks]
    count = min(len(n) for n in nccl)
    t0 = min(r[0]["ts"] for r in ranks if r)
    print(f"{len(ranks)} ranks; NCCL kernels per rank: {[len(n) for n in nccl]}")
    print("| # | collective | launch offsets ms (per rank) | wait for last rank ms (max) | transfer ms (max) |")
    print("|---|---|---|---|---|")
    total_wait = [0.0] * len(ranks)
    total_transfer = [0.0] * len(ranks)
    for i in range(count):
        starts = [n[i]["ts"] for n in nccl]
        ends = [n[i]["ts"] + n[i]["dur"] for n in nccl]
        last = max(starts)
        waits = [(last - s) / 1e3 for s in starts]
        transfers = [(e - last) / 1e3 for e in ends]
        for r in range(len(ranks)):
            total_wait[r] += waits[r]
            total_transfer[r] += transfers[r]
        name = nccl[0][i]["name"].split("(")[0].replace("ncclDevKernel_", "")
        offsets = " ".join(f"{(s - t0) / 1e3:.2f}" for s in starts)
        print(f"| {i} | {name} | {offsets} | {max(waits):.3f} | {max(transfers):.3f} |")
    print("\n| rank | step ms (first kernel to last end) | compute busy ms | compute idle ms | NCCL wait ms | NCCL transfer ms |")
    print("|---|---|---|---|---|---|")
    for r, ks in enumerate(ranks):
        compute = [(k["ts"], k["ts"] + k["dur"]) for k in ks if not k["name"].startswith("ncclDevKernel")]
        span = (max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks)) / 1e3
        busy = union_us(compute) / 1e3
        print(f"| {r} | {span:.2f} | {busy:.2f} | {span - busy:.2f} | {total_wait[r]:.2f} | {total_transfer[r]:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
