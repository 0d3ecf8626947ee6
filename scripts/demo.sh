#!/usr/bin/env bash
# README's demo command: set up .venv, then a 2-process CPU training, MicroAdam vs AdamW.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/torchrun --standalone --nproc_per_node 2 examples/ddp_compare.py --out runs/demo "$@"
