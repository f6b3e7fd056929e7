#!/usr/bin/env bash
# One device call: the end-to-end decode benchmark (benchmarks/bench_e2e.py) on every GPU of the machine, with
# the dcp op calls of one prefill chunk and one decode step recorded, then those calls timed against their
# floor (bench_kernels.py --recorded). Carry .whl (the pinned transformers wheel). Arguments go to bench_e2e.py;
# E2E_TIMEOUT (seconds, default 420) bounds it, so the recorded-kernel pass still runs inside a 10-minute call.
#   bash scripts/gpu_bench_e2e.sh --modes dcp hf --compile eager inductor cudagraphs --batch 1 8 --context 8192 32768
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench_e2e}
. scripts/gpu_env.sh
timeout "${E2E_TIMEOUT:-420}" torchrun --standalone --nproc-per-node "$ngpu" benchmarks/bench_e2e.py --out "$OUT" \
  --profile --record "$OUT/calls.pt" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/e2e.log" | tail -n 60
if [ -f "$OUT/calls.pt" ]; then
  timeout 150 python3 benchmarks/bench_kernels.py --recorded "$OUT/calls.pt" --out "$OUT/kernels" 2>&1 | tee "$OUT/recorded.log" \
    | sed -n '/==== recorded/,$p'
fi
