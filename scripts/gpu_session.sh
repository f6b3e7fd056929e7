#!/usr/bin/env bash
# One device call (one GPU is enough): install (carry .whl, the pinned transformers wheel), the CUDA tests
# (kernels, op lowering, CUDA graphs, FP8), the demo with CUDA graphs on NCCL, and the top-k kernel benchmark.
# Each part is bounded so that the call ends inside 10 minutes; logs go to $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
t() { local s=$1; shift; echo "== $*"; timeout "$s" "$@" 2>&1 | grep -v -i "warn" | tail -n "${TAIL:-25}"; }
{
  TAIL=40 t 240 python3 -m pytest -q -x -rs tests/test_cuda_graphs.py tests/test_triton_topk.py tests/test_op_lowering.py
  t 150 python3 -m pytest -q -rs tests/test_triton_kernels.py tests/test_ops.py
  TAIL=30 t 120 python3 -m pytest -q -s -rs tests/test_fp8.py -k cuda
  TAIL=12 t 150 torchrun --nproc-per-node "$ngpu" examples/generate.py --cudagraphs --max-new-tokens 64
  TAIL=30 t 120 python3 benchmarks/bench_local_topk.py
} 2>&1 | tee "$OUT/session.log"
