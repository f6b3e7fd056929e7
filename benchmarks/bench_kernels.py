"""Benchmarks of the Triton kernels in ops/triton/ against the floor and plain PyTorch.

    pip install -e .                              # once: the kernels come from the installed package
    python benchmarks/bench_kernels.py            # full run (H100: a few minutes, autotuning included)
    python benchmarks/bench_kernels.py --quick    # smoke run: few shapes
    python benchmarks/bench_kernels.py --focus    # ceilings + FOCUS_VARIANTS on the H >= 32 shapes only
    ncu ... python benchmarks/bench_kernels.py --profile-one 64,128,32,64,4,2   # one variant, for ncu
    python benchmarks/bench_kernels.py --recorded calls.pt   # exactly the dcp op calls a real model made
                                                             # (bench_e2e.py --record calls.pt)

(The pre-table autotuned path and the value split that runs 2–6 of RESULTS.md compared were removed from
ops/ after run 6; RESULTS.md says where they last lived.)

In one run: the two ceilings (copy bandwidth of a large device-to-device copy, bytes read + written; bf16
matmul rate), then sparse-MLA decode (batch × heads, K = 2048, a 128K-row pool of 576-wide bf16 rows; full
and 1/2, 1/4, 1/8 of each query's rows valid, compacted), sparse prefill (4096 queries × 128 heads),
indexer scoring (contexts 8K / 64K / 128K) and the split-K combine (merge_partials), each against a plain PyTorch version timed in
the same run. Times are medians of CUDA-graph replays (no launch gaps), rotating among enough input sets
that one replay's working set exceeds the L2 cache. Writes results.json and bench.png to --out
(default $OUT if set, else benchmarks/out) and prints a table.

Floor of sparse MLA: bytes = per query its gathered rows once (count × 576 × 2 B; heads share the row)
+ q + out; flops = 2 · H · count · (576 + 512) per query; floor = max(bytes / copy-BW, flops / matmul-rate).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
import traceback

import torch
import triton
import triton.language as tl

from dcp_compile.ops.triton import indexer_scores as ixm
from dcp_compile.ops.triton import merge_partials as mpm
from dcp_compile.ops.triton import sparse_mla_attn as smla
from dcp_compile.ops.triton.kernels import indexer_scores as ixk
from dcp_compile.ops.triton.kernels import merge_partials as mpk
from dcp_compile.ops.triton.kernels import sparse_mla_attn as smk

DK, DV = 576, 512
DTYPE = torch.bfloat16
L2_BYTES = 50 * 2 ** 20


# ------------------------------------------------------------------------------------------ timing

def time_us(fns, target_ms=4.0, replays=15):
    """Median µs per call of the callables ``fns`` (one per input set; called round-robin) from CUDA-graph
    replays; falls back to triton.testing.do_bench (median) if capture fails."""
    if callable(fns):
        fns = [fns]
    for f in fns:
        f()
    torch.cuda.synchronize()
    # estimate
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for f in fns:
        f()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / len(fns), 1e-3)
    n = max(len(fns), min(2000, int(math.ceil(target_ms / est))))
    n = int(math.ceil(n / len(fns)) * len(fns))
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g):
            for i in range(n):
                fns[i % len(fns)]()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(replays):
            s.record()
            g.replay()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) * 1e3 / n)
        del g
        ts.sort()
        return ts[len(ts) // 2]
    except Exception as exc:  # pragma: no cover - fallback path
        print(f"  (graph capture failed: {exc!r}; using do_bench)")
        import triton.testing
        i = [0]

        def f():
            fns[i[0] % len(fns)]()
            i[0] += 1
        return triton.testing.do_bench(f, return_mode="median") * 1e3


COPY_SIZES_MIB = (64, 256, 1024)  # per buffer; each size rotates over enough buffers to exceed the L2 4x


@triton.jit
def stream_copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    """y = x, BLOCK elements a program: what a Triton kernel's plain loads and stores reach."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def stream_copy(src, dst, block=8192):
    n = src.numel()
    stream_copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, num_warps=8)


