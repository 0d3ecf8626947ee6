#!/usr/bin/env bash
# Where the fused step's time goes (one GPU): kernel variants side by side and a torch.profiler
# breakdown with the host time of step(). Nsight Compute: `bash benchmarks/gpu_checks.sh ncu`.
# Usage: OUT=/some/dir bash benchmarks/gpu_profile.sh "name:flags,..."
set -o pipefail
OUT=${OUT:-/tmp/microadam_prof}; mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
# The benchmarks import the package; on a machine where it is not installed, this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
variants=${1:-base:}
start=$(date +%s)
python3 -c "from microadam_dist.ops import builder; builder.load()" > "$OUT/jit.log" 2>&1 &
python3 benchmarks/kernel_variants.py --variants "$variants" --out "$OUT/variants.json" 2>&1 | tee "$OUT/variants.log"
wait
echo "variants: $(( $(date +%s) - start )) s"
python3 benchmarks/profile_step.py --quant-block 64 2>&1 | tee "$OUT/profile_q64.log" | head -30
python3 benchmarks/profile_step.py --quant-block 100000 > "$OUT/profile_q100000.log" 2>&1
echo "profile: $(( $(date +%s) - start )) s"
