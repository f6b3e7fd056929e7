"""The decode indexer as a programmatic dependent launch (``ops/triton/indexer_scores_pdl.py``), judged where it
acts: in a CUDA graph, behind the kernel that produced its query, as in the model's compiled decode step.

A "layer" here is what the compiled step runs around the indexer: an Inductor kernel making the query and head
weights (``q = (x · 1.01).bf16``, ``w = y / 8``, one fused pointwise kernel) and then ``dcp::indexer_scores``
on the paged keys, compiled together by ``torch.compile`` as the model's step is. Graph replays of one layer
per input set, rotating over enough sets that a replay's keys exceed 3 × the L2 (``bench_kernels.time_us``),
give the time a layer; variants:
  - ``plain``: the loop kernel as Inductor launches a traced user kernel (the default: the choice off);
  - ``pdl``: the dependent launch (the choice ``decode_indexer_pdl`` on);
each with Inductor's own kernels plain and as dependent launches (``triton.enable_pdl``: they wait before their
first dependent load and let their dependents start after their last load), and ``producer``: the layer
without the indexer. The indexer's share of a layer = layer − producer (same Inductor setting); its floor =
the op's bytes / the copy bandwidth measured in the same run (``measure_ceilings``); "alone" is the op timed
by itself (graph replays of the op only), the figure sessions 8-10 reported.

Cases: the recorded decode call (8 × 10240 local keys, 80 % live: bench_e2e --record, 4 × H200, 8 × 32K), the
same at 20480 and 40960 keys, and 64 × 163840 (the largest decode call, where nothing may get slower). Every
variant's scores are compared with ``plain``'s, bit for bit. (Session 11's first runs also had the kernel
prefetch its first key rows into L2 before the wait, 1-4 tiles: slower at every depth; removed.)

    python benchmarks/bench_decode_indexer_pdl.py [--quick]    # one H100/H200, ~2 min: a table; results.json,
                                                               # decode_pdl.png in --out (default $OUT)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
import torch._inductor.config as inductor_config

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_kernels import measure_ceilings, time_us  # noqa: E402
from tune_indexer_decode import L2_BYTES, RECORDED, make_set, op_cost  # noqa: E402

import dcp_compile.ops  # noqa: E402,F401  (registers the dcp ops)
from dcp_compile.ops import trace_choices  # noqa: E402

CASES = [RECORDED, (8, 20480, 0.8), (8, 40960, 0.8), (64, 163840, 1.0)]
QUICK_CASES = [RECORDED, (64, 163840, 1.0)]
# the trace choice decode_indexer_pdl per variant (ops/trace_choices.py; DCP_DECODE_INDEXER_PDL at import)
VARIANTS = {"plain": "off", "pdl": "on"}
SCALE = 128 ** -0.5


def make_layer(with_indexer: bool, inductor_pdl: bool):
    """One layer compiled as the model's step is: the producer kernel, then (``with_indexer``) the indexer.
    Compiled under the current ``decode_indexer_pdl`` choice (the op's routing is chosen while tracing)."""
    def layer(x, y, k_pool, key_slots, allowed):
        q = (x.float() * 1.01).to(torch.bfloat16).view(x.shape[0], 1, 64, 128)
        w = y * 0.125
        if not with_indexer:
            return q, w
        return torch.ops.dcp.indexer_scores(q, w, k_pool, key_slots, allowed, SCALE)

    torch._dynamo.reset()
    with inductor_config.patch({"triton.enable_pdl": inductor_pdl}):
        return torch.compile(layer, fullgraph=True, dynamic=False)


def run_case(B, L, live, bw):
    nbytes, _ = op_cost(B, L, live)
    floor = nbytes / bw * 1e6
    n_sets = max(2, min(64, -(-3 * L2_BYTES // nbytes)))
    sets = []
    for _ in range(n_sets):
        q, w, pool, key_slots, allowed = make_set(B, L, live)
        # the mask as uint8, as the model's compiled step hands it over (its bool -> uint8 conversion fuses
        # into the kernel that computes the mask; from a graph input it would be a kernel of its own here)
        sets.append((q.view(B, -1).contiguous(), w.view(B, 1, 64).contiguous(), pool, key_slots,
                     allowed.to(torch.uint8)))
    rows, ref, alone = [], None, {}
    for inductor_pdl in (False, True):
        for name, setting in VARIANTS.items():
            # the routing (the traced loop kernel or the opaque op) is fixed while tracing: a compile a variant
            # (make_layer resets dynamo: one compiled layer at a time)
            trace_choices.set("decode_indexer_pdl", setting)
            fn = make_layer(True, inductor_pdl)
            with inductor_config.patch({"triton.enable_pdl": inductor_pdl}):  # compiles here
                got = fn(*sets[0])
                if ref is None:
                    ref = got.clone()
                same = torch.equal(got, ref)
                t = time_us([lambda s=s: fn(*s) for s in sets], target_ms=20, replays=11)
            rows.append(dict(B=B, L=L, live=live, variant=name, inductor_pdl=inductor_pdl, layer_us=t,
                             same=same))
            print(f"B={B} L={L} live={live} {name} inductor_pdl={inductor_pdl}: layer {t:.2f} us"
                  + ("" if same else "  SCORES DIFFER"), flush=True)
            if not inductor_pdl:
                # the op by itself, eager (graph replays of the indexer only: the figure of sessions 8-10)
                qw = [(s[0].view(B, 1, 64, 128), s[1]) for s in sets]
                alone[name] = time_us([lambda s=s, a=a: torch.ops.dcp.indexer_scores(a[0], a[1], *s[2:], SCALE)
                                       for s, a in zip(sets, qw)], target_ms=20, replays=11)
    trace_choices.set("decode_indexer_pdl", "off")
    producer = {}
    for inductor_pdl in (False, True):
        fn = make_layer(False, inductor_pdl)
        with inductor_config.patch({"triton.enable_pdl": inductor_pdl}):
            producer[inductor_pdl] = time_us([lambda s=s: fn(*s) for s in sets], target_ms=20, replays=11)
    for r in rows:
        r.update(producer_us=producer[r["inductor_pdl"]], floor_us=floor, alone_us=alone[r["variant"]],
                 indexer_us=r["layer_us"] - producer[r["inductor_pdl"]])
    del sets
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "decode_pdl"))
    args = p.parse_args()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw, _ = measure_ceilings()
    name = torch.cuda.get_device_name()
    rows = []
    for B, L, live in (QUICK_CASES if args.quick else CASES):
        rows += run_case(B, L, live, bw)
    result = dict(device=name, copy_bw=bw, rows=rows)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir)
    print(f"\n==== decode indexer, dependent launch: {name}; copy ceiling {bw / 1e9:.0f} GB/s ====")
    print("layer = Inductor's query kernel + the indexer, CUDA-graph replays; indexer = layer − the query kernel "
          "alone; % = floor (bytes / copy bandwidth) / time")
    print("| B × L (live) | floor µs | variant | Inductor PDL | layer µs | indexer µs (% floor) | alone µs (%) | "
          "scores |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} × {r['L']} ({r['live']:.0%}) | {r['floor_us']:.1f} | {r['variant']} | "
              f"{'on' if r['inductor_pdl'] else 'off'} | {r['layer_us']:.2f} | {r['indexer_us']:.2f} "
              f"({100 * r['floor_us'] / r['indexer_us']:.0f} %) | {r['alone_us']:.2f} "
              f"({100 * r['floor_us'] / r['alone_us']:.0f} %) | {'=' if r['same'] else 'DIFFER'} |")


def plot(result, out_dir):
    """The indexer's share of a layer as % of its floor, per case and variant: decode_pdl.png."""
    from plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        return
    cases = sorted({(r["B"], r["L"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = [r for r in result["rows"] if (r["B"], r["L"]) == case]
        labels = [f"{r['variant']}{' +ind' if r['inductor_pdl'] else ''}" for r in rows]
        ax.barh(labels, [100 * r["floor_us"] / r["indexer_us"] for r in rows])
        ax.axvline(80, color="k", ls="--", lw=0.8)
        ax.set_title(f"{case[0]} x {case[1]} keys", fontsize=9)
        ax.set_xlabel("% of the copy floor (in a layer)")
        ax.tick_params(labelsize=7)
    save(fig, out_dir / "decode_pdl.png", f"{result['device']}: decode indexer, dependent launch")


if __name__ == "__main__":
    main()
