"""Finds or builds the CUDA extension of csrc/: prebuilt (pip install), else just in time.

The builder owns sources, compiler flags and the loading order; ops/cuda.py only asks
`load()` for a module. Order:

1. `microadam_dist._cuda_ext`, compiled ahead of time by setup.py;
2. a just-in-time build with ninja through `torch.utils.cpp_extension.load`, cached in
   `TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), so only the first
   CUDA step of a machine pays the compile (about a minute);
3. otherwise `load()` raises `ExtensionUnavailable` whose message says why.

Environment: `MICROADAM_JIT=0` forbids the just-in-time build; `MICROADAM_CSRC` points
to another csrc folder; `MICROADAM_VERBOSE_BUILD=1` shows the compiler output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch

from .build_flags import CXX_FLAGS, HEADERS, NVCC_FLAGS, SOURCES

EXT_NAME = "microadam_dist_cuda"


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension can be neither imported nor built; the message says why."""


_lock = threading.Lock()
_cache: dict[str, object] = {}


def source_dir() -> Path | None:
    """csrc/ of this checkout, or the copy installed as package data, or $MICROADAM_CSRC."""
    candidates = []
    if os.environ.get("MICROADAM_CSRC"):
        candidates.append(Path(os.environ["MICROADAM_CSRC"]))
    here = Path(__file__).resolve().parent.parent  # microadam_dist/
    candidates += [here / "_csrc", here.parent / "csrc"]
    for c in candidates:
        if all((c / s).is_file() for s in SOURCES + HEADERS):
            return c
    return None


def _jit_problem() -> str | None:
    """Why a just-in-time build cannot work here, or None."""
    if os.environ.get("MICROADAM_JIT", "1") == "0":
        return "MICROADAM_JIT=0 forbids the just-in-time build"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    if source_dir() is None:
        return "the kernel sources (csrc/) are not found; set MICROADAM_CSRC"
    return None


def _import_prebuilt():
    from .. import _cuda_ext  # type: ignore[attr-defined]
    return _cuda_ext


def _sources_digest(src: Path) -> str:
    """Hash of every source and header: a changed header gets a fresh build, not a stale cache."""
    h = hashlib.sha1()
    for name in SOURCES + HEADERS:
        h.update((src / name).read_bytes())
    return h.hexdigest()[:10]


def _jit_build(verbose: bool):
    from torch.utils import cpp_extension
    src = source_dir()
    return cpp_extension.load(
        name=f"{EXT_NAME}_{_sources_digest(src)}",
        sources=[str(src / s) for s in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        verbose=verbose,
    )


def load(verbose: bool | None = None):
    """The extension module (cached). Raises ExtensionUnavailable with the reason."""
    with _lock:
        if "module" in _cache:
            return _cache["module"]
        if "error" in _cache:
            raise ExtensionUnavailable(_cache["error"])
        if verbose is None:
            verbose = os.environ.get("MICROADAM_VERBOSE_BUILD", "0") == "1"
        try:
            module = _import_prebuilt()
            _cache["how"] = "prebuilt extension microadam_dist._cuda_ext (pip install)"
        except ImportError as exc:
            prebuilt = f"no prebuilt extension ({exc})"
            problem = _jit_problem()
            if problem is not None:
                _cache["error"] = f"{prebuilt}; just-in-time build impossible: {problem}"
                raise ExtensionUnavailable(_cache["error"]) from None
            try:
                module = _jit_build(verbose)
            except Exception as build_exc:  # compiler errors arrive as RuntimeError/OSError/...
                first = str(build_exc).strip().splitlines()
                _cache["error"] = (f"{prebuilt}; the just-in-time build failed: "
                                   f"{first[-1] if first else type(build_exc).__name__} "
                                   "(MICROADAM_VERBOSE_BUILD=1 shows the compiler output)")
                raise ExtensionUnavailable(_cache["error"]) from build_exc
            _cache["how"] = f"just-in-time build {EXT_NAME} from {source_dir()}"
        _cache["module"] = module
        return module


def how_loaded() -> str | None:
    """How `load()` obtained the module, once it has."""
    return _cache.get("how")  # type: ignore[return-value]


def reset() -> None:
    """Forget a cached module or failure (tests, or after installing a toolchain)."""
    with _lock:
        _cache.clear()
