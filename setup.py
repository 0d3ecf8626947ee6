"""Packaging for microadam_dist: pure Python plus optional CUDA kernels (csrc/).

The kernels are compiled ahead of time when the build can see a CUDA build of torch
and a CUDA toolkit, which means `pip install --no-build-isolation .` (an isolated build
has no torch, so it installs the pure-Python package, whose first CUDA step builds the
kernels just in time; see docs/install.md).

Environment switches (as flash-attention and DeepSpeed name theirs):
  MICROADAM_BUILD_CUDA=1   build the extension or fail loudly
  MICROADAM_BUILD_CUDA=0   never build it (pure Python; just in time later)
  (unset)                  build it when possible; a failed build degrades to pure Python
                           with one message instead of a stack trace
  TORCH_CUDA_ARCH_LIST     target architectures ("9.0", "9.0a", "8.0;9.0", ...), read by torch;
                           unset: the GPUs visible to the build, else torch's own list
  MAX_JOBS                 parallel compiler jobs (ninja)
"""

import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
# The same files and flags as the just-in-time build (ops/builder.py); read without importing torch.
_FLAGS = runpy.run_path(str(HERE / "microadam_dist" / "ops" / "build_flags.py"))
SOURCES = [f"csrc/{name}" for name in _FLAGS["SOURCES"]]
NVCC_FLAGS, CXX_FLAGS = _FLAGS["NVCC_FLAGS"], _FLAGS["CXX_FLAGS"]
MODE = os.environ.get("MICROADAM_BUILD_CUDA", "").strip()


def _say(msg: str) -> None:
    print(f"microadam_dist setup: {msg}", file=sys.stderr, flush=True)


def cuda_extension():
    """The CUDAExtension to build, or None (with the reason printed) where none can be."""
    if MODE not in ("", "0", "1"):
        raise SystemExit(f"MICROADAM_BUILD_CUDA={MODE!r}: expected 0, 1 or unset")
    if MODE == "0":
        _say("MICROADAM_BUILD_CUDA=0: no CUDA extension (the first CUDA step builds it just in time)")
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        why = "torch is not importable in the build environment (use pip install --no-build-isolation .)"
    else:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is built without CUDA"
        elif CUDA_HOME is None:
            why = "no CUDA toolkit (nvcc not on PATH and CUDA_HOME unset)"
        else:
            return CUDAExtension(
                name="microadam_dist._cuda_ext",
                sources=SOURCES,
                include_dirs=[str(CSRC)],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
    if MODE == "1":
        raise SystemExit(f"MICROADAM_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
    _say(f"building without the CUDA extension: {why}; the first CUDA step builds it just in time")
    return None


class BuildExt(build_ext):
    """torch's BuildExtension (ninja, MAX_JOBS, TORCH_CUDA_ARCH_LIST); unless forced, a
    compiler failure leaves a pure-Python install with one clear message."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler errors come as CompileError, RuntimeError, ...
            if MODE == "1":
                raise
            _say(f"the CUDA extension failed to build ({type(exc).__name__}: {str(exc).strip()[-300:]}); "
                 "installing without it: the first CUDA step retries just in time, and "
                 "`python -m microadam_dist.env` says which backend runs (docs/install.md)")
            self.extensions = []


class BuildPy(build_py):
    """Ships csrc/ inside the package (microadam_dist/_csrc) for the just-in-time build."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "microadam_dist" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in CSRC.iterdir():
            if f.suffix in (".cu", ".cuh", ".cpp", ".h"):
                shutil.copy2(f, dst / f.name)


ext = cuda_extension()
cmdclass = {"build_py": BuildPy}
if ext is not None:
    from torch.utils.cpp_extension import BuildExtension

    class TorchBuildExt(BuildExt, BuildExtension):
        pass

    cmdclass["build_ext"] = TorchBuildExt.with_options(use_ninja=True)

setup(
    name="microadam_dist",
    version="0.1.0",
    description="Sharded, fused MicroAdam optimizer for DeepSpeed ZeRO and PyTorch FSDP",
    packages=find_packages(include=["microadam_dist", "microadam_dist.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-timeout", "numpy", "matplotlib"],
        "examples": ["matplotlib", "tqdm", "transformers", "deepspeed"],
    },
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
)
