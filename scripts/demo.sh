#!/usr/bin/env bash
# README's demo command: set up .venv, then on 2 CPU processes a brief AdamW pre-training on the
# Python standard library, and from those weights a fine-tune on C++ headers through the DeepSpeed
# JSON ("type": "MicroAdam"), then its AdamW twin on the same data; prints the comparison and the
# plot's path. Extra arguments go to examples/finetune_deepspeed.py (e.g. --steps 400, --size small).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/torchrun --standalone --nproc_per_node 2 examples/finetune_deepspeed.py \
  --deepspeed_config examples/configs/ds_zero2_microadam.json \
  --compare examples/configs/ds_zero2_adamw.json \
  --pretrain-steps 500 --steps 250 --data cpp --out runs/demo "$@"
