# Repro attempt (session 6): chunked prefill through torch.compile(model.forward) on one GPU, tiny model; it passed
# (the failure needs bench_e2e's dims, benchmarks/NOTES.md). Run: python3 scripts/diag/compiled_prefill_cuda.py
import os
import torch
import torch.distributed as dist
import dcp_compile
from dcp_compile.testing import tiny_deepseek_v32
from torch.distributed.device_mesh import init_device_mesh

os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
model = tiny_deepseek_v32(seed=0, dtype=torch.bfloat16).cuda()
dcp_compile.apply(model, init_device_mesh("cuda", (1,)), page_size=4)
eager = model.forward
model.forward = torch.compile(eager, backend="inductor")
gen = torch.Generator().manual_seed(0)

def prefill(batch, context, chunk):
    cache = model.dcp.new_cache(batch, context + 8)
    for s in range(0, context, chunk):
        e = min(context, s + chunk)
        ids = torch.randint(1, 100, (batch, e - s), generator=gen).cuda()
        pos = torch.arange(s, e, device="cuda").expand(batch, -1)
        with torch.no_grad():
            model(input_ids=ids, cache=cache, position_ids=pos, use_cache=True, logits_to_keep=1)
        print("chunk", s, e, flush=True)

prefill(2, 32, 16)   # first use: static, then dynamic
prefill(2, 96, 16)   # a new cache: recompile
prefill(2, 96, 16)
print("OK")
