"""Backends that run one MicroAdam step over a list of shards.

A backend is a function `run(jobs, hp)` taking a list of `ShardJob` of one param
group and the group's `StepHyper`; it advances each job's `state["step"]` by one
(`advance_steps`) and takes the step. The reference backend is `reference.step_shard`
applied to each job; a fused backend may launch one kernel for all of them.
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


__all__ = ["ShardJob", "StepHyper", "advance_steps", "run_reference", "select_backend", "reference"]
