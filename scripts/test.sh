#!/usr/bin/env bash
# README's test command: set up .venv, then run the whole suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider --durations=15 tests "$@"
