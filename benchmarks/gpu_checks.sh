#!/usr/bin/env bash
# Build the CUDA extension, run the GPU tests and the step benchmark on one GPU.
# Usage: OUT=/some/dir bash benchmarks/gpu_checks.sh [tests|bench|all] [pytest -k expr]
set -o pipefail
OUT=${OUT:-/tmp/microadam_gpu}; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
what=${1:-all}; kexpr=${2:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
python3 -m microadam_dist.env 2>&1 | tee "$OUT/env.log" || exit 1
echo "build+env: $(( $(date +%s) - start )) s"
if [ "$what" = all ] || [ "$what" = tests ]; then
  python3 -m pytest -q -p no:cacheprovider --maxfail=8 tests/test_cuda_kernels.py ${kexpr:+-k "$kexpr"} 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "^(FAILED|ERROR|E  )|passed|failed" | head -40
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  python3 benchmarks/step_bench.py --out "$OUT/step_bench.json" 2>&1 | tee "$OUT/step_bench.log"
fi
