"""The decode indexer (``dcp::indexer_scores`` at S = 1) at the model's small-batch shapes: today's one-tile
kernel, its configs, the key-tile loop kernel's configs, and what a kernel moving the same bytes can reach.

Shapes: DeepSeek-V3.2's indexer (64 heads × 128, bf16 query and keys, fp32 head weights and scores), B ∈ {1, 8,
16, 64} sequences × L ∈ {10240, 40960} local keys (32K / 128K contexts on 4 DCP ranks, the capacity bucket's
width), 8 × 2560 and 1 × 2560 (an 8K context on 4 ranks; a decode with no prefill behind it), 64 × 163840 (128K
on one rank: the largest decode call, where the one-tile kernel is at ~99 % and the loop kernel must not lose),
every key present; and the recorded decode call (bench_e2e --record on 4 × H200, 8 × 32K context): 8 × 10240 with the
bucket's last 20 % of slots -1 and not allowed (the kernels load no key there). Keys live on random 64-key
pages of a pool, as the paged cache lays them out.

Per case, each timed as CUDA-graph replays (``bench_kernels.time_us``: median of replays, no launch gaps)
rotating among enough independently made input sets that a replay's data exceeds the 50 MB L2:
  (a) today: the one-tile kernel at its table config (``choose_config``; 128 keys, 4 warps, 3 stages);
  (b) the one-tile kernel over BLOCK_L 32/64/128/256 × warps 2/4/8 (stages: it has no loop, 3 as the table);
  (c) the key-tile loop kernel (``DecodeConfig``: tile, warps, stages, programs an SM; the runs a program
      scores follow from B, L and the SM count, ``decode_tiles``), and the wrapper's own choice (``table``);
  (c') the loop kernel's live-range path ("live": ``DecodeConfig.live_scan``, the scan step in keys): each
      program finds its sequence's tiles from the first to the last allowed key and the sequence's runs
      (``decode_runs``) share those only; the tiles past them get -inf without loads;
  (d) baselines: a device-to-device copy moving the op's bytes (read + written), a copy of the key bytes,
      and a gather of the key rows (``torch.index_select(pool, 0, slots)``).
Every kernel case first runs on the first input set and is compared with today's kernel: ``=`` bit-identical,
``≈`` within 1e-5 (same values, another summation order), ``✗`` wrong (timed anyway, never recommended).

Floor = max(bytes / copy bandwidth, flops / bf16 matmul rate), both measured here (``measure_ceilings``: the
best of copies of 64 MiB to 1 GiB buffers, read + written, and an 8192³ matmul); bytes = present keys × 256 B + slots, allowed and scores
(9 B a key) + q and w. The summary also gives each time against the datasheet floor (bytes / 4.8 TB/s, the
H200's HBM3e). "% copy" = the op-bytes copy's time / the case's time: what this many bytes take in one
kernel.

    python benchmarks/tune_indexer_decode.py              # one H200: ~2 min; a table, results.json in $OUT
    python benchmarks/tune_indexer_decode.py --quick      # fewer cases and configs (smoke run)
    python benchmarks/tune_indexer_decode.py --live       # the live-range study: 4 small-batch cases (the
                                                          # recorded call first), one-tile / loop / live

"today" is the one-tile kernel (the decode table until session 8); the table's own choice is timed as "table".
At the end: the loop config that matches today's scores everywhere (``=``, or ``≈`` for the prefetch path's
other head-sum order) and is fastest against today (geometric mean),
and what to set in ``ops/triton/indexer_scores.py`` (``DECODE_TABLE``, ``DECODE_LOOP_MAX_TILES``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HI, DI = 64, 128
KEY_DTYPE = torch.bfloat16        # q and keys, as the model passes them
DEVICE = "cuda"
PAGE = 64
L2_BYTES = 50 * 2 ** 20
# (B, L, fraction of each sequence's keys present: the rest is the bucket's tail, slot -1 and not allowed)
CASES = [(1, 2560, 1.0), (8, 2560, 1.0), (1, 10240, 1.0), (8, 10240, 1.0), (8, 10240, 0.8), (16, 10240, 1.0),
         (64, 10240, 1.0), (1, 40960, 1.0), (8, 40960, 1.0), (16, 40960, 1.0), (64, 40960, 1.0),
         (64, 163840, 1.0)]
QUICK_CASES = [(8, 2560, 1.0), (8, 10240, 0.8), (64, 10240, 1.0)]
# --live: the recorded call, the same shape with every key live, twice the batch, four times the keys
LIVE_CASES = [(8, 10240, 0.8), (8, 10240, 1.0), (16, 10240, 1.0), (8, 40960, 1.0)]
DATASHEET_BW = 4.8e12             # H200 HBM3e, bytes/s
RECORDED = (8, 10240, 0.8)
ONE_TILE_GRID = list(itertools.product((32, 64, 128, 256), (2, 4, 8), (3,)))
# The loop kernel's (tile, warps, stages), each at 1-4 programs an SM. Offline sm_90a builds (Triton 3.9,
# ptxas; no spills, key loads through cp.async): 128 keys × 4 warps ~82 KB of shared memory (two programs an
# SM), 64 × 4 ~49 KB (four), 128 × 8 ~82 KB, 256 × 8 ~150 KB (one). 4 stages build the same code as 3 here.
LOOP_GRID = [(128, 4, 3), (128, 4, 2), (64, 4, 3), (64, 4, 2), (128, 8, 3), (256, 8, 3)]
# The prefetch path's (tile, warps, programs an SM) at num_stages 1 (``DecodeConfig.prefetch``; the table's since
# session 8: 64 x 4 warps x 4). Not bit-identical to the one-tile kernel (another head-sum order): ``≈``.
PREFETCH_GRID = [(64, 4, 4), (64, 4, 3), (128, 4, 2), (128, 8, 2)]
QUICK_PREFETCH_GRID = [(64, 4, 4)]
QUICK_LOOP_GRID = [(128, 4, 3), (64, 4, 3)]
PROGRAMS_PER_SM = (1, 2, 3, 4)
# The live-range path's (tile, warps, stages) at every programs-an-SM, scanning 8192 keys a step (by 16-key
# groups: ~125 registers at 4 warps, the query's loads issued before the scan's bytes are read; offline
# sm_90a build), and the other scan steps (4096: more steps; 16384: one step at L = 10240, but ptxas then
# reads the scan's first bytes before issuing the query's loads) at the likeliest configs.
LIVE_GRID = [(128, 4, 3), (128, 4, 2), (64, 4, 3), (64, 4, 2), (128, 8, 3)]
LIVE_SCAN = 8192
LIVE_SCAN_GRID = [((128, 4, 3), 2), ((128, 4, 2), 2), ((64, 4, 3), 4), ((64, 4, 2), 4)]
LIVE_SCAN_OTHERS = (4096, 16384)
QUICK_LIVE_GRID = [(128, 4, 3), (64, 4, 2)]
# --live: the one-tile kernel beside today's, and the fixed-run loop configs that won in session 6
LIVE_ONE_TILE_GRID = [(64, 4, 3), (256, 4, 3), (32, 4, 3)]
LIVE_LOOP_GRID = [(128, 4, 2), (64, 4, 2), (128, 4, 3), (64, 4, 3)]
LIVE_LOOP_PPS = (2, 4)


def make_set(B, L, present, gen_device=None):
    """One input set: q, w, a pool of exactly the batch's present keys on random pages, key_slots, allowed."""
    gen_device = gen_device or DEVICE
    n_keys = int(round(L * present))
    n_pages = triton_cdiv(n_keys, PAGE)
    pool = torch.randn(B * n_pages * PAGE, DI, device=gen_device, dtype=KEY_DTYPE)
    perm = torch.randperm(B * n_pages, device=gen_device).view(B, n_pages)
    slots = (perm[:, :, None] * PAGE + torch.arange(PAGE, device=gen_device)).reshape(B, n_pages * PAGE)
    key_slots = torch.full((B, L), -1, dtype=torch.int32, device=gen_device)
    key_slots[:, :n_keys] = slots[:, :n_keys].to(torch.int32)
    allowed = torch.zeros(B, 1, L, dtype=torch.bool, device=gen_device)
    allowed[:, :, :n_keys] = True
    q = torch.randn(B, 1, HI, DI, device=gen_device, dtype=KEY_DTYPE)
    w = torch.randn(B, 1, HI, device=gen_device) * HI ** -0.5
    return q, w, pool, key_slots, allowed


