#!/usr/bin/env bash
# One device call: the CUDA tests and NCCL demo (gpu_check.sh), then the rank-agreement costs on NCCL and the
# indexer with the model's query dtype. Carry .whl (the pinned transformers wheel).
set -uo pipefail
export OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
bash scripts/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.log"
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout 120 torchrun --nproc-per-node "$ngpu" benchmarks/bench_rank_agreement.py --cuda 2>&1 | grep -v -i warn | tail -n 8 | tee "$OUT/agreement.log"
timeout 180 python3 benchmarks/bench_indexer_dtype.py --out "$OUT" 2>&1 | tail -n 8 | tee "$OUT/indexer.log"
