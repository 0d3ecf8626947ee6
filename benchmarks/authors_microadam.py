"""The authors' MicroAdam (PyPI `ista-daslab-optimizers` + `ista-daslab-optimizers-cuda`), for parity rows.

    python benchmarks/authors_microadam.py SRC     # build its two CUDA extensions ahead (GPU machine)

`load(src)` returns the authors' `MicroAdam` class, or raises `Unavailable` saying why. It
takes the package as pip installed it, or from SRC, a folder holding the unpacked wheel
(`ista_daslab_optimizers/`) and the unpacked CUDA sdist (`kernels/`): the sdist ships sources
only, and of its five extensions MicroAdam needs two, which are built here just in time
(cached in TORCH_EXTENSIONS_DIR). The package's `__init__` imports every optimizer it has
(and their extensions); only `micro_adam` and `tools` are imported here. It imports wandb and
gpustat only to log every `log_interval` steps: where they are missing, empty stand-ins take
their place, and `make` sets the interval past any run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

PACKAGE = "ista_daslab_optimizers"
# The extensions MicroAdam calls, and their sources in the CUDA sdist.
EXTENSIONS = {
    "ista_daslab_cuda_tools": ["kernels/tools/tools.cpp", "kernels/tools/tools_kernel.cu"],
    "ista_daslab_cuda_micro_adam": ["kernels/micro_adam/micro_adam.cpp", "kernels/micro_adam/micro_adam_update.cu",
                                    "kernels/micro_adam/micro_adam_asymm_block_quant.cu",
                                    "kernels/micro_adam/micro_adam_asymm_block_quant_inv.cu"],
}


class Unavailable(RuntimeError):
    """The authors' MicroAdam cannot run here; the message says why."""


@contextlib.contextmanager
def stand_ins(*names: str):
    """Empty modules `names` where none is installed, for the import of the package only.

    The package binds them at import time; taking them out of sys.modules afterwards keeps
    them from other libraries' probes (accelerate's `find_spec("wandb")`, reached when
    transformers is imported later in the same process, raises on a module without a spec)."""
    added = []
    for name in names:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            module.log = lambda *a, **k: None
            module.new_query = lambda *a, **k: types.SimpleNamespace(gpus=[])
            sys.modules[name] = module
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def build_extensions(src: str | None) -> None:
    """Import the two extensions, building them from src/kernels where they are not installed."""
    import torch
    if not torch.cuda.is_available():
        raise Unavailable("needs a CUDA device (the package has CUDA kernels only)")
    for name, sources in EXTENSIONS.items():
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            continue
        except ImportError as exc:
            missing = exc
        if not src or not all(os.path.isfile(os.path.join(src, s)) for s in sources):
            raise Unavailable(f"{name} is not installed ({missing}) and no sdist sources under {src!r} "
                              "(pass the folder holding the unpacked ista-daslab-optimizers-cuda)")
        from torch.utils.cpp_extension import load as jit_load
        try:
            sys.modules[name] = jit_load(name, [os.path.join(src, s) for s in sources], extra_cflags=["-O3"])
        except Exception as exc:  # compiler errors arrive as RuntimeError/OSError/...
            raise Unavailable(f"building {name} failed: {str(exc).strip().splitlines()[-1:]}") from exc


_failed: list[str] = []  # why load() failed once: a later call fails at once (no second build)


def load(src: str | None = None):
    """The authors' MicroAdam class (see the module docstring)."""
    if _failed:
        raise Unavailable(_failed[0])
    try:
        return _load(src)
    except Unavailable as exc:
        _failed.append(str(exc))
        raise


def _load(src: str | None):
    build_extensions(src)
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE) if not src else None
        where = list(spec.submodule_search_locations) if spec else [os.path.join(src or "", PACKAGE)]
        if not os.path.isfile(os.path.join(where[0], "micro_adam", "micro_adam.py")):
            raise Unavailable(f"{PACKAGE} is neither installed nor unpacked under {src!r}")
        package = types.ModuleType(PACKAGE)  # without its __init__: see the module docstring
        package.__path__ = where
        sys.modules[PACKAGE] = package
    try:
        with stand_ins("wandb", "gpustat"):
            return importlib.import_module(f"{PACKAGE}.micro_adam.micro_adam").MicroAdam
    except ImportError as exc:
        raise Unavailable(f"importing its micro_adam module failed: {exc}") from exc


def make(cls, groups: list, *, lr: float, m: int, density: float, quant_block: int, alpha: float = 0.0,
         weight_decay: float = 0.0):
    """An instance on param groups of bf16 CUDA params, with logging switched off."""
    opt = cls(groups, m=m, lr=lr, quant_block_size=quant_block, k_init=density, alpha=alpha,
              betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
    opt.log_interval = 1 << 62  # its log computes norms and calls wandb every log_interval steps
    return opt


if __name__ == "__main__":
    build_extensions(sys.argv[1] if len(sys.argv) > 1 else None)
    print("built:", ", ".join(EXTENSIONS))
