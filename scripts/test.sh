#!/usr/bin/env bash
# README's test command: set up .venv (and Open MPI for the mpirun launcher test), then run
# the whole suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_mpi.sh || echo "scripts/setup_mpi.sh failed: the mpirun launcher test will be skipped" >&2
exec .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider --durations=15 tests "$@"
