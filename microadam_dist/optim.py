"""`MicroAdam`: the torch.optim.Optimizer users construct.

It validates hyper-parameters, owns per-tensor state (layout.py), checks gradients,
and hands each param group's shards to a backend (ops/). The math lives in
ops/reference.py (the spec) and csrc/ (the fused kernels), not here.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterable

import torch

from .config import MicroAdamConfig, normalize_kwargs
from .layout import Layout
from . import sharded_state
from .sharded_state import _PLAIN, local_tensor
from .ops import ShardJob, StepHyper, finite_flags, select_backend

RESHARD_HINT = ("to move a checkpoint to another world size or sharding, run "
                "`python -m microadam_dist.checkpoint reshard --src OLD --dst NEW --world-size N` "
                "(docs/checkpoints.md)")



class MicroAdam(torch.optim.Optimizer):
    """MicroAdam (arXiv 2405.15593): Adam moments rebuilt from a window of m top-k
    gradients, with a 4-bit error feedback. State is ~0.9 bytes/param at m=10, density 1%.

    Args:
        params: iterable of tensors or param-group dicts (each group may override any
            hyper-parameter below).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        m: window rows (sparse gradients remembered).
        density: fraction of each top-k block kept per step (alias ``k_init``).
        topk_block: elements per top-k block, <= 32768.
        quant_block: elements per EF quantization block (alias ``quant_block_size``).
        ef_rounding: "nearest" or "stochastic".
        nonfinite: "skip" (leave params and state untouched for a step with a
            non-finite gradient and count it), "raise", or "off".
        backend: "auto", "reference" or "cuda".
        step_in_backward: step each param inside ``loss.backward()`` once its gradient is
            complete and release the gradient there (no buffer of every gradient);
            ``step()`` then completes the step. Non-finite gradients are skipped per tensor.
            See backward.py and docs/configuration.md for what cannot combine with it.
        backward_bucket_mb: with step_in_backward, megabytes of gradients stepped together
            (one group of kernel launches); None: a sixteenth of all the params' gradient
            bytes, at least 32 MB (backward.py, AUTO_GROUPS).
        max_grad_norm_per_tensor: with step_in_backward, clip each gradient to this L2 norm
            before its step (global-norm clipping cannot run inside backward).

    Params and grads may be float32, bfloat16 or float16 and of any shape; each
    tensor is treated as one flat shard. Sparse and complex gradients are rejected.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, m: int = 10, density: float | None = None,
                 topk_block: int = 4096, quant_block: int | None = None,
                 ef_rounding: str = "nearest", nonfinite: str = "skip", backend: str = "auto",
                 step_in_backward: bool = False, backward_bucket_mb: float | None = None,
                 max_grad_norm_per_tensor: float | None = None, **aliases: Any) -> None:
        given = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=m,
                     topk_block=topk_block, ef_rounding=ef_rounding, nonfinite=nonfinite,
                     backend=backend)
        if density is not None:
            given["density"] = density
        if quant_block is not None:
            given["quant_block"] = quant_block
        given.update(aliases)
        config = MicroAdamConfig.from_kwargs(**given)
        self.nonfinite_skips = 0
        # id(param) -> (its state's layout tensor, numel and block hyper-parameters, Layout,
        # the backend's memo): step() skips _check_state while neither the state nor the
        # group changed. Keyed by id, not by a weak dictionary (four Python
        # calls a lookup, on the host time of every step): an id reused by a later tensor
        # meets another state, whose layout tensor is not the one held here, so the check
        # runs again (with a fresh memo).
        self._layouts: dict[int, tuple] = {}
        from . import backward  # imports this module
        backward.validate(step_in_backward, backward_bucket_mb, max_grad_norm_per_tensor)
        self._backward = None
        super().__init__(params, config.as_dict())
        if step_in_backward:
            self._backward = backward.StepInBackward(self, backward_bucket_mb, max_grad_norm_per_tensor)
            # GradScaler.step then announces itself to step(), which refuses it (backward.py).
            self._step_supports_amp_scaling = True

    # -- param groups ---------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        hyper = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        group = {k: v for k, v in param_group.items() if k in ("params", "param_names")}
        group.update(normalize_kwargs(hyper))
        super().add_param_group(group)
        self._group_config(self.param_groups[-1], len(self.param_groups) - 1)
        if getattr(self, "_backward", None) is not None:
            self._backward.refresh()

    def _group_config(self, group: dict[str, Any], index: int) -> MicroAdamConfig:
        try:
            return MicroAdamConfig(**{k: group[k] for k in MicroAdamConfig.field_names()})
        except ValueError as exc:
            raise ValueError(f"param_groups[{index}]: {exc}") from None

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every param with a gradient. Returns the closure's loss.

        With step_in_backward: completes the step taken inside backward (waits for it, counts
        and raises for non-finite tensors) and steps the params whose gradient is still set."""
        if self._backward is not None:
            self._backward.before_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # (config, [(param, local param, local grad, (group index, param index))]) per group.
        # Written out (no helper calls on the common path): these loops run for every tensor
        # of every step, on the host time during which an idle GPU waits for the first launch.
        work: list[tuple[MicroAdamConfig, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]]]] = []
        for gi, group in enumerate(self.param_groups):
            config = self._group_config(group, gi)
            items = []
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None or p.numel() == 0:
                    continue
                if grad.is_sparse or p.dtype.is_complex or grad.dtype.is_complex or grad.shape != p.shape:
                    self._reject_grad(p, grad, (gi, pi))
                items.append((p, p if type(p) in _PLAIN else local_tensor(p),
                              grad if type(grad) in _PLAIN else local_tensor(grad), (gi, pi)))
            if items:
                work.append((config, items))
        if closure is None and not self.state and self._is_state_init_call(work):
            self._plan(work)  # creates every state, as a first step would, and steps nothing
            return None

        # The gradient check goes to the GPU first; the host plans while it runs.
        check = self._start_gradient_check(work)

        # Every state is looked up and checked, and every backend resolved (a CUDA backend
        # asked for CPU tensors fails here), before anything runs, so that a state that does
        # not fit its param fails the step with nothing changed, in any group (before, an
        # earlier group had already been stepped). States created here (a param's first step)
        # are dropped again if the step fails or is skipped.
        plan, fresh = self._plan(work)
        # One CUDA device, fused kernels only: launch now; the kernels read the check's flag
        # on the GPU and do nothing if it failed (ops/cuda.py run_cuda). Otherwise the host
        # waits for the check (if any) before running anything.
        on_gpu = check is not None and check.go is not None and all(
            name == "cuda" and device == check.device for name, device, _, _, _ in plan)
        try:
            finish = [run(jobs, hp, go=check.go) for _, _, run, jobs, hp in plan] if on_gpu else []
            ok = check is None or self._gradients_ok(check)
        except BaseException:
            self._forget(fresh)
            raise
        if not ok:
            self._forget(fresh)
            self.nonfinite_skips += 1
            return loss
        if on_gpu:
            for done in finish:
                done()  # advances the step counters; runs what the kernels could not take
        else:
            for _, _, run, jobs, hp in plan:
                run(jobs, hp)  # advances each job's state["step"] and steps it
        return loss

    def _plan(self, work: list) -> tuple[list, list[torch.Tensor]]:
        """(plan, fresh) for `work` (step()'s list): per param group and device, (backend name,
        device, runner, [ShardJob], StepHyper), with every state looked up, checked or created;
        fresh: the params whose state was created here (dropped again if this raises).
        step() and step_in_backward (backward.py) plan through it."""
        plan = []
        fresh: list[torch.Tensor] = []
        state_of, layouts = self.state, self._layouts
        try:
            for config, items in work:
                by_device: dict[torch.device, list[ShardJob]] = {}
                blocks = (config.topk_block, config.density, config.quant_block, config.m)
                for p, p_local, g_local, where in items:
                    n = p_local.numel()
                    state = state_of[p]
                    if n == 0:  # e.g. an FSDP rank that holds no part of this param
                        if not state and p_local is not p:
                            # A DTensor param's state exists on every rank of its mesh (its
                            # checkpoint form is one DTensor: sharded_state.py), empty here.
                            fresh.append(p)
                            self._check_state(p, p_local, state, (n, blocks), config, where)
                        continue
                    key = (n, blocks)
                    cached = layouts.get(id(p))
                    if cached is not None and cached[0] is state.get("layout") and cached[1] == key:
                        layout, memo = cached[2], cached[3]
                    else:
                        if not state:
                            fresh.append(p)
                        layout, memo = self._check_state(p, p_local, state, key, config, where)
                    jobs = by_device.get(p_local.device)
                    if jobs is None:
                        by_device[p_local.device] = jobs = []
                    jobs.append(ShardJob(p_local, g_local, state, layout, where, memo))
                hp = StepHyper(lr=float(config.lr), beta1=config.betas[0], beta2=config.betas[1],
                               eps=float(config.eps), weight_decay=float(config.weight_decay),
                               ef_rounding=config.ef_rounding, alpha=float(config.alpha))
                for device, jobs in by_device.items():
                    name, run = select_backend(config.backend, device)
                    plan.append((name, device, run, jobs, hp))
        except BaseException:
            self._forget(fresh)
            raise
        return plan, fresh

    def _is_state_init_call(self, work: list) -> bool:
        """Whether this step is torch.distributed.checkpoint's `_init_optim_state`: on an
        optimizer with no state, every lr 0 and every gradient in `work` (step()'s list)
        zero. That call only wants the state to exist (to build a load template); a real
        step would consume a window row and count a step."""
        if not work or any(float(g["lr"]) != 0.0 for g in self.param_groups):
            return False
        grads = [g for _, items in work for _, _, g, _ in items if g.numel()]
        return not grads or all(bool((n == 0).all()) for n in torch._foreach_norm(grads, float("inf")))

    def _forget(self, params: list[torch.Tensor]) -> None:
        """Drop the states step() created for these params (a failed or skipped first step)."""
        for p in params:
            self.state.pop(p, None)
            self._layouts.pop(id(p), None)

    def _name(self, where: tuple[int, int]) -> str:
        """Readable name of param_groups[gi]['params'][pi] for error messages."""
        gi, pi = where
        group = self.param_groups[gi]
        p = group["params"][pi]
        names = group.get("param_names")
        label = f"{names[pi]!r} " if names else ""
        return f"{label}(param_groups[{gi}]['params'][{pi}], shape {tuple(p.shape)}, {p.dtype})"

    def _reject_grad(self, p: torch.Tensor, grad: torch.Tensor, where: tuple[int, int]) -> None:
        name = self._name(where)
        if grad.is_sparse:
            raise RuntimeError(f"MicroAdam does not support sparse gradients: {name}")
        if p.is_complex() or grad.is_complex():
            raise RuntimeError(f"MicroAdam does not support complex params or gradients: {name}")
        raise RuntimeError(f"gradient shape {tuple(grad.shape)} differs from its param: {name}")

    def _check_state(self, p: torch.Tensor, p_local: torch.Tensor, state: dict, key: tuple,
                     config: MicroAdamConfig, where: tuple[int, int]) -> tuple[Layout, dict]:
        """The layout the param and its group need now, with the state created (first step)
        or checked against it, and a fresh backend memo; cached under id(p) with `key`
        (numel, block hyper-parameters), which step() compares before calling this."""
        expected = Layout.for_numel(p_local.numel(), config)
        if not state:
            state.update(expected.new_state(p_local.device))
        else:
            have = Layout.from_tensor(state["layout"])
            if have != expected:
                raise RuntimeError(
                    f"MicroAdam state of {self._name(where)} has layout [{have.describe()}] but the param "
                    f"and its group now need [{expected.describe()}]; {RESHARD_HINT}")
        memo: dict = {}
        self._layouts[id(p)] = (state["layout"], key, expected, memo)
        return expected, memo

    def _start_gradient_check(self, work) -> "_GradientCheck | None":
        """Enqueue the non-finite check of every gradient whose group asks for it (None: no
        check): one multi-tensor read of the gradients per device (ops.finite_flags)."""
        # An FSDP rank may hold no element of a param (an empty local gradient): nothing to check.
        checked = [(config, g, where) for config, items in work if config.nonfinite != "off"
                   for _, _, g, where in items if g.numel()]
        if not checked:
            return None
        by_device: dict[torch.device, list] = {}
        for entry in checked:
            by_device.setdefault(entry[1].device, []).append(entry)
        order = [e for entries in by_device.values() for e in entries]
        # The fused check kernel where no group on the device asks for the reference backend.
        flags = [finite_flags([g for _, g, _ in es], device, all(c.backend != "reference" for c, _, _ in es))
                 for device, es in by_device.items()]
        return _GradientCheck([(config, where) for config, _, where in order], flags)

    def _gradients_ok(self, check: "_GradientCheck") -> bool:
        """False when the step must be skipped; raises in "raise" mode. Waits for the check."""
        finite = check.result()
        if bool(finite.all()):
            return True
        bad = [(config, where) for (config, where), ok in zip(check.entries, finite.tolist()) if not ok]
        raising = [self._name(where) for config, where in bad if config.nonfinite == "raise"]
        if raising:
            raise FloatingPointError(
                f"MicroAdam: non-finite gradient in {raising[0]}"
                + (f" and {len(raising) - 1} more" if len(raising) > 1 else "")
                + "; params and state are unchanged (nonfinite='raise')")
        return False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("nonfinite_skips", 0)
        self.__dict__.setdefault("_backward", None)
        # Groups loaded from a state dict (or a pickle) written before a hyper-parameter
        # existed lack its key; its default is what that run used (alpha = 0: off).
        for group in [self.defaults, *self.param_groups]:
            for key, value in MicroAdamConfig().as_dict().items():
                group.setdefault(key, value)

    # -- step_in_backward ---------------------------------------------------------------
    def accumulate(self) -> contextlib.AbstractContextManager:
        """Context in which backward() accumulates gradients without stepping (step_in_backward);
        the next backward outside it steps with the summed gradients. Does nothing in the
        ordinary mode, where gradients accumulate until step() anyway."""
        return self._backward.accumulate() if self._backward is not None else contextlib.nullcontext()

    def train(self) -> None:
        """Called by HF Trainer (through Accelerate) before each training step; with
        step_in_backward it refuses the Trainer options that cannot combine with it."""
        if self._backward is not None:
            self._backward.check_trainer()

    # -- state dict ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict, with every DTensor (FSDP2) param's state in the
        checkpoint form of sharded_state.py, so that torch.distributed.checkpoint's stock
        calls keep every rank's shard. States are ordered by param index on every rank
        (the full-state gather runs one collective per tensor, in dict order)."""
        _refuse_fsdp1(self, "save")
        if self._backward is not None:
            self._backward.settle()  # step counters of a step taken inside backward
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index in sorted(sd["state"]):
            entry = sd["state"][index]
            p = params[index]
            geo = sharded_state.geometry(p)
            state[index] = entry if geo is None else sharded_state.export_state(
                entry, geo, local_tensor(p).device)
        sd["state"] = state
        sd["microadam"] = {"format": 1, "nonfinite_skips": self.nonfinite_skips}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after validating every entry; a rejected state leaves the optimizer untouched.

        Takes both forms that `state_dict` writes (sharded_state.py), and the plain form
        for a DTensor param too (rank-keyed checkpoints). The stock loader would cast every
        floating state to the param's dtype; MicroAdam's state has fixed dtypes (uint8 codes,
        fp32 ranges, int16 indices, bf16 values), so each tensor is restored as saved.
        """
        _refuse_fsdp1(self, "load")
        if self._backward is not None:
            self._backward.settle()
        pairs = self._check_loadable(state_dict)
        extra = state_dict.get("microadam", {})
        # The param groups through torch (hyper-parameters, hooks); the states below.
        super().load_state_dict({**state_dict, "state": {}})
        # Every state is replaced: drop the cached checks and the backend memos with them,
        # which would otherwise keep the old state tensors (device memory) alive.
        self._layouts.clear()
        for key, p, expected, parts in pairs:
            self.state[p] = sharded_state.import_state(state_dict["state"][key], parts, p, expected)
        self.nonfinite_skips = int(extra.get("nonfinite_skips", 0))

    def _check_loadable(self, state_dict: dict[str, Any]) -> list[tuple[Any, torch.Tensor, Layout, dict]]:
        """(key, param, layout this run needs, its checked tensors) of every saved state, after
        checking the groups and every state (sharded_state.check_state): a refused state dict
        fails here, before anything changed."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        pairs = []
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"param_groups[{gi}] holds {len(sg['params'])} params in the state "
                                 f"dict and {len(g['params'])} in the optimizer")
            merged = {**g, **MicroAdamConfig().as_dict()}  # a missing key loads as its default
            merged.update({k: v for k, v in sg.items() if k != "params"})
            config = self._group_config(merged, gi)
            for pi, (key, p) in enumerate(zip(sg["params"], g["params"])):
                st = state_dict["state"].get(key)
                if st is None:
                    continue
                name = self._name((gi, pi))
                expected = Layout.for_numel(local_tensor(p).numel(), config)
                parts = sharded_state.check_state(st, p, expected, name, RESHARD_HINT)
                pairs.append((key, p, expected, parts))
        return pairs


