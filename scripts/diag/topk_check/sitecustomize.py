"""Diagnostic (not imported by the library): put this folder on PYTHONPATH and every eager ``dcp::local_topk``
call on CUDA is checked against the stable sort (the same set of columns, every column in range); on a
mismatch the scores are saved to $OUT/local_topk_bad_<pid>.pt with the row diagnostics printed, then it
raises. Calls made while a CUDA graph captures are not checked (no sync there)."""
import os


def _install():
    import torch

    from dcp_compile.ops.distributed import local_topk_padded
    from dcp_compile.ops.triton import local_topk as ltk

    kernel = ltk.local_topk

    def checked(scores, k, **kw):
        values, idx = kernel(scores, k, **kw)
        if not scores.is_cuda or torch.cuda.is_current_stream_capturing():
            return values, idx
        T, L = scores.shape
        _, want = local_topk_padded(scores.float(), k)
        in_range = bool(((idx >= 0) & (idx < L + k)).all())
        same = bool(torch.equal(idx.sort(-1).values, want.sort(-1).values))
        if not (in_range and same):
            path = os.path.join(os.environ.get("OUT", "/tmp"), f"local_topk_bad_{os.getpid()}.pt")
            torch.save(dict(scores=scores.cpu(), k=k, kw=kw, idx=idx.cpu(), want=want.cpu()), path)
            bad = (idx.sort(-1).values != want.sort(-1).values).any(-1).nonzero().flatten().tolist()
            x = scores.float()
            print(f"local_topk MISMATCH T={T} L={L} k={k} kw={kw} scheme={ltk.choose_scheme(T, L)}: "
                  f"{len(bad)} rows wrong, first {bad[:8]}; saved {path}", flush=True)
            for t in bad[:4]:
                row = x[t]
                print(f"  row {t}: finite {int(torch.isfinite(row).sum())}, nan {int(torch.isnan(row).sum())}, "
                      f"-inf {int(torch.isneginf(row).sum())}, zeros {int((row == 0).sum())}, "
                      f"min {row[torch.isfinite(row)].min().item() if torch.isfinite(row).any() else None}, "
                      f"max {row[torch.isfinite(row)].max().item() if torch.isfinite(row).any() else None}, "
                      f"out of range idx {int(((idx[t] < 0) | (idx[t] >= L + k)).sum())}", flush=True)
            raise RuntimeError(f"local_topk mismatch, scores saved to {path}")
        return values, idx

    ltk.local_topk = checked


try:
    _install()
except Exception as e:  # noqa: BLE001 — a diagnostic must not stop the program it watches from starting
    print(f"topk_check sitecustomize not installed: {e!r}")
