"""`MicroAdam(step_in_backward=True)`: each param is stepped inside `loss.backward()` once its
gradient is complete, and its `.grad` is released right after, so that no buffer of every
gradient exists at any moment (docs/configuration.md, "Stepping inside backward").

Hooks. Every param of the optimizer carries a `register_post_accumulate_grad_hook`. Torch
runs it right after the param's gradient is accumulated; FSDP2 (`fully_shard`) runs a
sharded param's hooks itself, right after the reduce-scatter that produced the shard's
gradient, on its reduce-scatter stream. Accelerate and FSDP2 replace params after the
optimizer is built, so the hooks follow the current param groups rather than the
constructor's params: `refresh()` attaches them to params that appeared and drops those
that left, and runs at construction, in add_param_group, step() and train(), and before
every module forward until a hook has fired once (a global forward pre-hook: the first
forward after `accelerator.prepare` attaches them to the new params before the first
backward needs them).

Groups. A param whose gradient is ready joins a pending list; the list is stepped as one
group (one plan, one gradient check, the fused kernels for all of it) once it holds
`backward_bucket_mb` of gradients (default: a sixteenth of all of them), before a gradient
that lives on another CUDA stream joins it, and at the end of backward (an autograd final
callback). So a step costs about as many launches as the buckets, not one per tensor. The
kernels go to the stream that produced the gradients: the backward of a fine-tune is bound
by the host (its kernels are small and many), so they run in the GPU's idle gaps between
the layers' kernels, and a side stream would only add host time (docs/performance.md).

Non-finite gradients. Earlier groups have already been stepped when a later gradient
arrives, so the unit of skipping is the tensor: a tensor whose gradient holds a NaN or an
Inf keeps its param and state and is counted in `nonfinite_skips`; nonfinite="raise" makes
the next step() raise naming it. On one CUDA device the host does not wait for the check:
each tensor's records point at its own flag (ops/cuda.py run_cuda), the flags come back to
pinned memory, and the step counters and skips are settled when the host reads them: in
step(), state_dict(), load_state_dict(), or before a param is stepped again.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Any, Callable, Iterator

import torch

from .config import _check_real
from .ops import finite_flags
from .sharded_state import _PLAIN, is_fsdp1_param, local_tensor

DDP_REFUSAL = (
    "MicroAdam(step_in_backward=True) cannot train a DistributedDataParallel model: DDP "
    "all-reduces a gradient in its bucket after the param's gradient is complete, so a step "
    "inside backward would apply this rank's unreduced gradient; and DDP keeps every gradient "
    "in its buckets anyway, so there is no memory to gain. Use step_in_backward=False with DDP, "
    "or shard the model with FSDP2 (fully_shard), where stepping inside backward is supported")
FSDP1_REFUSAL = (
    "MicroAdam(step_in_backward=True) does not support FSDP1 (FullyShardedDataParallel): it "
    "reduces gradients after the hooks that would step them have run. Shard with FSDP2 "
    "(fully_shard), or use step_in_backward=False")
CLOSURE_REFUSAL = (
    "MicroAdam(step_in_backward=True).step() takes no closure: the step happens inside "
    "loss.backward(); compute the loss and call backward() yourself, then step() to complete it")
SCALER_REFUSAL = (
    "MicroAdam(step_in_backward=True) cannot combine with an fp16 GradScaler: the params were "
    "stepped inside backward with the scaled gradients, before scaler.unscale_/step could unscale "
    "or check them. Train in bf16 (no loss scaling), or use step_in_backward=False")


# backward_bucket_mb=None: buckets of a sixteenth of every gradient, so that a step makes
# about 16 groups whatever the model's size. A group costs about as much host time as an
# ordinary step's fixed part, and a host-bound backward pays it in full; the bucket is the
# memory that grouping adds to the peak (1/16 of the gradients), and at least AUTO_MIN_BYTES.
AUTO_GROUPS = 16
AUTO_MIN_BYTES = 32 * 2**20


def validate(step_in_backward: Any, backward_bucket_mb: Any, max_grad_norm_per_tensor: Any) -> None:
    """The constructor's checks of the three step-in-backward options (ValueError naming the field)."""
    if not isinstance(step_in_backward, bool):
        raise ValueError(f"Invalid step_in_backward: {step_in_backward!r}; expected True or False")
    if backward_bucket_mb is not None:
        _check_real("backward_bucket_mb", backward_bucket_mb, low=0.0, low_open=True)
    if max_grad_norm_per_tensor is not None:
        _check_real("max_grad_norm_per_tensor", max_grad_norm_per_tensor, low=0.0, low_open=True)
        if not step_in_backward:
            raise ValueError(
                f"max_grad_norm_per_tensor={max_grad_norm_per_tensor!r} needs step_in_backward=True; "
                "in the ordinary mode clip with torch.nn.utils.clip_grad_norm_ before step()")


