#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool), from the repo root, with the transformers wheel carried
# in .whl/ (see README): CUDA op/kernel tests, then the demo on NCCL (fp32, bf16, compiled, dcp_size=1).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl
export PYTHONPATH=/tmp/site
python3 -c "import transformers" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --target /tmp/site .whl/huggingface_hub-*.whl .whl/tokenizers-*.whl .whl/safetensors-*.whl
# The package without pip: dcp_compile/ with ops/ mapped in as dcp_compile.ops, as pyproject does.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r dcp_compile /tmp/pkg/ && cp -r ops /tmp/pkg/dcp_compile/ops
export PYTHONPATH=/tmp/pkg:/tmp/site
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
repo=$PWD  # pytest from outside the repo, so the installed-layout copy in /tmp/pkg is the dcp_compile imported
(cd /tmp && python3 -m pytest "$repo/tests/test_triton_kernels.py" "$repo/tests/test_ops.py" -q -p no:cacheprovider 2>&1 | tail -n 5) | tee "$OUT/tests.log"
run() { echo "== torchrun --nproc-per-node $ngpu examples/generate.py $*"; timeout 300 torchrun --nproc-per-node "$ngpu" examples/generate.py "$@" 2>&1 | grep -v -i warn | tail -n 9; }
{ run; run --dtype bfloat16; run --dcp-size 1; run --compile; } 2>&1 | tee "$OUT/demo.log"
