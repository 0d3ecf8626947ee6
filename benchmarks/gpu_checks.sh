#!/usr/bin/env bash
# The checks of one GPU machine: the ahead-of-time build (pip install), the just-in-time build,
# the GPU tests and the step benchmark, results under $OUT.
# Usage: OUT=/some/dir bash benchmarks/gpu_checks.sh [all | a comma list of tests,bench,ncu,sanitize] [pytest -k expr]
set -o pipefail
OUT=${OUT:-/tmp/microadam_gpu}; mkdir -p "$OUT"
# The image's TORCH_CUDA_ARCH_LIST (9.0a) is kept on purpose: our build must accept it.
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# The benchmarks import the package; on a machine where it is not installed, this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
what=${1:-all}; kexpr=${2:-}
want() { [ "$what" = all ] || [[ ",$what," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
start=$(date +%s)
# Ahead of time: pip install builds microadam_dist._cuda_ext (in the background), and
# just in time: the env report builds the same sources with ninja.
( MICROADAM_BUILD_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/aot . \
    > "$OUT/aot_build.log" 2>&1 && cd /tmp && PYTHONPATH=/tmp/aot python3 -m microadam_dist.env \
    >> "$OUT/aot_build.log" 2>&1; echo "aot exit $?" >> "$OUT/aot_build.log" ) &
python3 -m microadam_dist.env 2>&1 | tee "$OUT/env.log" || exit 1
echo "jit build+env: $(( $(date +%s) - start )) s"
wait
echo "aot build+env: $(( $(date +%s) - start )) s"; grep -E "backend|prebuilt|aot exit|rror" "$OUT/aot_build.log" | tail -5
if want tests; then
  python3 -m pytest -q -p no:cacheprovider --maxfail=8 -rs tests/test_cuda_kernels.py tests/test_cuda_float_ops.py tests/test_backend_fallback.py \
    ${kexpr:+-k "$kexpr"} 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^(FAILED|ERROR|SKIPPED|E  )|passed|failed" | head -40
  echo "tests done: $(( $(date +%s) - start )) s"
fi
if want bench; then
  python3 benchmarks/step_bench.py --out "$OUT/step_bench.json" 2>&1
  python3 benchmarks/step_bench.py --weight-decay 0.1 --rows \
    "bf16:adamw_fused,bf16:microadam_q64,bf16:microadam_q100000" --out "$OUT/step_bench_wd.json" 2>&1 | tail -6
  echo "bench done: $(( $(date +%s) - start )) s"
fi
if want ncu; then
  # Nsight Compute on one launch of the top-k kernel (one Llama layer), then its hot spots.
  timeout 240 ncu --kernel-name regex:compress_update --launch-skip 3 --launch-count 1 --import-source yes \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section SourceCounters -o /tmp/prof -f \
    python3 benchmarks/profile_step.py --quant-block 64 --layers 1 > /tmp/ncu_run.log 2>&1
  ncu -i /tmp/prof.ncu-rep > "$OUT/ncu_details.txt" 2>&1
  ncu -i /tmp/prof.ncu-rep --page source --csv --print-source sass > /tmp/sass.csv 2> "$OUT/ncu_src_err.txt"
  python3 benchmarks/ncu_top_lines.py /tmp/sass.csv --top 45 > "$OUT/ncu_top_lines.txt" 2>&1
  ncu -i /tmp/prof.ncu-rep --page source --csv --print-source cuda,sass > /tmp/src.csv 2>> "$OUT/ncu_src_err.txt"
  python3 benchmarks/ncu_cuda_lines.py /tmp/src.csv > "$OUT/ncu_cuda_lines.txt" 2>&1
  grep -E "Duration|Executed Instructions  |Eligible Warps|Achieved Occupancy|Warp Cycles Per Issued" "$OUT/ncu_details.txt"
  head -30 "$OUT/ncu_top_lines.txt"
  echo "ncu done: $(( $(date +%s) - start )) s"
fi
if [[ ",$what," == *",sanitize,"* ]]; then
  # compute-sanitizer over the GPU tests that reach every top-k and moments path (not in "all": slow).
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool $tool --print-limit 4 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_kernels.py \
      -k "ties or sparse or (block_shapes and nearest and 0.1 and (1001 or 40 or 8192))" 2>&1 | tee "$OUT/sanitize_$tool.log" \
      | grep -E "SUMMARY|passed|failed"
  done
  echo "sanitize done: $(( $(date +%s) - start )) s"
fi
