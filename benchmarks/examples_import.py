"""Import a module of examples/ (e.g. `common`: the tiny Llama, the byte tokenizer, the corpora)
from a benchmark, by its file path: the package itself comes installed (scripts/setup_env.sh,
or `pip install -e .`), and no search path is changed."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def examples_module(name: str) -> types.ModuleType:
    """examples/<name>.py as module `name` (loaded once; the same object on later calls)."""
    path = os.path.join(EXAMPLES, f"{name}.py")
    mod = sys.modules.get(name)
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "") or "") == path:
        return mod
    if not os.path.isfile(path):
        raise FileNotFoundError(f"examples_module({name!r}): {path} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # before exec: dataclasses and pickling look the module up by name
    spec.loader.exec_module(mod)
    return mod
