"""The memory ceiling behind the decode indexer's "% of floor": what this GPU's memory gives a plain copy at each
size, and what it gives the indexer's own access pattern (key rows gathered through slots from 64-key pages)
with no arithmetic at all.

Why (benchmarks/NOTES.md, session 7, item 5): every indexer "% of floor" since session 4 divided the op's bytes
by one 1 GiB device-to-device copy, 2.71 TB/s, while copies of 694 MB in the same runs went 4.2 TB/s and the
workplace's own record (KINDS.md) is ~4.3 TB/s. Against 4.2 TB/s the indexer's large calls run at ~63 %, not
97 %. Either the indexer leaves a third of the bandwidth unused, or the gather pattern itself cannot go faster
on this memory system (a 2 MB-page TLB that misses when 16 KB pages are read at random over a pool of
hundreds of MB; DRAM bank conflicts). This benchmark separates the two in one run:

  (a) copy ceilings: ``torch`` device-to-device copies (bytes read + written) of 16 MiB to 2 GiB buffers, each
      once over a single buffer pair and once rotating over enough pairs that a pass exceeds 4 × the L2, and a
      Triton streaming copy kernel at the same sizes (what a Triton kernel's loads and stores reach);
  (b) the gather probe (``paged_gather_probe_kernel`` below): the one-tile indexer kernel's memory traffic,
      load for load (a tile's slots and allowed bytes, the 256 B key rows through the slots, one fp32 out per
      key, a tile with no allowed key skipped), with a row sum where the indexer has its dot: the fastest a
      kernel can move the indexer's bytes in the indexer's pattern;
  (c) the indexer's one-tile kernel (``choose_config``: the decode table until session 8) on the same inputs,
      and with ``--variants`` the loop kernel's prefetch path (the table since) and its neighbours;
for the key layouts
  - ``page64``: each sequence's keys on random 64-key pages of a pool holding exactly the batch's keys (the
    paged cache's layout; what ``tune_indexer_decode.py`` and ``bench_kernels.py`` time),
  - ``page64-4GiB``: the same pages scattered over a 4 GiB pool (a cache at capacity: the rest is never read),
  - ``page1024``: 1024-key pages (256 KB contiguous), exact pool,
  - ``seq``: each sequence's keys contiguous and in order;
and (d) the one-tile kernel at the recorded decode call (8 × 10240, 80 % of keys live) over its tile, warps
and a register cap a thread (Triton's ``maxnreg``; ncu in session 7: 124 registers = 4 programs an SM, 640
programs = 1.21 waves), with the compiled kernel's registers and spills printed.

Each time is the median of CUDA-graph replays rotating over input sets whose total exceeds 3 × the L2
(``bench_kernels.time_us``); every probe and indexer output is checked (the probe against a torch gather-sum,
the indexer's variants bit-for-bit against its table config).

    python benchmarks/bench_gather_ceiling.py            # one H200: ~2 min; a table, gather_ceiling.json in $OUT
    python benchmarks/bench_gather_ceiling.py --quick    # fewer sizes and cases
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch
import triton
import triton.language as tl

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tune_indexer_decode import DI, HI, KEY_DTYPE, L2_BYTES, n_sets_for, op_cost  # noqa: E402

DEVICE = "cuda"
COPY_MIB = (16, 64, 256, 512, 1024, 2048)
QUICK_COPY_MIB = (64, 1024)
# (B, L, fraction of keys live): the recorded decode call, then the sizes tune_indexer_decode.py quotes
CASES = [(8, 10240, 0.8), (8, 40960, 1.0), (64, 40960, 1.0), (64, 163840, 1.0)]
# --variants adds the model's decode calls at 32K context on 2 ranks (DCP 2: 8 x 20480) and one (TP: 8 x 40960),
# 80 % of the bucket live (bench_e2e --record on 2 x H200, session 8)
RECORDED_CASES = [(8, 20480, 0.8), (8, 40960, 0.8)]
QUICK_CASES = [(8, 10240, 0.8), (64, 40960, 1.0)]
LAYOUTS = ("page64", "page64-4GiB", "page1024", "seq")
BIG_POOL_BYTES = 4 << 30
RECORDED = (8, 10240, 0.8)
# (BLOCK_L, warps, stages, maxnreg) of the one-tile kernel at the recorded call; None: no register cap
REG_GRID = [(128, 4, 3, None), (128, 4, 3, 128), (128, 4, 3, 112), (128, 4, 3, 96), (128, 8, 3, None),
            (128, 8, 3, 96), (64, 4, 3, None), (64, 4, 3, 96), (64, 8, 3, None), (256, 8, 3, None),
            (256, 8, 3, 128)]
PROBE_CONFIGS = [(128, 4), (128, 8), (64, 4), (256, 8)]  # (BLOCK_L, warps): the best one is the probe's time


# --variants: indexer kernels timed beside the probe (page64 layout), each checked against the table's one-tile
# kernel ("=" bit for bit, "≈" same -inf pattern and within 1e-5, "✗" wrong). The prefetch loop
# (DecodeConfig.prefetch: the kernel issues tile i + 1's key rows into registers before scoring tile i, and
# the dot is keys × heads so the head sum stays inside a warp; offline sm_90a builds with Triton 3.6:
# 128 keys x 4 warps 198 registers = 2 programs an SM, 64 x 4 125 = 4, 128 x 8 128 = 2, 64 x 8 79 = 3),
# fixed runs, one tile a program (tiles=1: a transposed one-tile kernel) and the live range.
def variant_configs(ix):
    D = ix.DecodeConfig
    return {
        "prefetch 128x4w p2": D(128, 4, 1, 2, prefetch=True),
        "prefetch 64x4w p4": D(64, 4, 1, 4, prefetch=True),
        "prefetch 64x4w p3": D(64, 4, 1, 3, prefetch=True),
        "prefetch 128x8w p2": D(128, 8, 1, 2, prefetch=True),
        "prefetch 64x8w p3": D(64, 8, 1, 3, prefetch=True),
        "prefetch 128x4w 1 tile": D(128, 4, 1, 2, 1, prefetch=True),
        "prefetch 64x4w 1 tile": D(64, 4, 1, 4, 1, prefetch=True),
        "prefetch 128x4w p2 live": D(128, 4, 1, 2, 0, 8192, prefetch=True),
        "prefetch 64x4w p4 live": D(64, 4, 1, 4, 0, 8192, prefetch=True),
        "prefetch 128x8w p2 live": D(128, 8, 1, 2, 0, 8192, prefetch=True),
    }


@triton.jit
def paged_gather_probe_kernel(KP, KS, ALLOWED, OUT, L, stride_kp, stride_ksb, stride_ab, stride_ob,
                              D: tl.constexpr, BLOCK_L: tl.constexpr):
    # the one-tile indexer kernel's loads and store (kernels/indexer_scores.py at S = 1), a row sum for its dot
    pid = tl.program_id(0)
    n_lb = tl.cdiv(L, BLOCK_L)
    lb = pid % n_lb
    b = (pid // n_lb).to(tl.int64)
    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    slot = tl.load(KS + b * stride_ksb + offs_l, mask=mask_l, other=-1)
    has_key = slot >= 0
    ok = (tl.load(ALLOWED + b * stride_ab + offs_l, mask=mask_l, other=0) != 0) & has_key
    res = tl.full([BLOCK_L], float("-inf"), tl.float32)
    if tl.max(ok.to(tl.int32)) > 0:
        offs_d = tl.arange(0, D)
        k = tl.load(KP + slot.to(tl.int64)[:, None] * stride_kp + offs_d[None, :], mask=has_key[:, None], other=0.0)
        res = tl.where(ok, tl.sum(k.to(tl.float32), 1), float("-inf"))
    tl.store(OUT + b * stride_ob + offs_l, res, mask=mask_l)


def probe(pool, key_slots, allowed_u8, out, block_l, warps):
    B, L = key_slots.shape
    return paged_gather_probe_kernel[(B * triton.cdiv(L, block_l),)](
        pool, key_slots, allowed_u8, out, L, pool.stride(0), key_slots.stride(0), allowed_u8.stride(0),
        out.stride(0), D=DI, BLOCK_L=block_l, num_warps=warps, num_stages=1)


def copy_ceilings(sizes, time_us):
    from bench_kernels import stream_copy

    """[{mib, torch_single, torch_rotated, triton_rotated}] in bytes/s (read + written)."""
    rows = []
    for mib in sizes:
        n = mib << 19  # bf16 elements
        sets = max(1, -(-4 * L2_BYTES // (mib << 20)))
        src = [torch.empty(n, device=DEVICE, dtype=torch.bfloat16).normal_() for _ in range(sets)]
        dst = [torch.empty_like(t) for t in src]
        nbytes = 2 * n * 2
        single = time_us(lambda: dst[0].copy_(src[0]), target_ms=20, replays=7)
        rotated = time_us([lambda i=i: dst[i].copy_(src[i]) for i in range(sets)], target_ms=20, replays=7)
        tri = time_us([lambda i=i: stream_copy(src[i], dst[i]) for i in range(sets)], target_ms=20, replays=7)
        assert torch.equal(dst[0], src[0])
        row = dict(mib=mib, sets=sets, torch_single=nbytes / (single * 1e-6), torch_rotated=nbytes / (rotated * 1e-6),
                   triton_rotated=nbytes / (tri * 1e-6))
        print(f"copy {mib:5d} MiB x {sets:2d} sets: torch {row['torch_single'] / 1e9:6.0f} GB/s one pair, "
              f"{row['torch_rotated'] / 1e9:6.0f} rotated; triton {row['triton_rotated'] / 1e9:6.0f} rotated",
              flush=True)
        rows.append(row)
        del src, dst
        torch.cuda.empty_cache()
    return rows


def make_sets(B, L, present, layout, n_sets):
    """Input sets (q, w, pool, key_slots, allowed as uint8) with the keys laid out as ``layout`` says."""
    n_keys = int(round(L * present))
    page = {"page64": 64, "page64-4GiB": 64, "page1024": 1024, "seq": None}[layout]
    shared_pool = None
    if layout == "page64-4GiB":
        shared_pool = torch.randn(BIG_POOL_BYTES // (DI * 2), DI, device=DEVICE, dtype=KEY_DTYPE)
    sets = []
    for _ in range(n_sets):
        if page is None:
            pool = torch.randn(B * n_keys, DI, device=DEVICE, dtype=KEY_DTYPE)
            slots = torch.arange(B * n_keys, device=DEVICE).view(B, n_keys)
        else:
            n_pages = -(-n_keys // page)
            if shared_pool is not None:
                pool = shared_pool
                pages = torch.randperm(pool.shape[0] // page, device=DEVICE)[:B * n_pages].view(B, n_pages)
            else:
                pool = torch.randn(B * n_pages * page, DI, device=DEVICE, dtype=KEY_DTYPE)
                pages = torch.randperm(B * n_pages, device=DEVICE).view(B, n_pages)
            slots = (pages[:, :, None] * page + torch.arange(page, device=DEVICE)).reshape(B, -1)[:, :n_keys]
        key_slots = torch.full((B, L), -1, dtype=torch.int32, device=DEVICE)
        key_slots[:, :n_keys] = slots.to(torch.int32)
        allowed = torch.zeros(B, 1, L, dtype=torch.uint8, device=DEVICE)
        allowed[:, :, :n_keys] = 1
        q = torch.randn(B, 1, HI, DI, device=DEVICE, dtype=KEY_DTYPE)
        w = torch.randn(B, 1, HI, device=DEVICE) * HI ** -0.5
        sets.append((q, w, pool, key_slots, allowed))
    return sets


def gather_study(cases, time_us, ix, layouts=LAYOUTS, variants=None):
    rows = []
    scale = DI ** -0.5
    today = tuple(ix.choose_config(1, HI, False))
    for B, L, present in cases:
        nbytes, _ = op_cost(B, L, present)
        n_sets = n_sets_for(nbytes)
        for layout in layouts:
            sets = make_sets(B, L, present, layout, n_sets)
            outs = [torch.empty(B, L, device=DEVICE) for _ in sets]
            pool, key_slots, allowed = sets[0][2], sets[0][3], sets[0][4]
            ref = pool[key_slots.clamp(min=0).long()].float().sum(-1)
            ref = ref.masked_fill((key_slots < 0) | (allowed[:, 0] == 0), float("-inf"))
            probe_us = {}
            for bl, warps in PROBE_CONFIGS:
                probe(pool, key_slots, allowed[:, 0], outs[0], bl, warps)
                torch.testing.assert_close(outs[0], ref, rtol=1e-4, atol=1e-3)
                probe_us[f"{bl}x{warps}w"] = time_us(
                    [lambda i=i: probe(sets[i][2], sets[i][3], sets[i][4][:, 0], outs[i], bl, warps)
                     for i in range(n_sets)], target_ms=2.0, replays=7)
            ix_us = time_us([lambda s=s: ix.indexer_scores(*s, scale, config=today) for s in sets],
                            target_ms=2.0, replays=7)
            row = dict(B=B, L=L, present=present, layout=layout, bytes=nbytes, n_sets=n_sets, probe_us=probe_us,
                       probe_best_us=min(probe_us.values()), indexer_us=ix_us, variants={})
            if variants:
                want = ix.indexer_scores(*sets[0], scale, config=today)
                for label, cfg in variants.items():
                    try:
                        same = compare(ix.indexer_scores(*sets[0], scale, config=cfg), want)
                        us = time_us([lambda s=s: ix.indexer_scores(*s, scale, config=cfg) for s in sets],
                                     target_ms=2.0, replays=7)
                        row["variants"][label] = dict(us=us, identical=same)
                        print(f"    {label:36s} {us:8.1f} µs ({nbytes / us / 1e3:5.0f} GB/s, "
                              f"{100 * row['probe_best_us'] / us:3.0f} % of probe) {same}",
                              flush=True)
                    except Exception as exc:  # out of resources: recorded, not fatal
                        row["variants"][label] = dict(us=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
                        print(f"    {label}: {row['variants'][label]['error']}", flush=True)
            print(f"B={B:3d} L={L:6d} {present:4.0%} {layout:12s}: probe {row['probe_best_us']:8.1f} µs "
                  f"({nbytes / row['probe_best_us'] / 1e3:5.0f} GB/s; " + ", ".join(
                      f"{k} {v:.1f}" for k, v in probe_us.items())
                  + f") | indexer {ix_us:8.1f} µs ({nbytes / ix_us / 1e3:5.0f} GB/s)", flush=True)
            rows.append(row)
            del sets, outs, pool, key_slots, allowed, ref
            torch.cuda.empty_cache()
    return rows


def register_study(time_us, ix):
    """The one-tile kernel at the recorded call over REG_GRID: µs, registers, spills, bit-identity."""
    B, L, present = RECORDED
    nbytes, _ = op_cost(B, L, present)
    sets = make_sets(B, L, present, "page64", n_sets_for(nbytes))
    scale = DI ** -0.5
    today = tuple(ix.choose_config(1, HI, False))
    ref = ix.indexer_scores(*sets[0], scale, config=today)
    rows = []
    for cfg in REG_GRID:
        row = dict(config=list(cfg))
        try:
            got, compiled = call_capturing_kernel(ix, lambda: ix.indexer_scores(*sets[0], scale, config=cfg))
            row.update(identical=compare(got, ref), regs=compiled.n_regs, spills=compiled.n_spills,
                       shared=compiled.metadata.shared)
            row["us"] = time_us([lambda s=s: ix.indexer_scores(*s, scale, config=cfg) for s in sets],
                                target_ms=2.0, replays=7)
        except Exception as exc:  # a config out of resources: recorded, not fatal
            row.update(us=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        print(f"one-tile {cfg}: " + (f"{row['us']:.1f} µs, regs {row.get('regs')}, spills {row.get('spills')}, "
                                     f"shared {row.get('shared')}, identical {row['identical']}"
                                     if row.get("us") else row.get("error", "")), flush=True)
        rows.append(row)
    return rows


def compare(got, want):
    """"=" bit for bit, "≈" the same -inf pattern and finite scores within 1e-5, else "✗"."""
    if torch.equal(got, want):
        return "="
    if torch.equal(torch.isneginf(got), torch.isneginf(want)) and torch.allclose(
            got.nan_to_num(neginf=0.0), want.nan_to_num(neginf=0.0), rtol=1e-5, atol=1e-5):
        return "≈"
    return "✗"


def call_capturing_kernel(ix, fn):
    """(fn's result, the CompiledKernel of the last Triton launch inside it): the wrappers launch through
    ``common.launch``, replaced here for one call so that the launch's return value (registers, spills) is kept."""
    captured = []

    class Grid:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: captured.append(self.kernel[grid](*a, **kw))

    saved = ix.common.launch
    ix.common.launch = Grid
    try:
        out = fn()
    finally:
        ix.common.launch = saved
    return out, captured[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variants", action="store_true",
                   help="the indexer's kernel variants (variant_configs) beside the probe, page64 layout only; "
                   "no copy or register study")
    args = p.parse_args()
    from bench_kernels import time_us

    from dcp_compile.ops.triton import indexer_scores as ix

    t0 = time.time()
    torch.manual_seed(0)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    print(f"{name}, triton {triton.__version__}, torch {torch.__version__}", flush=True)
    copies = copy_ceilings(QUICK_COPY_MIB if args.quick or args.variants else COPY_MIB, time_us)
    cases = QUICK_CASES if args.quick else CASES
    if args.variants:
        gathers = gather_study(cases + RECORDED_CASES, time_us, ix, layouts=("page64",), variants=variant_configs(ix))
        regs = []
    else:
        gathers = gather_study(cases, time_us, ix)
        regs = register_study(time_us, ix)
    ceiling = max(max(r["torch_rotated"], r["triton_rotated"]) for r in copies if r["mib"] >= 256)
    result = dict(device=name, triton=triton.__version__, copies=copies, gathers=gathers, registers=regs,
                  copy_ceiling=ceiling, wall_s=time.time() - t0)
    (out_dir / "gather_ceiling.json").write_text(json.dumps(result, indent=1))

    print(f"\n==== {name}: copy ceiling (best rotated copy >= 256 MiB) {ceiling / 1e9:.0f} GB/s ====")
    print("| B × L (live) | layout | MB | copy floor µs | probe µs (% of copy floor) | "
          "indexer µs (% of copy floor, % of probe) |")
    print("|---|---|---|---|---|---|")
    for r in gathers:
        floor = r["bytes"] / ceiling * 1e6
        print(f"| {r['B']} × {r['L']} ({r['present']:.0%}) | {r['layout']} | {r['bytes'] / 1e6:.1f} | {floor:.1f} | "
              f"{r['probe_best_us']:.1f} ({100 * floor / r['probe_best_us']:.0f} %) | {r['indexer_us']:.1f} "
              f"({100 * floor / r['indexer_us']:.0f} %, {100 * r['probe_best_us'] / r['indexer_us']:.0f} %) |")
    if args.variants:
        print("\n| B × L (live) | variant | µs | % of copy floor | % of probe | identical |")
        print("|---|---|---|---|---|---|")
        for r in gathers:
            floor = r["bytes"] / ceiling * 1e6
            for label, v in [("today: one-tile", dict(us=r["indexer_us"], identical="=")), *r["variants"].items()]:
                if v.get("us"):
                    print(f"| {r['B']} × {r['L']} ({r['present']:.0%}) | {label} | {v['us']:.1f} | "
                          f"{100 * floor / v['us']:.0f} % | {100 * r['probe_best_us'] / v['us']:.0f} % | "
                          f"{v['identical']} |")
    plot(result, out_dir)
    print(f"\nwrote {out_dir / 'gather_ceiling.json'}; {time.time() - t0:.0f} s", flush=True)


def plot(result, out_dir):
    from plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    mib = [r["mib"] for r in result["copies"]]
    for key, lab in (("torch_single", "torch, one pair"), ("torch_rotated", "torch, rotated"),
                     ("triton_rotated", "triton, rotated")):
        a.plot(mib, [r[key] / 1e9 for r in result["copies"]], marker="o", label=lab)
    a.set_xscale("log", base=2)
    a.set_xlabel("buffer MiB")
    a.set_ylabel("GB/s (read + written)")
    a.legend()
    a.set_title("device-to-device copy")
    labels = [f"{r['B']}x{r['L'] // 1024}K\n{r['layout']}" for r in result["gathers"]]
    x = range(len(labels))
    b.bar([i - 0.2 for i in x], [r["bytes"] / r["probe_best_us"] / 1e3 for r in result["gathers"]], 0.4,
          label="gather probe")
    b.bar([i + 0.2 for i in x], [r["bytes"] / r["indexer_us"] / 1e3 for r in result["gathers"]], 0.4,
          label="indexer")
    b.axhline(result["copy_ceiling"] / 1e9, color="k", ls="--", label="copy ceiling")
    b.set_xticks(list(x), labels, fontsize=6, rotation=90)
    b.set_ylabel("GB/s of the op's bytes")
    b.legend()
    b.set_title("the indexer's access pattern")
    print(f"plot: {save(fig, out_dir / 'gather_ceiling.png', result['device'])}")


if __name__ == "__main__":
    main()
