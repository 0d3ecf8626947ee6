"""DeepSpeed glue: `"optimizer": {"type": "MicroAdam", "params": {...}}` in the JSON.

`register()` (called by `import microadam_dist`) patches three DeepSpeed modules,
now if they are loaded, else through an import hook the moment they load, so that
importing this package never imports DeepSpeed:

- `deepspeed.runtime.config`: "microadam" joins DEEPSPEED_OPTIMIZERS (the type is
  matched case-insensitively), and the config check validates `optimizer.params`
  (unknown key or bad value -> ValueError naming the field, raised inside
  `deepspeed.initialize` before the engine exists: nothing is half-built).
- `deepspeed.runtime.zero.utils`: MicroAdam joins ZERO_SUPPORTED_OPTIMIZERS, so no
  `zero_allow_untested_optimizer` is needed.
- `deepspeed.runtime.engine`: the engine builds a `DeepSpeedMicroAdam` for the type;
  `save_checkpoint` writes `microadam_layout.json` beside the ZeRO files and
  `load_checkpoint` refuses, before it touches anything, a checkpoint whose
  partitioning differs from this run's (see `ds_partitions.py` and docs/deepspeed.md).

DeepSpeed keeps everything else: scheduler, clipping, gradient accumulation, loss
scaling and overflow skipping (a skipped step never calls our `step`).
"""

from __future__ import annotations

import importlib.abc
import json
import logging
import os
import sys
import weakref
from typing import Any, Callable

import torch

from ..config import MicroAdamConfig, normalize_kwargs
from ..optim import RESHARD_HINT, MicroAdam
from . import ds_partitions as partitions

TYPE_NAME = "microadam"
LAYOUT_FILE = "microadam_layout.json"
# MicroAdam's constructor options of step_in_backward (backward.py), none of which DeepSpeed can take.
IN_BACKWARD_OPTIONS = ("step_in_backward", "backward_bucket_mb", "max_grad_norm_per_tensor")
IN_BACKWARD_REFUSAL = ("step_in_backward is not supported under DeepSpeed: DeepSpeed owns the gradient "
                       "buffers and the step (ZeRO reduces and partitions gradients after backward, then "
                       "clips, scales and steps); remove the option, or train with FSDP2 or one device")
_log = logging.getLogger(__name__)


class DeepSpeedMicroAdam(MicroAdam):
    """MicroAdam as built by a DeepSpeed engine from its JSON.

    Same math and state as `MicroAdam`; its state dict also records how this rank's
    tensors map onto the model (`state_dict()["microadam"]["partition"]`, format in
    `ds_partitions.partition_metadata`), which the reshard tool consumes, and its
    `load_state_dict` refuses a state saved under another partitioning.
    """

    _engine_ref: Callable[[], Any] | None = None
    # True while DeepSpeed builds its wrapper around us: FP16_UnfusedOptimizer (stage 0 with
    # bf16/fp16) calls step() once with zero gradients only to allocate Adam's state. For
    # MicroAdam that would consume window row 1, apply weight decay and advance t, so the
    # call is a no-op; our state is allocated lazily by the first real step.
    _building = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._building:
            return None
        return super().step(closure)

    def _engine(self) -> Any:
        return self._engine_ref() if self._engine_ref is not None else None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        engine = self._engine()
        if engine is not None and getattr(engine, "optimizer", None) is not None:
            sd["microadam"]["partition"] = partitions.partition_metadata(engine)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("microadam") or {}).get("partition") if isinstance(state_dict, dict) else None
        engine = self._engine()
        if saved is not None and engine is not None:
            check_compatible(partitions.signature(saved), partitions.signature(partitions.partition_metadata(engine)))
        super().load_state_dict(state_dict)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str = "") -> None:
    """Raise ValueError naming both partitionings when a saved state cannot be loaded as is."""
    if partitions.compatible(saved, current):
        return
    src = f" ({where})" if where else ""
    raise ValueError(
        f"MicroAdam checkpoint{src} was saved with partitioning [{partitions.describe(saved)}] "
        f"but this run uses [{partitions.describe(current)}]; MicroAdam state is tied to the "
        f"partition layout, so it cannot be loaded as is; {RESHARD_HINT}")


