#!/usr/bin/env bash
# One device call: the end-to-end decode benchmark (benchmarks/bench_e2e.py) on every GPU of the machine, with
# the dcp op calls of one prefill chunk and one decode step recorded, then those calls timed against their
# floor (bench_kernels.py --recorded). Carry .whl (the pinned transformers wheel). Arguments go to bench_e2e.py;
# E2E_TIMEOUT (seconds, default 420) bounds it, so the recorded-kernel pass still runs inside a 10-minute call.
#   bash scripts/gpu_bench_e2e.sh --modes dcp hf --compile eager inductor cudagraphs --batch 1 8 --context 8192 32768
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_bench_e2e}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl
export PYTHONPATH=/tmp/site
python3 -c "import transformers" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --target /tmp/site .whl/huggingface_hub-*.whl .whl/tokenizers-*.whl .whl/safetensors-*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout "${E2E_TIMEOUT:-420}" torchrun --standalone --nproc-per-node "$ngpu" benchmarks/bench_e2e.py --out "$OUT" \
  --profile --record "$OUT/calls.pt" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/e2e.log" | tail -n 60
if [ -f "$OUT/calls.pt" ]; then
  timeout 150 python3 benchmarks/bench_kernels.py --recorded "$OUT/calls.pt" --out "$OUT/kernels" 2>&1 | tee "$OUT/recorded.log" \
    | sed -n '/==== recorded/,$p'
fi