def holds_fsdp1_params(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any of the optimizer's params is managed by FSDP1."""
    return any(sharded_state.is_fsdp1_param(p) for g in optimizer.param_groups for p in g["params"])


def _called_by_torch_fsdp1_state_dict() -> bool:
    """Whether torch's FSDP1 optimizer-state machinery (FSDP.optim_state_dict and friends,
    or torch.distributed.checkpoint.state_dict, which routes FSDP1 models through them) is
    on the call stack."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        module = frame.f_globals.get("__name__", "")
        if module.startswith("torch.distributed.fsdp") or module == "torch.distributed.checkpoint.state_dict":
            return True
        frame = frame.f_back
    return False


def _refuse_fsdp1(optimizer: "MicroAdam", what: str) -> None:
    """FSDP1 (FullyShardedDataParallel) flattens and all-gathers optimizer state as if each
    tensor were shaped like its param; MicroAdam's is not, so its stock optimizer state
    dict would fail obscurely or carry garbage. Refuse it by name."""
    if not holds_fsdp1_params(optimizer):
        return
    if not _called_by_torch_fsdp1_state_dict():
        return
    raise RuntimeError(
        f"MicroAdam's state cannot {what} through FSDP1's optimizer state dict "
        "(FullyShardedDataParallel.optim_state_dict / optim_state_dict_to_load, or "
        "torch.distributed.checkpoint.state_dict on an FSDP1 model): FSDP1 reshapes every state "
        "tensor like its param. Under FSDP1 use microadam_dist.integrations.fsdp.save_checkpoint "
        "/ load_checkpoint (every rank's own state, DCP); or shard with FSDP2 (fully_shard), whose "
        "stock checkpoint calls carry MicroAdam's state (docs/checkpoints.md)")


__all__ = ["MicroAdam", "local_tensor", "holds_fsdp1_params", "RESHARD_HINT"]


class _GradientCheck:
    """A step's gradient check in flight: per checked gradient (in `entries` order) whether
    it is finite. On one CUDA device `go` is that device's one-element flag "all finite",
    which the fused kernels read (ops/cuda.py), and the flags come back to the host by an
    asynchronous copy, so that reading them waits for the check, not for the step."""

    def __init__(self, entries: list, flags: list[tuple[torch.Tensor, torch.Tensor | None]]):
        self.entries = entries
        self.go = self.device = self._event = None
        self._finite = [finite for finite, _ in flags]
        if len(flags) == 1 and flags[0][0].is_cuda:
            flags, go = flags[0]
            self.device = flags.device
            self.go = go if go is not None else flags.all()
            self._host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self.device))

    def result(self) -> torch.Tensor:
        """The flags on the host (waits for the check alone)."""
        if self._event is not None:
            self._event.synchronize()
            return self._host
        return torch.cat([f.cpu() for f in self._finite])
