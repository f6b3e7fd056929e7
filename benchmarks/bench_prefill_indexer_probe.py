"""Where the prefill indexer's time goes: the kernel beside probes that drop its pieces one at a time.

Why (benchmarks/NOTES.md, session 8, item 1): the prefill indexer (``kernels/indexer_scores_prefill.py``) ran at
62-64 % of its math floor (flops / the measured bf16 matmul rate) at the model's prefill chunks, and issue 10
asks 80 %. Before writing a warp-specialised kernel, measure what each piece costs on the same inputs (session
9: the mask cost 15 %, the dots and gathers alone ran at 86-92 %; after the changes this led to, the kernel
runs at its maskless probe, 77-81 %: RESULTS.md session 9):

  - ``ws``: the op as the model calls it (bool mask); on an H100/H200 at these dims that is the warp-specialised
    Gluon kernel (``kernels/indexer_scores_prefill_ws.py``, session 10);
  - ``kernel``: the Triton prefill kernel at its table config (``choose_prefill_config``), given the mask as uint8
    (as under torch.compile, where the bool -> uint8 conversion fuses into the mask's producer);
    ``kernel_bool_mask`` the op given a bool mask (in eager a uint8 view since session 9, ``common.uint8_mask``;
    before, a conversion every call: 5-10 % of the op);
  - ``full``: the probe with the kernel's epilogue (relu·w, head sum, a store per tile) but no ``allowed`` bytes
    and no scan for live tiles (every pair allowed here): what the mask costs;
  - ``head_sum``: the head sum and the stores, without relu·w: what the two FP ops a score cost;
  - ``mma_only``: ``acc = dot(keys, q_t, acc)`` across the program's tiles, one store at the end: the gathers and
    the tensor-core work alone, the ceiling of this tile shape in Triton;
each at two key layouts: ``page64`` (the paged cache: 64-key pages at random) and ``seq`` (a sequence's keys in
order: no gather), so the gathers' share shows too. The probes use the table's tile config (queries a program,
keys a tile, warps, stages, tiles a program) and print their registers and spills (ptxas).

Each time is the median of CUDA-graph replays (``bench_kernels.time_us``) after a warm-up; % is of the math floor
(2 · heads · dim · pairs / the 8192^3 bf16 matmul rate of the same run). ``full`` is checked against the kernel
(1e-5), ``head_sum`` against torch.

    python benchmarks/bench_prefill_indexer_probe.py           # one H200: ~1 min; a table; results.json and
                                                               # prefill_probe.png in $OUT
    python benchmarks/bench_prefill_indexer_probe.py --ncu     # the kernel and the full probe once each
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
import triton
import triton.language as tl

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = [(8, 512, 8192), (8, 512, 32768)]   # (B, S, L): the model's 4096-token prefill chunks, every pair allowed
MODES = {"full": 2, "head_sum": 1, "mma_only": 0}
# table columns: the op on Hopper (the warp-specialised kernel), the Triton kernel, its probes
COLUMNS = ("ws", "kernel_bool_mask", "kernel", *MODES)
HEADERS = {"ws": "op (Hopper: warp-specialised), bool mask", "kernel_bool_mask": "Triton kernel, bool mask",
           "kernel": "Triton kernel, uint8 mask", "full": "full (no mask)", "head_sum": "head_sum",
           "mma_only": "mma_only"}


@triton.jit
def prefill_dot_probe_kernel(Q, W, KP, KS, OUT, S, L, n_sb, n_lc, tiles_per_program,
                             stride_qb, stride_qs, stride_qh, stride_wb, stride_ws, stride_kp, stride_ksb,
                             stride_ob, stride_os,
                             D: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_L: tl.constexpr, MODE: tl.constexpr):
    """The prefill kernel's program layout (one sequence, BLOCK_S queries × BLOCK_HI heads on the dot's N axis,
    a run of BLOCK_L-key tiles on M) with MODE 2 = its epilogue less the mask, 1 = the head sum only, 0 = the dot
    accumulated across tiles (no epilogue)."""
    N: tl.constexpr = BLOCK_S * BLOCK_HI
    pid = tl.program_id(0)
    lc = pid % n_lc
    rest = pid // n_lc
    sb = rest % n_sb
    b = (rest // n_sb).to(tl.int64)
    offs_n = tl.arange(0, N)
    col_s = sb * BLOCK_S + offs_n // BLOCK_HI
    col_h = offs_n % BLOCK_HI
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + col_s[:, None] * stride_qs + col_h[:, None] * stride_qh + offs_d[None, :],
                mask=(col_s < S)[:, None], other=0.0)
    q_t = tl.trans(q)
    w = tl.load(W + b * stride_wb + col_s * stride_ws + col_h, mask=col_s < S, other=0.0).to(tl.float32)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    row_out = OUT + b * stride_ob + offs_s.to(tl.int64) * stride_os
    offs_tile = tl.arange(0, BLOCK_L)
    n_lt = tl.cdiv(L, BLOCK_L)
    t_lo = lc * tiles_per_program
    t_hi = tl.minimum(t_lo + tiles_per_program, n_lt)
    acc = tl.zeros([BLOCK_L, N], tl.float32)
    for t in range(t_lo, t_hi):
        offs_l = t * BLOCK_L + offs_tile
        mask_l = offs_l < L
        slot = tl.load(KS + b * stride_ksb + offs_l, mask=mask_l, other=0)
        k = tl.load(KP + slot.to(tl.int64)[:, None] * stride_kp + offs_d[None, :], mask=mask_l[:, None], other=0.0)
        if MODE == 0:
            acc = tl.dot(k, q_t, acc)
        else:
            x = tl.dot(k, q_t)
            if MODE == 2:
                x = tl.maximum(x, 0.0) * w[None, :]
            tot = tl.sum(tl.reshape(x, (BLOCK_L, BLOCK_S, BLOCK_HI)), 2)
            tl.store(row_out[None, :] + offs_l[:, None], tot, mask=mask_l[:, None] & mask_s[None, :])
    if MODE == 0:
        offs_l = t_lo * BLOCK_L + offs_tile
        tot = tl.sum(tl.reshape(acc, (BLOCK_L, BLOCK_S, BLOCK_HI)), 2)
        tl.store(row_out[None, :] + offs_l[:, None], tot, mask=(offs_l < L)[:, None] & mask_s[None, :])


def probe(mode, q, w, k_pool, key_slots, out, cfg):
    """Launch the probe in ``mode`` at the prefill config ``cfg`` (block_s, block_l, warps, stages, tiles)."""
    B, S, Hi, Di = q.shape
    L = key_slots.shape[1]
    block_s, block_l, warps, stages, tiles = cfg
    n_sb = triton.cdiv(S, block_s)
    n_lc = triton.cdiv(triton.cdiv(L, block_l), tiles)
    return prefill_dot_probe_kernel[(B * n_sb * n_lc,)](
        q, w, k_pool, key_slots, out, S, L, n_sb, n_lc, tiles,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k_pool.stride(0), key_slots.stride(0),
        out.stride(0), out.stride(1), D=Di, BLOCK_HI=Hi, BLOCK_S=block_s, BLOCK_L=block_l, MODE=MODES[mode],
        num_warps=warps, num_stages=stages)


def make_case(B, S, L, layout, Hi=64, Di=128, page=64):
    from tune_indexer import make_inputs
    q, w, k_pool, key_slots, allowed = make_inputs(B, S, L, False, Hi, Di, page)
    if layout == "seq":   # each sequence's keys in order: the same rows, no gather
        key_slots = (torch.arange(B, device="cuda")[:, None] * L
                     + torch.arange(L, device="cuda")[None, :]).to(torch.int32).contiguous()
    return q, w, k_pool, key_slots, allowed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "prefill_probe"))
    p.add_argument("--config", default=None, help="block_s,block_l,warps,stages,tiles of the kernel and the probes "
                   "(default: the table's, choose_prefill_config)")
    p.add_argument("--ncu", action="store_true", help="launch the kernel and the full probe once each at "
                   "8 x 512 x 32768 (page64): a target for ncu")
    args = p.parse_args()
    from bench_kernels import measure_ceilings, time_us
    from tune_indexer import cost

    from dcp_compile.ops.triton import indexer_scores as ix
    from dcp_compile.ops.triton import indexer_scores_ws

    cfg = tuple(int(v) for v in args.config.split(",")) if args.config else tuple(ix.choose_prefill_config(64, False))
    if args.ncu:
        q, w, k_pool, key_slots, allowed = make_case(8, 512, 32768, "page64")
        scale = q.shape[-1] ** -0.5
        ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=cfg)
        probe("full", q, w * scale, k_pool, key_slots, torch.empty(8, 512, 32768, device="cuda"), cfg)
        torch.cuda.synchronize()
        return
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw, rate = measure_ceilings()
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; prefill config {cfg}", flush=True)
    rows, regs = [], {}
    for B, S, L in CASES:
        for layout in ("page64", "seq"):
            q, w, k_pool, key_slots, allowed = make_case(B, S, L, layout)
            scale = q.shape[-1] ** -0.5
            _, flops = cost(q, k_pool, key_slots, allowed)
            floor_us = flops / rate * 1e6
            ref = ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale, config=cfg)
            # the op converts a bool mask to uint8 (134 MB at 8 x 512 x 32K: ~65 us in eager); compiled, the
            # conversion fuses into the kernel that computes the mask, so "kernel" passes the uint8 mask
            allowed_u8 = allowed.to(torch.uint8)
            row = dict(B=B, S=S, L=L, layout=layout, floor_us=floor_us,
                       kernel=time_us(lambda: ix.indexer_scores(q, w, k_pool, key_slots, allowed_u8, scale,
                                                                config=cfg), target_ms=20, replays=9),
                       kernel_bool_mask=time_us(lambda: ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale,
                                                                          config=cfg), target_ms=20, replays=9))
            if indexer_scores_ws.serves(q, k_pool):  # the op's own path on Hopper: the warp-specialised kernel, bool mask
                got = ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
                row["ws"] = time_us(lambda: ix.indexer_scores(q, w, k_pool, key_slots, allowed, scale),
                                    target_ms=20, replays=9)
            out = torch.empty(B, S, L, device="cuda")
            for mode in MODES:
                ws = w * scale if mode == "full" else w
                out.fill_(float("nan"))
                kern = probe(mode, q, ws, k_pool, key_slots, out, cfg)
                regs[mode] = (kern.n_regs, kern.n_spills)
                if mode == "full":
                    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
                elif mode == "head_sum":
                    keys = k_pool[key_slots.long()].float()                       # [B, L, Di]
                    want = torch.einsum("bshd,bld->bsl", q.float(), keys)
                    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3)
                row[mode] = time_us(lambda: probe(mode, q, ws, k_pool, key_slots, out, cfg), target_ms=20, replays=9)
            rows.append(row)
            print(f"B={B} S={S} L={L} {layout:6s} floor {floor_us:8.1f} us | "
                  + " | ".join(f"{k} {row[k]:8.1f} ({100 * floor_us / row[k]:4.1f} %)"
                               for k in COLUMNS if k in row), flush=True)
            del q, w, k_pool, key_slots, allowed, allowed_u8, ref, out
            torch.cuda.empty_cache()
    result = dict(device=name, bw=bw, rate=rate, config=cfg, regs=regs, rows=rows)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir)
    print(f"\n==== prefill indexer and its probes: {name}; config {cfg}; µs (% of the math floor at "
          f"{rate / 1e12:.0f} TFLOP/s) ====")
    print("registers, spills: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in regs.items()))
    cols = [k for k in COLUMNS if k in rows[0]]
    print("| B | S | L | layout | floor µs | " + " | ".join(HEADERS[k] for k in cols) + " |")
    print("|---|---|---|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['B']} | {r['S']} | {r['L']} | {r['layout']} | {r['floor_us']:.0f} | "
              + " | ".join(f"{r[k]:.0f} ({100 * r['floor_us'] / r[k]:.0f} %)" for k in cols) + " |")


def plot(result, out_dir):
    """% of the math floor of the kernel and each probe, per case and layout: prefill_probe.png."""
    from plotting import pyplot, save

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    names = tuple(k for k in COLUMNS if k in result["rows"][0])
    labels = [f"{r['B']}x{r['S']}x{r['L'] // 1024}K\n{r['layout']}" for r in result["rows"]]
    width = 0.8 / len(names)
    for j, k in enumerate(names):
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(labels))],
               [100 * r["floor_us"] / r[k] for r in result["rows"]], width, label=k)
    ax.axhline(80, color="k", ls="--", lw=0.8, label="issue 10's 80 %")
    ax.set_xticks(list(range(len(labels))), labels, fontsize=7)
    ax.set_ylabel("% of the math floor")
    ax.legend(fontsize=7)
    save(fig, out_dir / "prefill_probe.png", f"{result['device']}: prefill indexer and probes, config "
         f"{tuple(result['config'])}, floor at {result['rate'] / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
