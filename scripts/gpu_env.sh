# Sourced by the GPU scripts (scripts/gpu_*.sh), from the repo root on a lent GPU machine with the pinned
# transformers wheel carried in .whl/: NCCL without NVLink multicast, unbuffered Python, the wheel and the
# project installed (nothing can be fetched there: no index, no build isolation), $OUT made, $ngpu set.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/transformers-*.whl
export PYTHONPATH=/tmp/site
python3 -c "import transformers" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --target /tmp/site .whl/huggingface_hub-*.whl .whl/tokenizers-*.whl .whl/safetensors-*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
