#!/usr/bin/env bash
# Open MPI (Debian's packages) and mpi4py in .venv, for tests/test_launch.py::test_mpirun_sh
# (launch/mpirun.sh, DeepSpeed's MPI rank discovery). Installs only what is missing; needs
# root and apt-get for Open MPI, and says so (exit 1) where it cannot install it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v mpirun > /dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    echo "setup_mpi: no mpirun, and apt-get as root is unavailable to install Open MPI" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q openmpi-bin libopenmpi-dev > /dev/null 2>&1 \
    || { apt-get update -q > /dev/null && apt-get install -y -q openmpi-bin libopenmpi-dev > /dev/null; }
fi
.venv/bin/python -c "import mpi4py" 2> /dev/null \
  || .venv/bin/python -m pip install -q --disable-pip-version-check mpi4py
