#!/usr/bin/env bash
# Fetches what benchmarks/peers.py needs on the GPU machine into .whl/ (git-ignored), where a
# package registry is reachable: the GPU image (Python 3.12, torch 2.11 with CUDA 13) already
# holds numpy, triton, einops, timm, psutil, ninja, msgpack and py-cpuinfo; nothing can be
# fetched there. Everything that travels must stay under 64 MiB, so bitsandbytes keeps only
# its CUDA 13 and CPU libraries (the wheel carries one library per CUDA and ROCm version).
# Usage (repository root): bash benchmarks/peers_wheels.sh   (PYTHON: one with torch and wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
W=.whl
mkdir -p "$W"
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$W" \
  bitsandbytes==0.50.2 torchao==0.17.0 ista-daslab-optimizers==1.1.15 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0
# DeepSpeed is published as source only; its ops are built just in time on the GPU.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$W" deepspeed==0.19.8
# The authors' kernels are source only, compiled on the GPU (benchmarks/peers_gpu.sh). pip
# prepares an sdist's metadata even to download it, and their setup.py needs torch's
# CUDAExtension for that: a stand-in module answers it here.
shim=$(mktemp -d)
mkdir -p "$shim/torch/utils"
touch "$shim/torch/__init__.py" "$shim/torch/utils/__init__.py"
cat > "$shim/torch/utils/cpp_extension.py" <<'EOF'
from setuptools import Extension
from setuptools.command.build_ext import build_ext


class BuildExtension(build_ext):
    @classmethod
    def with_options(cls, **kwargs):
        return cls


def CUDAExtension(name, sources, **kwargs):
    return Extension(name, sources=list(sources))
EOF
PYTHONPATH=$shim "$PYTHON" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
  -d "$W" ista-daslab-optimizers-cuda==1.1.0
rm -rf "$shim"
"$PYTHON" - "$W"/bitsandbytes-0.50.2-*.whl <<'EOF'
import os, sys, zipfile
path = sys.argv[1]
keep = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
drop = lambda n: n.endswith(".so") and os.path.basename(n) not in keep
tmp = path + ".tmp"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if drop(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not drop(l.split(b",")[0].decode()))
        dst.writestr(info, data)
os.replace(tmp, path)
EOF
ls -l "$W"
du -ch "$W"/* | tail -1
