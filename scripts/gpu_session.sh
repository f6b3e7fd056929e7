#!/usr/bin/env bash
# One device call (one GPU is enough): install (carry .whl, the pinned transformers wheel), the CUDA tests
# (kernels, op lowering, CUDA graphs, FP8), the demo with CUDA graphs on NCCL, and the top-k kernel benchmark.
# Each part is bounded so that the call ends inside 10 minutes; full logs go to $OUT/<part>.log, a summary to
# stdout.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
. scripts/gpu_env.sh
PYTEST="python3 -m pytest -q -rs -p no:logging --tb=short"
part() {  # part NAME SECONDS CMD...: full log to $OUT/NAME.log, its last lines here
  local name=$1 s=$2; shift 2; echo "== $name: $*"
  timeout "$s" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; grep -v -i "warn" "$OUT/$name.log" | tail -n "${TAIL:-15}"
}
PARTS=${PARTS:-"graphs topk lowering kernels fp8 demo bench_topk"}
for p in $PARTS; do case $p in
  graphs) TAIL=40 part graphs 150 $PYTEST -x tests/test_cuda_graphs.py ;;
  e2e) TAIL=45 part e2e 280 torchrun --standalone --nproc-per-node "$ngpu" benchmarks/bench_e2e.py --out "$OUT" \
         --modes dcp hf --compile eager inductor cudagraphs --batch 8 --context 32768 --layers 2 --profile ;;
  topk) TAIL=30 part topk 150 $PYTEST -x tests/test_triton_topk.py ;;
  lowering) TAIL=30 part lowering 150 $PYTEST tests/test_op_lowering.py ;;
  kernels) TAIL=6 part kernels 150 $PYTEST tests/test_triton_kernels.py tests/test_ops.py ;;
  fp8) TAIL=30 part fp8 120 $PYTEST -s tests/test_fp8.py -k cuda ;;
  demo) TAIL=14 part demo 90 torchrun --nproc-per-node "$ngpu" examples/generate.py --cudagraphs --max-new-tokens 64 ;;
  bench_topk) TAIL=30 part bench_topk 120 python3 benchmarks/bench_local_topk.py ;;
esac; done