def measure_copy_bandwidths():
    """{MiB: bytes/s} of device-to-device bf16 copies (bytes read + written) at several sizes, each timed over
    buffers rotated so that one pass exceeds the L2, the better of ``torch``'s copy and a Triton streaming
    copy. Neither alone is the ceiling: on the H200s here torch's copy falls from 4.2 TB/s at 256 MiB to
    2.76 TB/s from 512 MiB up while the Triton copy holds 4.06-4.09 TB/s (benchmarks/RESULTS.md, session 8,
    bench_gather_ceiling.py); every indexer "% of floor" before session 8 divided by torch's 1 GiB copy."""
    out = {}
    for mib in COPY_SIZES_MIB:
        n = mib << 19  # bf16 elements in mib MiB
        sets = max(1, -(-200 // mib))  # >= 200 MiB of sources: 4 x an H100 / H200 L2
        src = [torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_() for _ in range(sets)]
        dst = [torch.empty_like(t) for t in src]
        t_torch = time_us([lambda i=i: dst[i].copy_(src[i]) for i in range(sets)], target_ms=50, replays=9)
        t_triton = time_us([lambda i=i: stream_copy(src[i], dst[i]) for i in range(sets)], target_ms=50, replays=9)
        out[mib] = 2 * n * 2 / (min(t_torch, t_triton) * 1e-6)
        del src, dst
        torch.cuda.empty_cache()
    return out


def measure_ceilings():
    """(copy bytes/s, bf16 matmul flop/s): the best of ``measure_copy_bandwidths`` (each size printed) and an
    8192^3 bf16 matmul."""
    copies = measure_copy_bandwidths()
    print("copy ceiling, GB/s (read + written) by buffer MiB: "
          + ", ".join(f"{mib}: {bw / 1e9:.0f}" for mib, bw in copies.items()), flush=True)
    bw = max(copies.values())
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_us(lambda: a @ b, target_ms=50, replays=9)
    rate = 2 * 8192 ** 3 / (t * 1e-6)
    del a, b
    torch.cuda.empty_cache()
    return bw, rate


# ------------------------------------------------------------------------------------- sparse MLA

def torch_sparse_mla(q, kv, slots, counts, scale, v_dim):
    """Plain PyTorch: gather the K rows, bmm, masked softmax, bmm (the full K width, masked)."""
    T, H, _ = q.shape
    K = slots.shape[1]
    g = kv[slots.clamp(min=0).long()]                          # [T, K, Dk]
    s = torch.bmm(q, g.transpose(1, 2)).float() * scale        # [T, H, K]
    valid = torch.arange(K, device=q.device)[None, :] < counts[:, None]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.bmm(p.to(q.dtype), g[..., :v_dim])
    return out, lse


def mla_floor(T, H, count, bw, rate):
    bytes_ = T * count * DK * 2 + T * H * DK * 2 + T * H * DV * 2 + T * H * 4
    flops = 2 * H * count * (DK + DV) * T
    return bytes_, flops, max(bytes_ / bw, flops / rate) * 1e6


def make_sets(T, H, K, pool, frac, n_sets, gen_dev="cuda"):
    sets = []
    count = max(1, int(K * frac))
    for _ in range(n_sets):
        q = torch.randn(T, H, DK, device=gen_dev, dtype=DTYPE)
        slots = torch.randint(0, pool.shape[0], (T, K), device=gen_dev, dtype=torch.int32)
        slots[:, count:] = -1
        counts = torch.full((T,), count, device=gen_dev, dtype=torch.int32)
        sets.append((q, slots, counts))
    return sets, count


def _plan(T, H, K, device, kw):
    """(BLOCK_H, NSPLIT) the wrapper uses for these overrides."""
    return smla.plan(T, H, K, device, block_h=kw.get("block_h"), num_splits=kw.get("num_splits"))


def _label(kw):
    if not kw:
        return "default"
    parts = []
    for k in ("block_h", "num_splits", "config"):
        if k in kw:
            v = kw[k]
            parts.append(k if v is True else f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}")
    return ",".join(parts)


def bench_decode(pool, batches, heads, fracs, bw, rate, K=2048, with_ref=True, extra=None, label=None):
    rows = []
    scale = DK ** -0.5
    for T in batches:
        for H in heads:
            ref_us = None
            full_us = None
            for frac in fracs:
                count = max(1, int(K * frac))
                per_call = T * count * DK * 2
                n_sets = max(2, min(64, math.ceil(3 * L2_BYTES / max(per_call, 1))))
                sets, count = make_sets(T, H, K, pool, frac, n_sets)
                kw = extra or {}
                fns = [lambda s=s: smla.sparse_mla_attn(s[0], pool, s[1], s[2], scale, DV, **kw) for s in sets]
                us = time_us(fns)
                if with_ref and ref_us is None:
                    rfns = [lambda s=s: torch_sparse_mla(s[0], pool, s[1], s[2], scale, DV) for s in sets[:4]]
                    ref_us = time_us(rfns)
                if frac == 1:
                    full_us = us
                bytes_, flops, floor = mla_floor(T, H, count, bw, rate)
                bh, ns = _plan(T, H, K, pool.device, kw)
                row = dict(kind="decode", T=T, H=H, K=K, frac=frac, count=count, us=us,
                           GBps=bytes_ / us * 1e-3, TFLOPs=flops / us * 1e-6, floor_us=floor,
                           pct_floor=100 * floor / us, torch_us=ref_us,
                           x_torch=(ref_us / us) if ref_us else None,
                           vs_full_over_n=(us / (full_us * frac)) if (full_us and frac < 1) else None,
                           nsplit=ns, block_h=bh, variant=label or _label(kw))
                rows.append(row)
                print(fmt_row(row), flush=True)
                del sets, fns
    return rows


def bench_prefill(pool, bw, rate, T=4096, H=128, K=2048, with_ref=True, extra=None, label=None):
    scale = DK ** -0.5
    sets, count = make_sets(T, H, K, pool, 1.0, 1)
    q, slots, counts = sets[0]
    kw = extra or {}
    us = time_us(lambda: smla.sparse_mla_attn(q, pool, slots, counts, scale, DV, **kw), target_ms=20, replays=5)
    ref_us = None
    if with_ref:
        chunk = 256

        def ref():
            for i in range(0, T, chunk):
                torch_sparse_mla(q[i:i + chunk], pool, slots[i:i + chunk], counts[i:i + chunk], scale, DV)
        ref_us = time_us(ref, target_ms=20, replays=3)
    bytes_, flops, floor = mla_floor(T, H, count, bw, rate)
    bh, ns = _plan(T, H, K, pool.device, kw)
    row = dict(kind="prefill", T=T, H=H, K=K, frac=1.0, count=count, us=us, GBps=bytes_ / us * 1e-3,
               TFLOPs=flops / us * 1e-6, floor_us=floor, pct_floor=100 * floor / us, torch_us=ref_us,
               x_torch=(ref_us / us) if ref_us else None, vs_full_over_n=None, nsplit=ns,
               block_h=bh, variant=label or _label(kw))
    print(fmt_row(row), flush=True)
    del q, slots, counts, sets
    torch.cuda.empty_cache()
    return [row]


# variants compared in --focus (same run): the table's configs and their neighbours
FOCUS_VARIANTS = [
    dict(block_h=32, config=(64, 8, 2)),
    dict(block_h=32, config=(64, 4, 2)),                            # the table's pick for 32-head tiles
    dict(block_h=32, config=(64, 4, 3)),
    dict(block_h=32, config=(32, 4, 3)),
    dict(block_h=16, config=(64, 8, 2)),                            # H=16's tile for every H
    dict(),                                                          # the defaults
]
FOCUS_H16 = [dict(block_h=16, config=(64, 4, 2)), dict(block_h=16, config=(64, 8, 3)), dict()]


def bench_focus(pool, bw, rate, pre_T=4096):
    rows = []
    for kw in FOCUS_VARIANTS:
        lab = _label(kw)
        for (T, H, fracs) in [(64, 128, [1.0, 0.125]), (128, 128, [1.0]), (64, 64, [1.0]), (64, 32, [1.0]),
                              (128, 32, [1.0]), (8, 128, [1.0])]:
            if kw.get("block_h", 0) > max(16, H):
                continue
            try:
                rows += bench_decode(pool, [T], [H], fracs, bw, rate, with_ref=False, extra=kw, label=lab)
            except Exception as exc:
                print(f"!! {lab} T={T} H={H}: {exc!r}"[:400], flush=True)
        try:
            rows += bench_prefill(pool, bw, rate, T=pre_T, with_ref=False, extra=kw, label=lab)
        except Exception as exc:
            print(f"!! {lab} prefill: {exc!r}"[:400], flush=True)
    for kw in FOCUS_H16:
        lab = _label(kw)
        for (T, H) in [(64, 16), (128, 16), (8, 16)]:
            rows += bench_decode(pool, [T], [H], [1.0], bw, rate, with_ref=False, extra=kw, label=lab)
    return rows


def profile_one(spec):
    """One launch of one variant (for ncu): spec = 'T,H,block_h,BN,warps,stages'."""
    f = [int(x) for x in spec.split(",")]
    T, H = f[0], f[1]
    kw = dict(block_h=f[2], config=tuple(f[3:6]))
    pool = torch.randn(128 * 1024, DK, device="cuda", dtype=DTYPE)
    sets, _ = make_sets(T, H, 2048, pool, 1.0, 1)
    q, slots, counts = sets[0]
    for _ in range(3):
        smla.sparse_mla_attn(q, pool, slots, counts, DK ** -0.5, DV, **kw)
    torch.cuda.synchronize()


def fmt_row(r):
    x = f"{r['x_torch']:.1f}x" if r.get("x_torch") else "-"
    v = f"{r['vs_full_over_n']:.2f}" if r.get("vs_full_over_n") else "-"
    return (f"{r['kind']:8s} T={r['T']:5d} H={r['H']:4d} frac={r['frac']:<6.3g} cnt={r['count']:5d} "
            f"bh={r.get('block_h', '-')!s:>3} sp={r.get('nsplit', '-')!s:>3} | "
            f"{r['us']:9.1f} us "
            f"{r['GBps']:7.0f} GB/s {r['TFLOPs']:6.1f} TF/s floor {r['floor_us']:8.1f} us "
            f"{r['pct_floor']:5.1f}% | torch {r['torch_us'] or 0:9.1f} us {x:>6} | t/(full·f) {v}"
            + (f" [{r['variant']}]" if r.get("variant", "default") != "default" else ""))


# ------------------------------------------------------------------------------------------ indexer

def torch_indexer(q, w, k_pool, key_slots, allowed, scale):
    k = k_pool[key_slots.clamp(min=0).long()]                               # [B, L, Di]
    s = torch.matmul(q.transpose(1, 2).reshape(q.shape[0], -1, q.shape[-1]), k.transpose(1, 2))  # [B, S*Hi, L]
    s = s.view(q.shape[0], q.shape[2], q.shape[1], -1)                       # [B, Hi, S, L]
    s = torch.relu(s.float() * scale)                                        # [B, Hi, S, L]
    out = (s * w.transpose(1, 2)[..., None]).sum(1)                          # [B, S, L]
    ok = allowed & (key_slots >= 0)[:, None, :]
    return out.masked_fill(~ok, float("-inf"))


def bench_indexer(contexts, bw, rate, B=16, S=1, Hi=64, Di=128, page=64):
    rows = []
    for L in contexts:
        P = B * L
        k_pool = torch.randn(P, Di, device="cuda", dtype=DTYPE)
        # each sequence's keys live on random pages of the pool (paged cache)
        n_pages = P // page
        perm = torch.randperm(n_pages, device="cuda").view(B, L // page)
        key_slots = (perm[:, :, None] * page + torch.arange(page, device="cuda")).reshape(B, L).to(torch.int32)
        q = torch.randn(B, S, Hi, Di, device="cuda", dtype=DTYPE)
        w = torch.randn(B, S, Hi, device="cuda") * Hi ** -0.5
        allowed = torch.ones(B, S, L, dtype=torch.bool, device="cuda")
        allowed[:, :, L - 5:] = False
        scale = Di ** -0.5
        us = time_us(lambda: ixm.indexer_scores(q, w, k_pool, key_slots, allowed, scale))
        ref_us = time_us(lambda: torch_indexer(q, w, k_pool, key_slots, allowed, scale))
        bytes_ = B * L * (Di * 2 + 4 + S * 1 + S * 4) + B * S * Hi * (Di * 2 + 4)
        flops = 2 * B * S * Hi * L * Di
        floor = max(bytes_ / bw, flops / rate) * 1e6
        r = dict(kind="indexer", B=B, S=S, Hi=Hi, Di=Di, L=L, us=us, GBps=bytes_ / us * 1e-3,
                 TFLOPs=flops / us * 1e-6, floor_us=floor, pct_floor=100 * floor / us, torch_us=ref_us,
                 x_torch=ref_us / us)
        rows.append(r)
        print(f"indexer  B={B} S={S} Hi={Hi} L={L:6d} | {us:9.1f} us {r['GBps']:7.0f} GB/s "
              f"floor {floor:8.1f} us {r['pct_floor']:5.1f}% | torch {ref_us:9.1f} us {ref_us / us:5.1f}x",
              flush=True)
        del k_pool, key_slots, q, w, allowed
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ split-K combine (merge)

def torch_merge_partials(o, lse):
    m = torch.logsumexp(lse, 0)
    wgt = torch.exp(lse - m).nan_to_num(0.0)
    return (wgt[..., None] * o.float()).sum(0).to(o.dtype), m


def bench_merge(bw, shapes):
    rows = []
    for (N, T, H) in shapes:
        o = torch.randn(N, T, H, DV, device="cuda", dtype=DTYPE)
        lse = torch.randn(N, T, H, device="cuda")
        us = time_us(lambda: mpm.merge_partials(o, lse))
        ref_us = time_us(lambda: torch_merge_partials(o, lse))
        bytes_ = N * T * H * (DV * 2 + 4) + T * H * (DV * 2 + 4)
        r = dict(kind="merge_partials", N=N, T=T, H=H, us=us, floor_us=bytes_ / bw * 1e6,
                 pct_floor=100 * bytes_ / bw * 1e6 / us, torch_us=ref_us, x_torch=ref_us / us)
        rows.append(r)
        print(f"merge_partials N={N} T={T} H={H} | {us:8.1f} us floor {r['floor_us']:6.1f} us {r['pct_floor']:5.1f}% "
              f"| torch {ref_us:8.1f} us {ref_us / us:5.1f}x", flush=True)
    return rows


def compiled_info(kernels):
    """Registers / spills / shared memory of every compiled variant (best effort across Triton versions)."""
    rows = []
    for k in kernels:
        try:
            caches = getattr(k, "device_caches", None) or {}
            for dev, entry in caches.items():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for key, ck in cache.items():
                    try:
                        ck._init_handles()
                    except Exception:
                        pass
                    md = getattr(ck, "metadata", None)
                    consts = {}
                    try:
                        src = getattr(ck, "src", None)
                        names = list(getattr(k, "arg_names", []) or [])

                        def _name(a):
                            if isinstance(a, tuple) and len(a) == 1 and isinstance(a[0], int) and a[0] < len(names):
                                return names[a[0]]
                            if isinstance(a, int) and a < len(names):
                                return names[a]
                            return str(a)
                        consts = {_name(a): v for a, v in (getattr(src, "constants", {}) or {}).items()
                                  if isinstance(v, (int, bool))}
                    except Exception:
                        pass
                    asm = getattr(ck, "asm", {}) or {}
                    ptx = asm.get("ptx", "") if isinstance(asm, dict) else ""
                    rows.append(dict(kernel=getattr(k, "__name__", str(k)), n_regs=getattr(ck, "n_regs", None),
                                     wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx,
                                     n_spills=getattr(ck, "n_spills", None),
                                     shared=getattr(md, "shared", None), num_warps=getattr(md, "num_warps", None),
                                     num_stages=getattr(md, "num_stages", None), constants=consts))
        except Exception as exc:
            rows.append(dict(kernel=str(k), error=repr(exc)))
    return rows


# ----------------------------------------------------------------------------------- recorded op calls

def _nbytes(spec):
    return math.prod(spec["shape"]) * torch.empty(0, dtype=getattr(torch, spec["dtype"])).element_size()


def _strided(spec, device):
    """An uninitialised tensor with the recorded dtype, shape, strides and storage offset."""
    dtype = getattr(torch, spec["dtype"])
    shape, stride, offset = spec["shape"], spec["stride"], spec["storage_offset"]
    extent = offset + 1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0)
    return torch.empty(max(extent, 1), dtype=dtype, device=device).as_strided(shape, stride, offset)


def _fill(t, values):
    try:
        t.copy_(values)
        return t
    except RuntimeError:  # overlapping strides (an expanded tensor): keep the values, dense
        return values.clone()


def materialise_call(call, device, gen):
    """The arguments of one recorded call on ``device``: recorded values where kept (slots, counts, positions,
    block tables, masks, small score tensors), else made to look like the model's: float tensors N(mean, std)
    of the recorded summary, attention slots valid first (``counts`` of them, rows of the pool) then -1,
    write slots distinct rows (the recorded fraction skipped), other integers uniform in the recorded range,
    bools at the recorded fraction true. Strides and storage offsets as recorded."""
    specs = {a["name"]: a for a in call["args"]}
    out = {}
    for name, spec in specs.items():
        if spec["kind"] != "tensor":
            out[name] = spec.get("value")
            continue
        t = _strided(spec, device)
        summ = spec.get("summary", {})
        if "values" in spec:
            out[name] = _fill(t, spec["values"].to(device))
        elif t.is_floating_point():
            vals = torch.randn(t.shape, device=device, generator=gen) * (summ.get("std") or 1.0) + summ.get("mean", 0.0)
            out[name] = _fill(t, vals.to(t.dtype))
        elif t.dtype == torch.bool:
            out[name] = _fill(t, torch.rand(t.shape, device=device, generator=gen) < summ.get("frac_true", 1.0))
        else:
            out[name] = None  # integers: below, once the tensors they index exist
    op = call["op"]
    for name, spec in specs.items():
        if spec["kind"] != "tensor" or out[name] is not None:
            continue
        summ, t = spec.get("summary", {}), _strided(spec, device)
        if op == "dcp::sparse_mla_attn" and name == "slots":
            rows = out["kv"].shape[0]
            counts = out["counts"].long()
            vals = torch.randint(0, max(rows, 1), t.shape, device=device, generator=gen)
            vals[torch.arange(t.shape[1], device=device)[None, :] >= counts[:, None]] = -1
        elif op == "dcp::paged_write" and name == "slots":
            rows = out["pool"].shape[0]
            vals = torch.randperm(rows, device=device, generator=gen)[: t.numel()].view(t.shape)
            vals[torch.rand(t.shape, device=device, generator=gen) < summ.get("frac_negative", 0.0)] = -1
        else:
            lo, hi = int(summ.get("min", 0)), int(summ.get("max", 0))
            vals = torch.randint(lo, hi + 1, t.shape, device=device, generator=gen)
        out[name] = _fill(t, vals.to(t.dtype))
    return out


def recorded_cost(call, a):
    """(bytes, flops, how) of one call: the fewest bytes it must move and the arithmetic it must do."""
    op = call["op"]
    tensors = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
    size = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    if op == "dcp::sparse_mla_attn":
        q, kv = a["q"], a["kv"]
        T, H, Dk = q.shape
        rows = int(a["counts"].long().sum())
        bytes_ = rows * Dk * kv.element_size() + size["q"] + T * H * a["v_dim"] * q.element_size() + T * H * 4 \
            + size["slots"] + size["counts"]
        return bytes_, 2 * H * rows * (Dk + a["v_dim"]), "selected rows once + q + out + lse"
    if op == "dcp::paged_write":
        valid = int((a["slots"] >= 0).sum())
        return 2 * valid * a["rows"].shape[1] * a["rows"].element_size() + size["slots"], 0, "owned rows read + written"
    if op == "dcp::indexer_scores":
        q = a["q"]
        B, S, Hi, Di = q.shape
        valid = int((a["key_slots"] >= 0).sum())
        L = a["key_slots"].shape[1]
        bytes_ = valid * Di * a["k_pool"].element_size() + size["key_slots"] + size["allowed"] + B * S * L * 4 \
            + size["q"] + size["w"]
        return bytes_, 2 * S * Hi * Di * valid, "valid keys once + slots + mask + fp32 scores out"
    if op == "dcp::candidate_keys":
        return sum(size.values()) + a["scores"].numel() * 8, 0, "scores + positions + int64 keys out"
    if op == "dcp::topk_select":
        T = a["cand_keys"].shape[1]
        return sum(size.values()) + T * a["k"] * 4 + T * 4, 0, "every rank's keys once + outputs (loose floor)"
    if op == "dcp::lse_combine":
        return sum(size.values()) + a["out"].numel() * 4, 0, "inputs + fp32 output"
    return sum(size.values()), 0, "inputs only (no model for this op)"


def bench_recorded(path, bw, rate, max_set_bytes=8 << 30):
    """Time each recorded dcp call (the collectives are listed, not timed): warmed up, CUDA-graph replays
    rotating among enough independently made input sets that one replay's data exceeds the L2 (as between
    layers of the model, where other weights flush it)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from record_op_calls import load_calls, summarise

    record = load_calls(path)
    info = record.get("info", {})
    print(f"recorded calls from {path}: mode {info.get('mode')}, batch {info.get('batch')}, context "
          f"{info.get('context')}, world {info.get('world')}, rank {info.get('rank')}", flush=True)
    for line in summarise(record["calls"]):
        print("  " + line)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for i, call in enumerate(record["calls"]):
        if not call["op"].startswith("dcp::"):
            continue
        op = getattr(torch.ops.dcp, call["op"].split("::")[1])
        footprint = sum(_nbytes(a) for a in call["args"] if a["kind"] == "tensor")
        n_sets = max(1, min(16, math.ceil(3 * L2_BYTES / max(footprint, 1)), max_set_bytes // max(footprint, 1)))
        sets = [materialise_call(call, "cuda", gen) for _ in range(n_sets)]
        names = [a["name"] for a in call["args"]]
        fns = [lambda s=s: op(*[s[n] for n in names]) for s in sets]
        us = time_us(fns)
        bytes_, flops, how = recorded_cost(call, sets[0])
        floor = max(bytes_ / bw, flops / rate) * 1e6
        shapes = ", ".join(f"{a['name']}={a['dtype']}{a['shape']}" for a in call["args"] if a["kind"] == "tensor")
        row = dict(kind="recorded", index=i, op=call["op"], phase=call["phase"], count=call["count"], us=us,
                   us_per_phase=us * call["count"], bytes=bytes_, flops=flops, floor_us=floor,
                   pct_floor=100 * floor / us, floor_model=how, input_sets=n_sets, args=shapes,
                   bound="memory" if bytes_ / bw >= flops / rate else "math")
        rows.append(row)
        print(f"{row['phase']:8s} x{row['count']:<3d} {row['op']:22s} {us:9.1f} us  floor {floor:8.1f} us "
              f"{row['pct_floor']:5.1f}% ({row['bound']})  | {shapes}", flush=True)
        del sets, fns
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------- plot

def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"(no plot: {exc!r})")
        return
    dec = [r for r in results["decode"] if r.get("frac") == 1.0]
    if not dec:
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    heads = sorted({r["H"] for r in dec})
    for H in heads:
        rs = sorted([r for r in dec if r["H"] == H], key=lambda r: r["T"])
        axes[0].plot([r["T"] for r in rs], [r["us"] for r in rs], "o-", label=f"triton H={H}")
        if rs[0].get("torch_us"):
            axes[0].plot([r["T"] for r in rs], [r["torch_us"] for r in rs], "x--", label=f"torch H={H}")
        axes[1].plot([r["T"] for r in rs], [r["pct_floor"] for r in rs], "o-", label=f"H={H}")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (queries)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("µs")
    axes[0].set_title("sparse MLA decode, K=2048, 576-wide bf16 rows")
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("% of floor")
    axes[1].axhline(70, color="gray", ls=":")
    axes[1].set_title("% of floor (max(bytes/copy BW, flops/matmul rate))")
    axes[1].legend(fontsize=7)
    fr = [r for r in results["decode"] if r.get("vs_full_over_n")]
    for H in heads:
        for T in sorted({r["T"] for r in fr}):
            rs = sorted([r for r in fr if r["H"] == H and r["T"] == T], key=lambda r: r["frac"])
            if rs:
                axes[2].plot([1 / r["frac"] for r in rs], [r["vs_full_over_n"] for r in rs], "o-",
                             label=f"T={T} H={H}")
    axes[2].axhline(1.3, color="gray", ls=":")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("N (1/N of rows valid)")
    axes[2].set_ylabel("time / (full time / N)")
    axes[2].set_title("work proportional to count (target ≤ 1.3)")
    axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# --------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(pathlib.Path(__file__).resolve().parent / "out"))
    ap.add_argument("--focus", action="store_true",
                    help="only the ceilings and the variant comparison (FOCUS_VARIANTS) on the H >= 32 shapes")
    ap.add_argument("--profile-one", metavar="SPEC", help="launch one variant 3x and exit (for ncu); "
                    "SPEC = 'T,H,block_h,BLOCK_N,warps,stages'")
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch references")
    ap.add_argument("--recorded", metavar="FILE", help="only the ceilings and the dcp op calls recorded in FILE "
                    "(bench_e2e.py --record FILE; record_op_calls.py)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    if args.profile_one:
        profile_one(args.profile_one)
        return
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    import triton
    props = torch.cuda.get_device_properties(0)
    info = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), device=props.name, sms=props.multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, quick=args.quick, argv=sys.argv)
    print(info, flush=True)
    results = dict(info=info, decode=[], prefill=[], indexer=[], merge_partials=[], sweep=[], recorded=[],
                   errors=[])

    bw, rate = measure_ceilings()
    results["ceilings"] = dict(copy_GBps=bw / 1e9, bf16_matmul_TFLOPs=rate / 1e12)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)

    if args.recorded:
        results["recorded"] = bench_recorded(args.recorded, bw, rate)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print_recorded_summary(results["recorded"], props.name, bw, rate)
        return

    pool = torch.randn(128 * 1024, DK, device="cuda", dtype=torch.bfloat16)
    with_ref = not args.no_ref
    if args.quick:
        batches, heads, fracs, contexts = [1, 64], [16, 128], [1.0, 0.125], [8192]
        pre_T = 1024
    else:
        batches, heads, fracs, contexts = [1, 8, 64, 128], [16, 32, 64, 128], [1.0, 0.5, 0.25, 0.125], \
            [8192, 65536, 131072]
        pre_T = 4096

    def section(name, fn):
        t0 = time.time()
        try:
            results[name] += fn()
        except Exception:
            tb = traceback.format_exc()
            print(f"!! {name} failed:\n{tb}", flush=True)
            results["errors"].append(dict(section=name, tb=tb))
        print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))

    if args.focus:
        section("sweep", lambda: bench_focus(pool, bw, rate, pre_T=pre_T))
    else:
        section("decode", lambda: bench_decode(pool, batches, heads, fracs, bw, rate, with_ref=with_ref))
        section("prefill", lambda: bench_prefill(pool, bw, rate, T=pre_T, with_ref=with_ref))
    if not args.focus:
        section("indexer", lambda: bench_indexer(contexts, bw, rate))
        section("merge_partials", lambda: bench_merge(bw, [(8, 64, 128), (8, 128, 128), (4, 1, 128)]))

    try:
        results["autotune"] = {"indexer": {str(k): str(v) for k, v in ixm.indexer_scores_tuned.cache.items()}}
    except Exception as exc:
        results["autotune"] = repr(exc)

    results["compiled"] = compiled_info([smk.sparse_mla_fwd_kernel, ixk.indexer_scores_kernel,
                                         mpk.merge_partials_kernel])
    for c in results["compiled"]:
        print("compiled:", c)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out_dir / "bench.png")

    # ---- summary table (last, so it is at the end of the output)
    print("\n==== summary ====")
    print(f"{props.name}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    for r in results["decode"] + results["prefill"]:
        print(fmt_row(r))
    for r in results["sweep"]:   # compact: variant, shape, time, % of floor
        print(f"{r.get('variant', '-'):38s} {r['kind'][:3]} T={r['T']:<4d} H={r['H']:<3d} f={r['frac']:<5.3g} "
              f"bh={r['block_h']} sp={r['nsplit']:<2d} {r['us']:9.1f} us "
              f"{r['TFLOPs']:6.1f} TF/s {r['pct_floor']:5.1f}%")
    for r in results["indexer"]:
        print(f"indexer L={r['L']:6d} B={r['B']} | {r['us']:8.1f} us {r['pct_floor']:5.1f}% of floor | "
              f"torch {r['torch_us']:8.1f} us ({r['x_torch']:.1f}x)")
    for r in results["merge_partials"]:
        print(f"merge_partials N={r['N']} T={r['T']} H={r['H']} | {r['us']:7.1f} us {r['pct_floor']:5.1f}% | "
              f"torch {r['torch_us']:7.1f} us ({r['x_torch']:.1f}x)")
    if results.get("autotune"):
        print("autotune:", json.dumps(results["autotune"], indent=0))
    if results["errors"]:
        print(f"ERRORS in: {[e['section'] for e in results['errors']]}")
        sys.exit(1)


def print_recorded_summary(rows, device_name, bw, rate):
    print(f"\n==== recorded dcp op calls: {device_name}, copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s ====")
    print("| phase | calls | op | µs per call | µs per phase | floor µs | % of floor | bound | arguments |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['count']} | {r['op']} | {r['us']:.1f} | {r['us_per_phase']:.1f} | "
              f"{r['floor_us']:.1f} | {r['pct_floor']:.0f} % | {r['bound']} | {r['args']} |")
    for phase in sorted({r['phase'] for r in rows}, key=str):
        total = sum(r['us_per_phase'] for r in rows if r['phase'] == phase)
        floor = sum(r['floor_us'] * r['count'] for r in rows if r['phase'] == phase)
        print(f"{phase}: dcp ops {total:.1f} µs per {phase} forward (floor {floor:.1f} µs, {100 * floor / total:.0f} %)")


if __name__ == "__main__":
    main()