def clip_per_tensor_(grads: list[torch.Tensor], max_norm: float) -> None:
    """grad <- grad * min(1, max_norm / (||grad||_2 + 1e-6)) for each tensor alone (in place):
    torch.nn.utils.clip_grad_norm_'s rule with each tensor its own group. The norm and the
    coefficient are float32 whatever the gradient's dtype."""
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
    coef = torch.clamp(float(max_norm) / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coef.unbind()))


def _accelerate_defers() -> bool:
    """True while Accelerate says this backward must not step: inside `accelerator.accumulate`
    on a micro-batch that does not sync, or HF Trainer's gradient_accumulation_steps > 1 before
    the last micro-batch (the Trainer sets the same flag). Such a backward accumulates, as in
    `MicroAdam.accumulate()`."""
    state = sys.modules.get("accelerate.state")
    return state is not None and state.GradientState._shared_state.get("sync_gradients", True) is False


class _Flight:
    """One group's step launched on a CUDA device with per-tensor flags not read yet. It holds
    no gradient (nor does `finish`, ops/cuda.py), so those are freed while it waits."""

    __slots__ = ("finish", "wheres", "params", "host", "event", "fresh", "nonfinite")

    def __init__(self, finish, wheres, params, flags, fresh, nonfinite):
        self.finish, self.wheres, self.params, self.fresh, self.nonfinite = finish, wheres, params, fresh, nonfinite
        self.host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
        self.host.copy_(flags, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(flags.device))