def validate_params(params: Any) -> dict[str, Any]:
    """The JSON's `optimizer.params` -> MicroAdam keyword arguments, or ValueError naming the field."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"DeepSpeed config optimizer.params for type 'MicroAdam' must be an object, "
                         f"got {params!r}")
    for key in IN_BACKWARD_OPTIONS:
        if key in params:
            raise ValueError(f"DeepSpeed config optimizer.params.{key}={params[key]!r}: {IN_BACKWARD_REFUSAL}")
    try:
        kwargs = normalize_kwargs(params)
        MicroAdamConfig(**kwargs)
    except ValueError as exc:
        raise ValueError(f"DeepSpeed config optimizer.params (type 'MicroAdam'): {exc}") from None
    return kwargs


def _is_ours(name: Any) -> bool:
    return isinstance(name, str) and name.lower() == TYPE_NAME


# -- patches, one per DeepSpeed module -------------------------------------------------

def _patch_config(mod: Any) -> None:
    if TYPE_NAME not in mod.DEEPSPEED_OPTIMIZERS:
        # In place: engine.py imported this very list object by name.
        mod.DEEPSPEED_OPTIMIZERS.append(TYPE_NAME)
    cls = mod.DeepSpeedConfig
    orig = cls._do_sanity_check

    def _do_sanity_check(self):
        orig(self)
        if _is_ours(self.optimizer_name):
            validate_params(self.optimizer_params)
            if self.zero_enabled and getattr(self.zero_config, "elastic_checkpoint", False):
                raise ValueError(
                    "zero_optimization.elastic_checkpoint=true is not supported with MicroAdam: its "
                    "state is tied to the partition layout; set it to false and use "
                    "`python -m microadam_dist.checkpoint reshard` to change world size")

    cls._do_sanity_check = _do_sanity_check


def _patch_zero_utils(mod: Any) -> None:
    for cls in (MicroAdam, DeepSpeedMicroAdam):
        if cls not in mod.ZERO_SUPPORTED_OPTIMIZERS:
            mod.ZERO_SUPPORTED_OPTIMIZERS.append(cls)


def _patch_engine(mod: Any) -> None:
    cls = mod.DeepSpeedEngine
    orig_basic = cls._configure_basic_optimizer
    orig_configure = cls._configure_optimizer
    orig_save = cls.save_checkpoint
    orig_load = cls.load_checkpoint

    def _configure_basic_optimizer(self, model_parameters):
        if not _is_ours(self.optimizer_name()):
            return orig_basic(self, model_parameters)
        kwargs = validate_params(self.optimizer_params())
        if self.zero_use_cpu_optimizer() and kwargs.get("backend", "auto") == "auto":
            _log.warning("MicroAdam with ZeRO-Offload runs its step on the CPU with the reference "
                         "(pure PyTorch) backend; expect a slow step")
        opt = DeepSpeedMicroAdam(model_parameters, **kwargs)
        opt._engine_ref = weakref.ref(self)
        opt._building = True
        return opt

    def _configure_optimizer(self, client_optimizer, *args, **kwargs):
        _refuse_in_backward(client_optimizer)  # an optimizer instance
        try:
            out = orig_configure(self, client_optimizer, *args, **kwargs)
        finally:
            basic = getattr(self, "basic_optimizer", None)
            if isinstance(basic, DeepSpeedMicroAdam):
                basic._building = False
        _refuse_in_backward(basic)  # what a callable client_optimizer built
        return out

    def save_checkpoint(self, save_dir, tag=None, *args, **kwargs):
        if tag is None:  # as DeepSpeed names it; global_steps does not move during a save
            tag = f"global_step{self.global_steps}"
        out = orig_save(self, save_dir, tag, *args, **kwargs)
        # One writer per storage: rank 0, or each node's local rank 0 with node-local storage.
        writer = self.local_rank if self.use_node_local_storage() else self.global_rank
        if isinstance(getattr(self, "basic_optimizer", None), MicroAdam) and writer == 0:
            meta = partitions.partition_metadata(self)
            record = {"format": 1, "signature": partitions.signature(meta),
                      "describe": partitions.describe(partitions.signature(meta)), "rank0": meta}
            with open(os.path.join(save_dir, str(tag), LAYOUT_FILE), "w") as f:
                json.dump(record, f, indent=1)
        return out

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, *args, **kwargs):
        if (load_optimizer_states and not load_module_only
                and isinstance(getattr(self, "basic_optimizer", None), MicroAdam)):
            _precheck_load(self, load_dir, tag)
        return orig_load(self, load_dir, tag, load_module_strict, load_optimizer_states,
                         load_lr_scheduler_states, load_module_only, *args, **kwargs)

    cls._configure_basic_optimizer = _configure_basic_optimizer
    cls._configure_optimizer = _configure_optimizer
    cls.save_checkpoint = save_checkpoint
    cls.load_checkpoint = load_checkpoint


def _refuse_in_backward(optimizer: Any) -> None:
    if isinstance(optimizer, MicroAdam) and optimizer._backward is not None:
        raise ValueError(f"deepspeed.initialize with MicroAdam(step_in_backward=True): {IN_BACKWARD_REFUSAL}")


def _precheck_load(engine: Any, load_dir: str, tag: Any) -> None:
    """Refuse a checkpoint of another partitioning before DeepSpeed loads any of it."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return  # DeepSpeed warns and loads nothing
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag), LAYOUT_FILE)
    if not os.path.isfile(path):
        return  # not written by MicroAdam; MicroAdam.load_state_dict still checks every layout
    with open(path) as f:
        saved = json.load(f)["signature"]
    check_compatible(saved, partitions.signature(partitions.partition_metadata(engine)), where=path)


_PATCHES: dict[str, Callable[[Any], None]] = {
    "deepspeed.runtime.config": _patch_config,
    "deepspeed.runtime.zero.utils": _patch_zero_utils,
    "deepspeed.runtime.engine": _patch_engine,
}
_patched: set[str] = set()


def _apply(name: str, module: Any) -> None:
    if name in _patched:
        return
    _PATCHES[name](module)
    _patched.add(name)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then patches the fresh module."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _apply(self._name, module)

    def __getattr__(self, attr: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    """Meta-path finder that only wraps the loaders of the three DeepSpeed modules we patch."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES or fullname in _patched:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


_finder = _Finder()


def register() -> None:
    """Make `"type": "MicroAdam"` valid in DeepSpeed configs; never imports DeepSpeed (idempotent)."""
    for name in _PATCHES:
        module = sys.modules.get(name)
        if module is not None and name not in _patched:
            _apply(name, module)
    if len(_patched) < len(_PATCHES) and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def is_registered() -> bool:
    """True once all three DeepSpeed modules are loaded and patched."""
    return len(_patched) == len(_PATCHES)


__all__ = ["DeepSpeedMicroAdam", "register", "is_registered", "validate_params", "check_compatible",
           "LAYOUT_FILE", "TYPE_NAME"]
