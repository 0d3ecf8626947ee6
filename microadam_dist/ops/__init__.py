"""Backends that run one MicroAdam step over a list of shards.

A backend is a function `run(jobs, hp)` taking a list of `ShardJob` of one param
group and the group's `StepHyper`; it advances each job's `state["step"]` by one
(`advance_steps`) and takes the step. The reference backend is `reference.step_shard`
applied to each job; a fused backend may launch one kernel for all of them.

The CUDA runner also takes `go=` (a one-element bool tensor on the jobs' device: the
gradient check's result, computed on the GPU): its kernels then write nothing when it is
false, and it returns a `finish` callable that advances the step counters once the caller
knows the check passed (ops/cuda.py `run_cuda`, optim.py `step`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..layout import Layout
from . import reference
from .reference import StepHyper


class ShardJob(NamedTuple):
    """One tensor's work in a step: param and grad are any shape (viewed flat), state per
    layout.py; `where` = (group index, param index) in the optimizer's param_groups;
    `memo`: a dict the optimizer keeps per param across steps, where a backend may cache
    what it derives from the state (it validates what it reads back)."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    layout: Layout
    where: tuple
    memo: dict | None = None


def advance_steps(jobs: list[ShardJob]) -> None:
    """state["step"] += 1 for every job: one call for all the (CPU) step counters."""
    if jobs:
        torch._foreach_add_([job.state["step"] for job in jobs], 1)


def run_reference(jobs: list[ShardJob], hp: StepHyper) -> None:
    advance_steps(jobs)
    for job in jobs:
        reference.step_shard(job.param, job.grad, job.state, job.layout, hp)


def finite_flags(grads: list[torch.Tensor], device: torch.device,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Whether each gradient (all on `device`, none empty) is finite, as bools on the device,
    and, when the fused kernel computed them (`fused`: the groups use a CUDA backend), the
    one-element flag "all finite" that the step's kernels read (ops/cuda.py run_cuda)."""
    if fused and device.type == "cuda":
        from . import builder
        try:
            module = builder.load()
        except builder.ExtensionUnavailable:
            module = None
        if module is not None:
            from . import cuda as cuda_ops
            flags = cuda_ops.gradient_flags(module, grads, device)
            if flags is not None:
                return flags[:-1], flags[-1:]
    # The max-norm of a gradient (one fused multi-tensor reduction, no d-sized temporary) is
    # NaN or Inf exactly when it holds a NaN or an Inf.
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))), None


def select_backend(name: str, device: torch.device) -> tuple[str, Callable[[list[ShardJob], StepHyper], None]]:
    """Resolve "auto" | "reference" | "cuda" for tensors on `device` -> (name, runner)."""
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return "reference", run_reference
    try:
        from . import cuda as cuda_ops  # noqa: F401  (present once the kernels land)
    except ImportError as exc:
        if name == "cuda":
            raise RuntimeError(
                f"backend='cuda' was requested but the CUDA backend is unavailable ({exc}); "
                "use backend='reference' or 'auto'") from exc
        return "reference", run_reference
    return cuda_ops.resolve(name, device, run_reference)


__all__ = ["ShardJob", "StepHyper", "advance_steps", "finite_flags", "run_reference", "select_backend", "reference"]