class StepInBackward:
    """The step-in-backward machinery of one MicroAdam (its `_backward`); see the module docstring.

    `flushes` counts the groups stepped so far (tests and benchmarks read it)."""

    def __init__(self, optimizer, bucket_mb: float | None, max_grad_norm_per_tensor: float | None) -> None:
        self.opt = optimizer
        self._bucket_mb = bucket_mb
        self.bucket_bytes = 1 if bucket_mb is None else max(1, int(float(bucket_mb) * 2**20))  # refresh() sizes None
        self.max_norm = None if max_grad_norm_per_tensor is None else float(max_grad_norm_per_tensor)
        self.flushes = 0
        self._hooks: dict[int, tuple[torch.Tensor, Any]] = {}  # id(param) -> (param, hook handle)
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (group index, param index)
        self._seen: list[int] = []  # ids of the params refresh() last saw, in order
        self._no_grad: list[torch.Tensor] = []  # params seen without requires_grad (no hook yet)
        self._pending: list[tuple[torch.Tensor, tuple[int, int]]] = []
        self._pending_bytes = 0
        self._stream = None  # the CUDA stream of the pending gradients (None on the CPU)
        self._streams: dict[Any, Any] = {}  # streams stepped on in this backward
        # Autograd graph tasks (backward calls) whose end-of-backward callback is queued: by id,
        # so that a backward that raised (its callbacks never run) does not block the next one's.
        self._queued: set[int] = set()
        self._accumulating = 0
        self._flights: list[_Flight] = []
        self._unsettled: set[int] = set()  # ids of params whose last step is in a flight
        self._raise: list[str] = []  # nonfinite="raise" tensors skipped since the last settle
        self._refusal: str | None = None
        ref = weakref.ref(self)

        def on_grad(p: torch.Tensor) -> None:
            me = ref()
            if me is not None:
                me._on_grad(p)

        def before_forward(module: torch.nn.Module, args: Any) -> None:
            me = ref()
            if me is None or me._forward_hook is None:
                handle.remove()
            else:
                me._before_forward(module)

        self._on_grad_hook = on_grad
        handle = torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
        self._forward_hook = handle
        self.refresh()

    # -- hooks follow the param groups ------------------------------------------------------
    def refresh(self) -> None:
        """Attach the hook to every param of the current param groups that lacks it, drop it
        from params no longer there, and re-index them (a list of ids compared when nothing changed)."""
        groups = self.opt.param_groups
        seen = [id(p) for g in groups for p in g["params"]]
        if seen == self._seen and not any(p.requires_grad for p in self._no_grad):
            return
        where: dict[int, tuple[int, int]] = {}
        no_grad = []
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                where[id(p)] = (gi, pi)
                if id(p) in self._hooks:
                    continue
                if is_fsdp1_param(p):
                    raise ValueError(FSDP1_REFUSAL)
                if self.max_norm is not None and local_tensor(p) is not p:
                    raise ValueError(
                        f"max_grad_norm_per_tensor is not supported for a sharded (DTensor, FSDP2) param: "
                        f"{self.opt._name((gi, pi))}; each rank holds a shard and would clip it by its "
                        "own norm. Leave max_grad_norm_per_tensor unset under FSDP2")
                if not p.requires_grad:
                    no_grad.append(p)
                    continue
                self._hooks[id(p)] = (p, p.register_post_accumulate_grad_hook(self._on_grad_hook))
        for key in [k for k in self._hooks if k not in where]:
            self._hooks.pop(key)[1].remove()
        if self._bucket_mb is None:
            # Global sizes (a DTensor's numel is its whole param's): every FSDP rank cuts alike.
            total = sum(p.numel() * p.element_size() for g in groups for p in g["params"] if p.requires_grad)
            self.bucket_bytes = max(AUTO_MIN_BYTES, -(-total // AUTO_GROUPS))
        self._where, self._seen, self._no_grad = where, seen, no_grad

    def _before_forward(self, module: torch.nn.Module) -> None:
        self.refresh()
        if isinstance(module, torch.nn.parallel.DistributedDataParallel) and any(
                id(q) in self._where for q in module.parameters()):
            self._refusal = DDP_REFUSAL

    def check_trainer(self) -> None:
        """Refuse, by name, the HF Trainer options that cannot work when the step happens
        inside backward. Called by MicroAdam.train(), which the Trainer calls (through
        Accelerate's optimizer wrapper) before each training step."""
        module = sys.modules.get("transformers.trainer")
        if module is None:
            return
        frame = sys._getframe(2)
        for _ in range(8):
            if frame is None:
                return
            trainer = frame.f_locals.get("self")
            if isinstance(trainer, module.Trainer):
                args = trainer.args
                if (args.max_grad_norm or 0) > 0:
                    raise ValueError(
                        f"HF Trainer with max_grad_norm={args.max_grad_norm} clips by the global norm "
                        "after backward, but MicroAdam(step_in_backward=True) has stepped every param and "
                        "released its gradient inside backward, so it would clip nothing. Set "
                        "max_grad_norm=0 in TrainingArguments, and MicroAdam(max_grad_norm_per_tensor=...) "
                        "for per-tensor clipping")
                if getattr(args, "fp16", False):
                    raise ValueError(f"HF Trainer with fp16=True uses a GradScaler: {SCALER_REFUSAL}")
                return
            frame = frame.f_back

    # -- inside backward ------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if self._refusal is not None:
            raise RuntimeError(self._refusal)
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        if self._accumulating or _accelerate_defers():
            return
        where = self._where.get(id(p))
        grad = p.grad
        if where is None or grad is None:
            return
        task = torch._C._current_graph_task_id()
        if task not in self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued.add(task)
        stream = torch.cuda.current_stream(grad.device) if grad.is_cuda else None
        if self._pending and stream != self._stream:
            self.flush()
        self._stream = stream
        self._pending.append((p, where))
        # The global size (a DTensor's too): every FSDP rank cuts its groups at the same params.
        self._pending_bytes += p.numel() * grad.element_size()
        if self._pending_bytes >= self.bucket_bytes:
            self.flush()

    def _end_of_backward(self) -> None:
        self._queued.discard(torch._C._current_graph_task_id())
        self.flush()
        self.join()

    def join(self) -> None:
        """Make the current stream wait for the groups stepped on other streams (FSDP2's
        reduce-scatter stream), so that what runs next reads stepped params.
        Runs at the end of backward, and in settle() for a backward that raised before its end."""
        for stream in self._streams.values():
            current = torch.cuda.current_stream(stream.device)
            if current != stream:
                current.wait_stream(stream)
        self._streams.clear()

    def flush(self) -> None:
        """Step the pending params as one group and release their gradients."""
        pending, stream = self._pending, self._stream
        self._pending, self._pending_bytes = [], 0
        if not pending:
            return
        opt = self.opt
        if self._unsettled and any(id(p) in self._unsettled for p, _ in pending):
            self.settle()  # a param stepped again: its counter must first move
        work = self._work(pending)
        plan, fresh = opt._plan(work)
        fresh_ids = {id(p) for p in fresh}
        place = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        try:
            with place:
                for name, device, run, jobs, hp in plan:
                    self._run(name, device, run, jobs, hp, fresh_ids)
        except BaseException:
            opt._forget(fresh)
            raise
        if stream is not None:
            self._streams[stream] = stream
        self.flushes += 1
        for p, _ in pending:
            p.grad = None

    def _work(self, pending: list) -> list:
        """step()'s work list for the pending params, in param-group order."""
        opt = self.opt
        by_group: dict[int, list] = {}
        taken: set[int] = set()  # a param left pending by a backward that raised may come again
        for p, where in pending:
            grad = p.grad
            if grad is None or p.numel() == 0 or id(p) in taken:
                continue
            taken.add(id(p))
            if grad.is_sparse or p.dtype.is_complex or grad.dtype.is_complex or grad.shape != p.shape:
                opt._reject_grad(p, grad, where)
            by_group.setdefault(where[0], []).append(
                (p, p if type(p) in _PLAIN else local_tensor(p),
                 grad if type(grad) in _PLAIN else local_tensor(grad), where))
        return [(opt._group_config(opt.param_groups[gi], gi), by_group[gi]) for gi in sorted(by_group)]

    def _run(self, name: str, device: torch.device, run: Callable, jobs: list, hp: Any,
             fresh_ids: set[int]) -> None:
        """One plan entry (one param group on one device): check, clip, step."""
        opt = self.opt
        nonfinite = opt.param_groups[jobs[0].where[0]]["nonfinite"]
        params = [opt.param_groups[gi]["params"][pi] for gi, pi in (job.where for job in jobs)]
        grads = [job.grad for job in jobs]
        flags = None if nonfinite == "off" else finite_flags(grads, device, name == "cuda")[0]
        if self.max_norm is not None:
            clip_per_tensor_(grads, self.max_norm)  # after the check, which reads the raw gradients
        fresh = [id(p) in fresh_ids for p in params]
        if flags is not None and name == "cuda":
            # The kernels read each tensor's flag on the GPU; the host reads them later (settle).
            finish = run(jobs, hp, go=flags)
            self._flights.append(_Flight(finish, [job.where for job in jobs], params, flags, fresh, nonfinite))
            self._unsettled.update(id(p) for p in params)
            return
        if flags is None:
            run(jobs, hp)
            return
        ok = flags.tolist()
        good = [job for job, flag in zip(jobs, ok) if flag]
        if good:
            run(good, hp)
        self._skipped([job.where for job in jobs], params, ok, fresh, nonfinite)

    def _skipped(self, wheres: list, params: list, ok: list[bool], fresh: list[bool], nonfinite: str) -> None:
        for where, p, flag, new in zip(wheres, params, ok, fresh):
            if flag:
                continue
            self.opt.nonfinite_skips += 1
            if new:
                self.opt._forget([p])  # as the ordinary step drops a skipped first step's state
            if nonfinite == "raise":
                self._raise.append(self.opt._name(where))

    # -- completing the step ------------------------------------------------------------------------
    def settle(self) -> None:
        """Read the flags of every group launched without waiting for them (waits for their
        checks), advance the step counters of the tensors stepped, count the skipped ones, and
        raise FloatingPointError for those of nonfinite="raise" groups."""
        self.join()
        flights, self._flights = self._flights, []
        self._unsettled.clear()
        for fl in flights:
            fl.event.synchronize()
            ok = fl.host.tolist()
            fl.finish(ok)
            self._skipped(fl.wheres, fl.params, ok, fl.fresh, fl.nonfinite)
        if self._raise:
            names, self._raise = self._raise, []
            raise FloatingPointError(
                f"MicroAdam: non-finite gradient in {names[0]}"
                + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                + "; that tensor's param and state are unchanged, every other tensor was stepped "
                "(step_in_backward=True skips per tensor; nonfinite='raise')")

    def before_step(self, closure: Callable[[], Any] | None) -> None:
        """What MicroAdam.step() does first in this mode: refuse a closure and a GradScaler,
        follow the param groups, settle the steps taken inside backward. step() then steps
        the params whose gradient is still set (by hand, or inside accumulate())."""
        if closure is not None:
            raise RuntimeError(CLOSURE_REFUSAL)
        # GradScaler.step sets these on an optimizer with _step_supports_amp_scaling (ours, in this mode).
        if hasattr(self.opt, "found_inf") or hasattr(self.opt, "grad_scale"):
            raise RuntimeError(SCALER_REFUSAL)
        self.refresh()
        self.settle()

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        self._accumulating += 1
        try:
            yield
        finally:
            self._accumulating -= 1


__all__ = ["StepInBackward", "clip_per_tensor_", "validate"]
