#!/usr/bin/env bash
# DeepSpeed launcher: runs an unmodified training script with MicroAdam registered.
#
#   launch/deepspeed.sh train.py --deepspeed ds.json [script args...]
#
# Environment (all optional):
#   HOSTFILE     MPI-style hostfile ("host slots=N" per line, see launch/hostfile.example)
#                for several nodes; the launcher reaches them by pdsh (or LAUNCHER=openmpi)
#   NUM_GPUS     processes per node (single node; default: all visible accelerators)
#   NUM_NODES    number of hostfile nodes to use (default: all)
#   MASTER_ADDR, MASTER_PORT   rendezvous (default: first host, 29500)
#   LAUNCHER     multi-node transport: pdsh (default), openmpi, mpich, slurm, ...
# See docs/launch.md.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 SCRIPT.py [ARGS...]   (env: HOSTFILE NUM_GPUS NUM_NODES MASTER_ADDR MASTER_PORT LAUNCHER)" >&2
  exit 2
fi
args=()
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && args+=(--master_port "$MASTER_PORT")
[[ -n "${LAUNCHER:-}" ]] && args+=(--launcher "$LAUNCHER")
exec ${DEEPSPEED:-deepspeed} "${args[@]}" --module microadam_dist.run "$@"
