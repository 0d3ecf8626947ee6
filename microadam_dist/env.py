"""`python -m microadam_dist.env`: which MicroAdam backend runs here, and why.

Prints torch and CUDA facts, whether the prebuilt extension is importable, whether a
just-in-time build is possible, and the backend `backend="auto"` resolves to for
tensors on the first CUDA device (building the extension if needed, unless --no-build).
Exit status 0 in every case: a missing GPU is a fact, not an error.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys

import torch

from .ops import builder


def report(build: bool = True) -> list[tuple[str, str]]:
    """(label, value) lines describing the backend choice."""
    lines = [("python", sys.version.split()[0]), ("torch", torch.__version__),
             ("torch CUDA", str(torch.version.cuda)),
             ("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch without cpp_extension
        CUDA_HOME = None
    lines.append(("CUDA_HOME (nvcc)", str(CUDA_HOME)))
    lines.append(("ninja", shutil.which("ninja") or ("python package" if importlib.util.find_spec("ninja") else "missing")))
    prebuilt = importlib.util.find_spec("microadam_dist._cuda_ext") is not None
    lines.append(("prebuilt extension", "present" if prebuilt else "absent"))
    src = builder.source_dir()
    lines.append(("kernel sources", str(src) if src else "not found"))
    problem = builder._jit_problem()
    lines.append(("just-in-time build", "possible" if problem is None else f"impossible: {problem}"))
    for var in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "MICROADAM_JIT", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(var):
            lines.append((var, os.environ[var]))
    if not torch.cuda.is_available():
        lines.append(("backend (auto)", "reference: no CUDA device, so params live on the CPU"))
    elif not build and not prebuilt:
        lines.append(("backend (auto)", "not resolved (--no-build): the first CUDA step builds the kernels"))
    else:
        try:
            builder.load()
            lines.append(("backend (auto)", f"cuda: {builder.how_loaded()}"))
        except builder.ExtensionUnavailable as exc:
            lines.append(("backend (auto)", f"reference, with a warning: {exc}"))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microadam_dist.env", description=__doc__.splitlines()[0])
    ap.add_argument("--no-build", action="store_true", help="do not build the extension just in time")
    args = ap.parse_args(argv)
    lines = report(build=not args.no_build)
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
