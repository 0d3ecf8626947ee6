#!/usr/bin/env bash
# Open MPI launcher: runs an unmodified training script with MicroAdam registered.
# Ranks come from MPI: deepspeed.init_distributed() sees no RANK/WORLD_SIZE in the
# environment and discovers them with mpi4py (rank 0's address, port 29500 or the
# script's distributed_port). Needs Open MPI and `pip install mpi4py`.
#
#   launch/mpirun.sh train.py --deepspeed ds.json [script args...]
#
# Environment (all optional):
#   NP          total processes (default: visible GPUs, else 1)
#   HOSTFILE    Open MPI hostfile for several nodes ("host slots=N" per line)
#   MPIRUN_ARGS extra mpirun options, e.g. "--allow-run-as-root --oversubscribe"
#   PYTHON      interpreter on every node (default: python)
# See docs/launch.md.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 SCRIPT.py [ARGS...]   (env: NP HOSTFILE MPIRUN_ARGS PYTHON)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
if [[ -z "${NP:-}" ]]; then
  NP=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
args=(-np "$NP" --bind-to none)
for var in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV; do
  [[ -n "${!var:-}" ]] && args+=(-x "$var")
done
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
# shellcheck disable=SC2206  # MPIRUN_ARGS is a list of options on purpose
extra=(${MPIRUN_ARGS:-})
exec ${MPIRUN:-mpirun} "${args[@]}" "${extra[@]}" "$PYTHON" -m microadam_dist.run "$@"
