#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool), from the repo root, with the transformers wheel carried
# in .whl/ (see README): the project installed editable (as everywhere: tests and benchmarks import the
# installed package, ops/ mapped in as dcp_compile.ops by pyproject.toml), CUDA op/kernel tests, then the
# demo on NCCL (fp32, bf16, compiled, dcp_size=1).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
. scripts/gpu_env.sh
python3 -c "import torch, triton, transformers, dcp_compile; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())" || exit 1
python3 -m pytest tests/test_triton_kernels.py tests/test_ops.py -q 2>&1 | tail -n 5 | tee "$OUT/tests.log"
run() { echo "== torchrun --nproc-per-node $ngpu examples/generate.py $*"; timeout 300 torchrun --nproc-per-node "$ngpu" examples/generate.py "$@" 2>&1 | grep -v -i warn | tail -n 9; }
{ run; run --dtype bfloat16; run --dcp-size 1; run --compile; } 2>&1 | tee "$OUT/demo.log"
