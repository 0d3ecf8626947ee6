#!/usr/bin/env bash
# torchrun launcher: runs an unmodified training script with MicroAdam registered.
#
#   launch/torchrun.sh train.py --deepspeed ds.json [script args...]
#
# Environment (all optional):
#   NPROC        processes per node (default: number of visible GPUs, else 1)
#   NNODES       nodes (default 1: single node, free rendezvous port picked by torchrun)
#   NODE_RANK    this node's rank (multi-node; default 0)
#   MASTER_ADDR  rendezvous host (multi-node; default localhost)
#   MASTER_PORT  rendezvous port (multi-node; default 29500)
#   TORCHRUN     torchrun command (default: torchrun)
# See docs/launch.md.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 SCRIPT.py [ARGS...]   (env: NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv-backend c10d
        --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}")
fi
exec ${TORCHRUN:-torchrun} "${rdzv[@]}" --nproc_per_node "$NPROC" -m microadam_dist.run "$@"