def triton_cdiv(a, b):
    return -(-a // b)


def op_cost(B, L, present):
    """(bytes, flops) of one call: present keys' rows, every key's slot, allowed byte and score, q and w."""
    n_keys = int(round(L * present))
    nbytes = B * n_keys * DI * 2 + B * L * (4 + 1 + 4) + B * HI * (DI * 2 + 4)
    return nbytes, 2 * HI * DI * B * n_keys


def n_sets_for(nbytes):
    """Input sets so that one pass over them is ≥ 3 × the L2 (at least 2)."""
    return max(2, min(256, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


def label_of(kind, cfg):
    if kind == "loop":
        return (f"loop {cfg.block_l}x{cfg.num_warps}w{cfg.num_stages}s p{cfg.programs_per_sm}"
                + (" prefetch" if cfg.prefetch else ""))
    if kind == "live":
        return (f"live {cfg.block_l}x{cfg.num_warps}w{cfg.num_stages}s p{cfg.programs_per_sm} "
                f"scan {cfg.live_scan}" + (" prefetch" if cfg.prefetch else ""))
    if kind == "one_tile":
        return f"one-tile {cfg[0]}x{cfg[1]}w{cfg[2]}s"
    if kind.startswith("today"):
        return f"today: one-tile {cfg[0]}x{cfg[1]}w{cfg[2]}s"
    return kind


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="3 cases, 2 loop configs, the one-tile table only")
    p.add_argument("--live", action="store_true",
                   help="the live-range study: 4 small-batch cases, fewer one-tile and fixed-run loop configs")
    p.add_argument("--ncu", action="store_true",
                   help="only call the op a few times at the recorded call (8 x 10240, 80 %% of keys live) with "
                   "the table's decode kernel, each call beside the gather probe and a copy of the op's bytes: a "
                   "target for ncu")
    args = p.parse_args()
    if args.ncu:
        from dcp_compile.ops.triton import indexer_scores as ix

        from bench_gather_ceiling import probe
        from bench_kernels import stream_copy

        B, L, present = RECORDED
        inputs = make_set(B, L, present)
        inputs = (*inputs[:4], inputs[4].to(torch.uint8))
        # beside it, what moving the same bytes costs: the gather probe (the indexer's loads and store, no
        # arithmetic) and a streaming copy reading and writing the op's bytes
        out = torch.empty(B, L, device=DEVICE)
        src = torch.empty(op_cost(B, L, present)[0] // 4, device=DEVICE, dtype=torch.bfloat16).normal_()
        dst = torch.empty_like(src)
        for _ in range(3):  # the table's decode kernel, as the model calls it
            ix.indexer_scores(*inputs, DI ** -0.5)
            probe(inputs[2], inputs[3], inputs[4], out, 64, 4)
            stream_copy(src, dst)
        torch.cuda.synchronize()
        return
    from bench_kernels import measure_ceilings, time_us

    from dcp_compile.ops.triton import indexer_scores as ix

    t_start = time.time()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bw, rate = measure_ceilings()
    name = torch.cuda.get_device_name()
    sms = ix.num_sms(torch.device(DEVICE))
    print(f"{name}, {sms} SMs: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
          f"table: DECODE_TABLE = {ix.DECODE_TABLE}, DECODE_LOOP_MAX_TILES = {ix.DECODE_LOOP_MAX_TILES}",
          flush=True)
    today = tuple(ix.choose_config(1, HI, False))
    if args.quick:
        cases, one_tile_grid = QUICK_CASES, [today]
        loop_grid = ([ix.DecodeConfig(bl, wa, st, pps) for (bl, wa, st), pps
                      in itertools.product(QUICK_LOOP_GRID, PROGRAMS_PER_SM)]
                     + [ix.DecodeConfig(bl, wa, 1, pps, prefetch=True) for bl, wa, pps in QUICK_PREFETCH_GRID])
        live_grid = [ix.DecodeConfig(bl, wa, st, pps, 0, LIVE_SCAN) for (bl, wa, st), pps
                     in itertools.product(QUICK_LIVE_GRID, PROGRAMS_PER_SM)]
    else:
        cases = LIVE_CASES if args.live else CASES
        one_tile_grid = list(dict.fromkeys([today, *(LIVE_ONE_TILE_GRID if args.live else ONE_TILE_GRID)]))
        loop_grid = [ix.DecodeConfig(bl, wa, st, pps) for (bl, wa, st), pps in (
            itertools.product(LIVE_LOOP_GRID, LIVE_LOOP_PPS) if args.live
            else itertools.product(LOOP_GRID, PROGRAMS_PER_SM))]
        loop_grid += [ix.DecodeConfig(bl, wa, 1, pps, prefetch=True) for bl, wa, pps in PREFETCH_GRID]
        live_grid = ([ix.DecodeConfig(bl, wa, st, pps, 0, LIVE_SCAN) for (bl, wa, st), pps
                      in itertools.product(LIVE_GRID, PROGRAMS_PER_SM)]
                     + [ix.DecodeConfig(bl, wa, st, pps, 0, scan) for ((bl, wa, st), pps), scan
                        in itertools.product(LIVE_SCAN_GRID, LIVE_SCAN_OTHERS)])
    scale = DI ** -0.5
    rows = []
    for B, L, present in cases:
        nbytes, flops = op_cost(B, L, present)
        floor_us = max(nbytes / bw, flops / rate) * 1e6
        n_sets = n_sets_for(nbytes)
        sets = [make_set(B, L, present) for _ in range(n_sets)]
        # The kernels read ``allowed`` as bytes; the wrapper converts a bool mask with a kernel of its own,
        # which under torch.compile fuses into the mask's producer. Handing it bytes times the kernel alone;
        # the "bool mask" rows time the eager op as a recorded call runs it (conversion included).
        bool_sets = sets
        sets = [(q, w, pool, slots, allowed.to(torch.uint8)) for q, w, pool, slots, allowed in bool_sets]

        def runner(config, inputs=sets):
            return [lambda s=s: ix.indexer_scores(*s, scale, config=config) for s in inputs]

        ref = ix.indexer_scores(*sets[0], scale, config=today)
        label = f"B={B} L={L}" + (f" ({present:.0%} of keys)" if present < 1 else "")
        # (d) baselines: the op's bytes through one copy (half read, half written), the key bytes copied,
        # the key rows gathered through their slots
        half = nbytes // 2 // 2
        src = [torch.empty(half, device=DEVICE, dtype=torch.bfloat16).normal_() for _ in range(n_sets)]
        dst = [torch.empty_like(t) for t in src]
        copy_op_us = time_us([lambda i=i: dst[i].copy_(src[i]) for i in range(n_sets)], target_ms=2.0, replays=7)
        del src, dst
        key_dst = [torch.empty_like(s[2]) for s in sets]
        copy_keys_us = time_us([lambda i=i: key_dst[i].copy_(sets[i][2]) for i in range(n_sets)],
                               target_ms=2.0, replays=7)
        idx = [s[3].clamp(min=0).view(-1) for s in sets]
        gath = [torch.empty(B * L, DI, device=DEVICE, dtype=KEY_DTYPE) for _ in range(n_sets)]
        gather_us = time_us([lambda i=i: torch.index_select(sets[i][2], 0, idx[i], out=gath[i])
                             for i in range(n_sets)], target_ms=2.0, replays=7)
        del key_dst, idx, gath

        variants = []
        todo = ([("today", today), ("today_bool", today)] + [("one_tile", c) for c in one_tile_grid if c != today]
                + [("table", None), ("table_bool", None)] + [("loop", c) for c in loop_grid]
                + [("live", c) for c in live_grid])
        for kind, cfg in todo:
            entry = dict(kind=kind, label=label_of(kind, cfg), config=list(cfg) if cfg is not None else None)
            inputs = bool_sets if kind.endswith("_bool") else sets
            if kind.startswith("table"):
                chosen = ix.choose_decode_config(B, L, max(16, HI), False)
                entry["chosen"] = list(chosen)
                entry["label"] = "table: " + (label_of("live" if chosen.live_scan else "loop", chosen)
                                              if isinstance(chosen, ix.DecodeConfig)
                                              else label_of("one_tile", chosen))
            if kind.endswith("_bool"):
                entry["label"] = entry["label"].split(":")[0] + ", bool mask (+ its conversion kernel)"
            if kind.startswith(("loop", "live", "table")):
                c = chosen if kind.startswith("table") else cfg
                if isinstance(c, ix.DecodeConfig):
                    n_lt = triton_cdiv(L, c.block_l)
                    if c.live_scan:  # the runs share the live tiles (here the first round(L · present) keys)
                        runs = ix.decode_runs(B, n_lt, sms, c.programs_per_sm)
                        live_tiles = triton_cdiv(int(round(L * present)), c.block_l)
                        entry.update(tiles=triton_cdiv(live_tiles, runs), programs=B * runs)
                    else:
                        tiles = ix.decode_tiles(B, n_lt, sms, c.programs_per_sm)
                        entry.update(tiles=tiles, programs=B * triton_cdiv(n_lt, tiles))
            try:
                got = ix.indexer_scores(*inputs[0], scale, config=cfg)
                if torch.equal(got, ref):
                    entry["check"] = "="
                else:
                    diff = (got - ref).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item()
                    same_mask = torch.equal(torch.isneginf(got), torch.isneginf(ref))
                    close = same_mask and torch.allclose(got.nan_to_num(neginf=0.0), ref.nan_to_num(neginf=0.0),
                                                         rtol=1e-5, atol=1e-5)
                    entry.update(check="≈" if close else "✗", max_abs_diff=diff)
                entry["us"] = time_us(runner(cfg, inputs), target_ms=1.5, replays=5)
            except Exception as exc:  # a config out of resources: recorded, not fatal
                entry.update(check="error", us=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            variants.append(entry)
        row = dict(B=B, L=L, present=present, bytes=nbytes, flops=flops, floor_us=floor_us,
                   datasheet_floor_us=nbytes / DATASHEET_BW * 1e6, n_sets=n_sets,
                   copy_op_bytes_us=copy_op_us, copy_keys_us=copy_keys_us, gather_keys_us=gather_us,
                   variants=variants)
        rows.append(row)
        print_case(label, row)
        del sets, bool_sets, ref
        torch.cuda.empty_cache()

    rec = recommend(rows, ix, sms)
    result = dict(device=name, sms=sms, bw=bw, rate=rate, table=str(ix.DECODE_TABLE),
                  loop_max_tiles=ix.DECODE_LOOP_MAX_TILES, rows=rows, recommendation=rec,
                  wall_s=time.time() - t_start)
    (out_dir / "tune_indexer_decode.json").write_text(json.dumps(result, indent=1))
    print_summary(rows, name, bw)
    print_recommendation(rec)
    print(f"\nwrote {out_dir / 'tune_indexer_decode.json'}; {time.time() - t_start:.0f} s", flush=True)


def timed(row, kind):
    return [v for v in row["variants"] if v["kind"] == kind and v.get("us")]


def best(vs, correct_only=True):
    """The fastest of ``vs``; with ``correct_only`` among those bit-identical to today's kernel or within fp32
    rounding of it (``≈``: the prefetch path's head-sum order)."""
    vs = [v for v in vs if v.get("us") and (v["check"] in ("=", "≈") or not correct_only)]
    return min(vs, key=lambda v: v["us"]) if vs else None


def fmt(row, v):
    if not v:
        return "-"
    floor, copy = 100 * row["floor_us"] / v["us"], 100 * row["copy_op_bytes_us"] / v["us"]
    return f"{v['us']:7.1f} µs {floor:4.0f} % floor {copy:4.0f} % copy {v['check']}"


def print_case(label, row):
    copy_floor = 100 * row["floor_us"] / row["copy_op_bytes_us"]
    print(f"\n{label}: floor {row['floor_us']:.1f} µs ({row['bytes'] / 1e6:.1f} MB), {row['n_sets']} input sets | "
          f"copy of the op's bytes {row['copy_op_bytes_us']:.1f} µs ({copy_floor:.0f} % floor), copy of the keys "
          f"{row['copy_keys_us']:.1f} µs, gather of the keys {row['gather_keys_us']:.1f} µs", flush=True)
    for v in sorted([v for v in row["variants"] if v.get("us")], key=lambda v: v["us"]):
        extra = f"  ({v['tiles']} tiles a program, {v['programs']} programs)" if "tiles" in v else ""
        diff = f"  max |diff| {v['max_abs_diff']:.2g}" if "max_abs_diff" in v else ""
        print(f"  {v['label']:44s} {fmt(row, v)}{extra}{diff}")
    for v in row["variants"]:
        if v["check"] == "error":
            print(f"  {v['label']:44s} {v['error']}")


def print_summary(rows, name, bw):
    print(f"\n==== decode indexer, {name}: µs (% of floor = bytes / the measured copy bandwidth, "
          f"{bw / 1e12:.2f} TB/s; % of the datasheet floor, bytes / {DATASHEET_BW / 1e12:.1f} TB/s); "
          "≈ / ✗ mark a kernel not bit-identical to today's ====")
    print("| B | L | keys | floor µs | datasheet floor µs | copy (op bytes) µs | today one-tile | best one-tile | "
          "table | best loop | best live (loop + live range) | today, bool mask | gather keys µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def cell(v):
            if not v:
                return "-"
            tag = "" if v["check"] == "=" else f" {v['check']}"
            return (f"{v['us']:.1f} ({100 * r['floor_us'] / v['us']:.0f} % / "
                    f"{100 * r['datasheet_floor_us'] / v['us']:.0f} %){tag}")
        today = timed(r, "today")[0] if timed(r, "today") else None
        one = best(timed(r, "one_tile") + ([today] if today else []))
        loop = best(timed(r, "loop"))
        live = best(timed(r, "live"))
        table = timed(r, "table")[0] if timed(r, "table") else None
        bool_today = timed(r, "today_bool")[0] if timed(r, "today_bool") else None
        print(f"| {r['B']} | {r['L']} | {r['present']:.0%} | {r['floor_us']:.1f} | {r['datasheet_floor_us']:.1f} | "
              f"{r['copy_op_bytes_us']:.1f} ({100 * r['floor_us'] / r['copy_op_bytes_us']:.0f} %) | {cell(today)} | "
              f"{cell(one)} {one['label'].split('one-tile ')[-1] if one else ''} | {cell(table)} | "
              f"{cell(loop)} {loop['label'][5:] if loop else ''} | {cell(live)} {live['label'][5:] if live else ''} | "
              f"{cell(bool_today)} | {r['gather_keys_us']:.1f} |")
    rec = next((r for r in rows if (r["B"], r["L"], r["present"]) == RECORDED), None)
    if rec is not None:
        goal = rec["floor_us"] / 0.8
        live = best(timed(rec, "live"))
        today = timed(rec, "today")[0] if timed(rec, "today") else None
        today_us = today["us"] if today else float("nan")
        live_us, live_label = (live["us"], live["label"]) if live else (float("nan"), "-")
        print(f"\nrecorded call (8 x 10240, 80 % of keys): 80 % of the floor = {goal:.1f} µs "
              f"({rec['datasheet_floor_us'] / 0.8:.1f} µs against the datasheet); today {today_us:.1f} µs, "
              f"best live {live_us:.1f} µs ({live_label})")


def recommend(rows, ix, sms):
    """The loop config (fixed runs or live range, with or without prefetch) correct (= or ≈) in every case that does
    not lose to today's kernel at the recorded call, with the lowest geometric mean of (its µs / today's µs);
    where it loses to today's kernel, and the DECODE_LOOP_MAX_TILES that would keep the one-tile kernel there
    (if the losing cases are exactly the largest ones)."""
    per_cfg = {}
    for r in rows:
        today = timed(r, "today")
        if not today:
            continue
        for v in timed(r, "loop") + timed(r, "live"):
            per_cfg.setdefault(v["label"], dict(config=v["config"], cases=[]))["cases"].append(
                dict(B=r["B"], L=r["L"], present=r["present"], ratio=v["us"] / today[0]["us"],
                     correct=v["check"] in ("=", "≈"), us=v["us"], today_us=today[0]["us"], floor_us=r["floor_us"]))
    n_cases = sum(1 for r in rows if timed(r, "today"))
    ok = {k: c for k, c in per_cfg.items() if len(c["cases"]) == n_cases and all(x["correct"] for x in c["cases"])}
    if not ok:
        return dict(verdict="no loop config matched today's kernel (= or ≈) in every case: set "
                            "DECODE_TABLE['tensor_cores'] = None (the one-tile kernel)", table=None)
    geo = {k: math.exp(sum(math.log(x["ratio"]) for x in c["cases"]) / len(c["cases"])) for k, c in ok.items()}

    def loses_recorded(k):
        return any((x["B"], x["L"], x["present"]) == RECORDED and x["ratio"] > 1.0 for x in ok[k]["cases"])
    keep = [k for k in geo if not loses_recorded(k)]
    win = min(keep or geo, key=geo.get)
    cfg = ix.DecodeConfig(*ok[win]["config"])  # a NamedTuple's fields in order, prefetch included
    cases = ok[win]["cases"]
    rec_case = next((x for x in cases if (x["B"], x["L"], x["present"]) == RECORDED), None)
    losing = [x for x in cases if x["ratio"] > 1.02]
    tiles_of = lambda x: x["B"] * -(-x["L"] // cfg.block_l)  # noqa: E731
    max_tiles = None
    if rec_case is not None and rec_case["ratio"] > 1.0:
        verdict = (f"the best loop config {win} loses to today's kernel at the recorded case "
                   f"({rec_case['us']:.1f} vs {rec_case['today_us']:.1f} µs): set DECODE_TABLE['tensor_cores'] = None")
        table = None
    else:
        table = cfg
        verdict = f"set DECODE_TABLE['tensor_cores'] = {cfg!r}"
        if losing:
            winning = [x for x in cases if x["ratio"] <= 1.02]
            if winning and min(map(tiles_of, losing)) > max(map(tiles_of, winning)):
                max_tiles = max(map(tiles_of, winning))
                verdict += (f" and DECODE_LOOP_MAX_TILES = {max_tiles} (the loop kernel loses > 2 % above "
                            f"{max_tiles} key tiles of {cfg.block_l}: " +
                            ", ".join(f"{x['B']}x{x['L']} {x['ratio']:.2f}x" for x in losing) + ")")
            else:
                verdict += (" (it loses > 2 % in " + ", ".join(f"{x['B']}x{x['L']} {x['ratio']:.2f}x" for x in losing)
                            + ", not only at the largest batches: no single DECODE_LOOP_MAX_TILES; compare the rows)")
    return dict(verdict=verdict, table=list(table) if table else None, loop_max_tiles=max_tiles, best=win,
                geomean_vs_today=geo[win], cases=cases,
                ranking=sorted(([k, g] for k, g in geo.items()), key=lambda kg: kg[1])[:8])


def print_recommendation(rec):
    print("\n==== what to set in ops/triton/indexer_scores.py ====")
    print(rec["verdict"])
    if rec.get("best"):
        print(f"best loop config (= or ≈): {rec['best']}, geometric mean {rec['geomean_vs_today']:.2f} x "
              "today's time over the cases")
        for x in rec["cases"]:
            print(f"  B={x['B']:3d} L={x['L']:6d} keys {x['present']:.0%}: {x['us']:7.1f} µs vs today "
                  f"{x['today_us']:7.1f} µs ({x['ratio']:.2f} x; {100 * x['floor_us'] / x['us']:.0f} % of floor)")
        print("runners-up (geometric mean vs today): " + ", ".join(f"{k} {g:.2f}" for k, g in rec["ranking"][1:]))


if __name__ == "__main__":
    main()
