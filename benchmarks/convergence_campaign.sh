#!/usr/bin/env bash
# The convergence campaign (benchmarks/convergence_campaign.py) on one GPU within DEADLINE
# seconds (default 470) of its start: our kernels and the authors' two MicroAdam extensions
# build beside it while it pre-trains; its fine-tuning workers (--workers, default
# min(8, CPUs)) share the GPU, and a run that needs a build waits for it. The authors'
# package travels in .whl/ (git-ignored):
#   python3 -m pip download --no-deps -d .whl ista-daslab-optimizers==1.1.15 ista-daslab-optimizers-cuda==1.1.0
# (a pure-Python wheel and the CUDA sdist); without them its rows say why they did not run.
# Usage (repository root): OUT=dir DEADLINE=540 bash benchmarks/convergence_campaign.sh [campaign arguments]
# Writes under $OUT: campaign.json, campaign.md, campaign_regimes.png, campaign_dial.png
# (campaign_TAG.* given --tag TAG), campaign.log, build_ours.log, build_authors.log.
set -o pipefail
OUT=${OUT:-/tmp/convergence_campaign}; mkdir -p "$OUT"
# The package from this checkout (a bare GPU machine has it installed nowhere).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-8}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
start=$(date +%s)
SRC=/tmp/ista_src
rm -rf "$SRC" && mkdir -p "$SRC"
builds=""
wheel=$(ls .whl/ista_daslab_optimizers-*.whl 2>/dev/null | head -1)
sdist=$(ls .whl/ista_daslab_optimizers_cuda-*.tar.gz 2>/dev/null | head -1)
if [ -n "$wheel" ] && [ -n "$sdist" ]; then
  python3 -m zipfile -e "$wheel" "$SRC" && tar xzf "$sdist" -C "$SRC" --strip-components=1
  python3 benchmarks/authors_microadam.py "$SRC" > "$OUT/build_authors.log" 2>&1 &
  builds="$builds $!"
else
  echo "no authors' wheel and sdist under .whl/: their rows are skipped" | tee "$OUT/build_authors.log"
fi
python3 -m microadam_dist.env > "$OUT/build_ours.log" 2>&1 &
builds="$builds $!"
# The deadline counts from the campaign's start; the runs in flight and the tables follow it.
python3 benchmarks/convergence_campaign.py --out "$OUT" --ista-src "$SRC" --deadline-s "${DEADLINE:-470}" \
  --no-progress "$@" 2>&1 | tee "$OUT/campaign.log"
status=$?
for pid in $builds; do  # a build still going now serves no run
  kill "$pid" 2>/dev/null && echo "build (pid $pid) still running after the campaign: stopped"
done
wait
tail -n 1 "$OUT"/build_*.log
echo "total: $(( $(date +%s) - start )) s"
exit $status
