"""The fused CUDA backend: builds launch tables and calls the kernels of csrc/.

`resolve(name, device, run_reference)` is called by `ops.select_backend` and returns
("cuda", runner) when the extension loads, else ("reference", run_reference) with one
warning (backend="auto") or a RuntimeError (backend="cuda").

A runner call groups the jobs by (param dtype, grad dtype, block sizes, m) and makes
launch tables per group: a step costs a handful of kernel launches per group (the first
goes out early, see run_cuda), not one per tensor. Jobs the kernels cannot take
(non-contiguous tensors, other dtypes) run through the reference.
"""

from __future__ import annotations

import array
import functools
import os
import struct
import warnings
from typing import Callable

import torch

from ..layout import Layout
from . import builder
from .reference import StepHyper

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
REC = 16
# Second-pass workspace: two float32 ranges per quant block of the tensors that need it.
WORKSPACE_BYTES = 64 * 2**20


def _first_launch_blocks(value: str) -> int:
    try:
        blocks = int(value)
    except ValueError:
        blocks = -1
    if blocks < 0:
        raise ValueError(f"MICROADAM_FIRST_LAUNCH_BLOCKS={value!r}: expected an integer >= 0 "
                         "(top-k blocks before the first launch; 0: one launch per group)")
    return blocks


# run_cuda launches a group once it holds this many top-k blocks (4 M elements at the
# default block of 4096), then at 4x as many each time; 0: one launch per group, after
# every record is built. MICROADAM_FIRST_LAUNCH_BLOCKS overrides it.
FIRST_LAUNCH_BLOCKS = _first_launch_blocks(os.environ.get("MICROADAM_FIRST_LAUNCH_BLOCKS", "1024"))
F_PARAM, F_GRAD, F_EF, F_EF_MIN, F_EF_MAX, F_WIN_IDX, F_WIN_VAL, F_N, F_K_TOTAL, F_K_LAST, \
    F_START, F_STEP, F_COEF, F_WS, F_GO = range(15)

_warned: set[str] = set()


def resolve(name: str, device: torch.device, run_reference: Callable) -> tuple[str, Callable]:
    """("cuda", runner) for CUDA tensors when the extension loads; otherwise the reference."""
    if device.type != "cuda":
        if name == "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, but this param group's tensors are "
                               f"on {device}; use backend='auto' or 'reference'")
        return "reference", run_reference
    try:
        module = builder.load()
    except builder.ExtensionUnavailable as exc:
        if name == "cuda":
            raise RuntimeError(f"backend='cuda' was requested but the MicroAdam CUDA kernels are "
                               f"unavailable: {exc}. See docs/install.md, or use backend='auto'.") from None
        msg = str(exc)
        if msg not in _warned:
            _warned.add(msg)
            warnings.warn(f"MicroAdam: CUDA kernels unavailable ({msg}); running the reference "
                          "PyTorch path, which is correct but slow. See docs/install.md.",
                          RuntimeWarning, stacklevel=3)
        return "reference", run_reference
    return "cuda", functools.partial(run_cuda, module, fallback=run_reference)


_STATE_TENSORS = ("ef", "ef_min", "ef_max", "win_idx", "win_val")


def _entry(job, module):
    """The job's launch entry, or None when the kernels cannot take it now.

    An entry holds what stays fixed while the state's tensors and the layout do: those
    tensors (checked by identity each step), their device index, their pointers, the
    layout's sizes and whether the EF needs the second pass. It is kept in the job's memo
    (owned by the optimizer, one per param), so a step costs a few calls per tensor. The
    param and the grad are checked and their pointers read every step (a `.data`
    reassignment or a new grad changes them); the state's tensors are replaced, never
    rebound in place, by the optimizer and the checkpoint code.
    """
    # Written out (no generator, no torch.device objects): this runs for every tensor of
    # every step, on the host time during which the GPU waits for the launch.
    p, g, st = job.param, job.grad, job.state
    if p.dtype not in DTYPES or g.dtype not in DTYPES or not (p.is_contiguous() and g.is_contiguous()):
        return None
    memo = job.memo
    ent = memo.get("cuda") if memo is not None else None
    if (ent is None or ent.ef is not st["ef"] or ent.ef_min is not st["ef_min"] or ent.ef_max is not st["ef_max"]
            or ent.win_idx is not st["win_idx"] or ent.win_val is not st["win_val"] or ent.layout is not job.layout):
        ent = _Entry.of(job, module)
        if ent is None:
            return None
        if memo is not None:
            memo["cuda"] = ent
    dev = ent.dev
    if p.get_device() != dev or g.get_device() != dev:
        return None
    return ent


class _Entry:
    """What the launch needs of a job that stays fixed with its state's tensors and layout."""

    __slots__ = _STATE_TENSORS + ("layout", "dev", "fields", "blocks", "two", "n_topk_blocks", "n_quant_blocks")

    @classmethod
    def of(cls, job, module) -> "_Entry | None":
        """None when the state's tensors are not contiguous on one CUDA device."""
        st, lay = job.state, job.layout
        tensors = [st[k] for k in _STATE_TENSORS]
        dev = tensors[0].get_device()
        if dev < 0 or not all(t.is_contiguous() and t.get_device() == dev for t in tensors):
            return None
        ent = cls()
        ent.ef, ent.ef_min, ent.ef_max, ent.win_idx, ent.win_val = tensors
        ent.layout, ent.dev = lay, dev
        ent.fields = [t.data_ptr() for t in tensors] + [lay.n, lay.k_total, lay.k_last]  # F_EF .. F_K_LAST
        ent.blocks = (lay.topk_block, lay.k_block, lay.quant_block, lay.m)  # of the launch group's key
        ent.two = not _one_pass(module, lay.n, lay.topk_block, lay.quant_block)  # the EF's second pass
        ent.n_topk_blocks, ent.n_quant_blocks = lay.n_topk_blocks, lay.n_quant_blocks
        return ent


def run_cuda(module, jobs: list, hp: StepHyper, fallback: Callable,
             go: torch.Tensor | None = None) -> Callable[..., None] | None:
    """Runner: one fused step for every job (see module docstring).

    Launches go out while the later jobs' records are still being built: a group is
    launched once it holds FIRST_LAUNCH_BLOCKS top-k blocks, then at 4x as many each
    time. When step() starts on an idle GPU (after a host sync, e.g. the non-finite
    check), the GPU waits only for the first launch instead of the whole host path, and a
    step makes about 1 + log4(its top-k blocks / FIRST_LAUNCH_BLOCKS) launches per group.
    Every tensor's update reads only its own tensors, so how they are split into launches
    does not change any result. The records carry each job's new step (its counter + 1);
    the counters are advanced after the launches, while the GPU runs them.

    `go`: a one-element bool tensor on the jobs' device, or None. Given, its address goes in
    every record (F_GO); each block of the step's kernels reads it with its record and does
    nothing when it is false (the gradient check, computed on
    the GPU, failed), and the runner returns `finish` instead of finishing: the caller calls
    it once the check has passed, to advance the step counters and run the jobs the kernels
    could not take through the fallback; if the check failed it is not called, and nothing
    has changed. So the host plans and launches while the GPU checks (optim.py step()).

    `go` may also hold one flag per job (len(jobs) > 1 elements, contiguous): job i's records
    read flag i, and `finish(ok)` takes the host copy of the flags (a list of bools) and
    finishes only the jobs whose flag is true (step_in_backward's per-tensor skip, backward.py).
    """
    pending: dict[tuple, list] = {}  # key -> [(job, entry, index in jobs) not launched yet, their top-k blocks, launch at]
    # finish() keeps the step counters of the jobs the kernels took, not the jobs: the caller
    # may free their gradients while it waits (step_in_backward frees each group's at once).
    rest, taken = [], []  # (index, job) the kernels cannot take; (index, step counter) they took
    for i, job in enumerate(jobs):
        ent = _entry(job, module)
        if ent is None:
            rest.append((i, job))
            continue
        taken.append((i, job.state["step"]))
        key = (ent.dev, job.param.dtype, job.grad.dtype, ent.blocks)
        slot = pending.get(key)
        if slot is None:
            pending[key] = slot = [[], 0, FIRST_LAUNCH_BLOCKS or 1 << 62]
        slot[0].append((job, ent, i))
        slot[1] += ent.n_topk_blocks
        if slot[1] >= slot[2]:
            _launch_group(module, slot[0], hp, go)
            slot[0], slot[1], slot[2] = [], 0, 4 * slot[2]
    for group, _, _ in pending.values():
        if group:
            _launch_group(module, group, hp, go)

    def finish(ok: list[bool] | None = None) -> None:
        # ok: one flag per job; finish those whose flag was true (None: all).
        counters = [step for i, step in taken if ok is None or ok[i]]
        if counters:
            torch._foreach_add_(counters, 1)  # ops.advance_steps, on the counters alone
        late = [job for i, job in rest if ok is None or ok[i]]
        if late:
            fallback(late, hp)  # advances its jobs' steps itself

    if go is not None:
        return finish
    finish()
    return None


def _launch_group(module, group: list, hp: StepHyper, go: torch.Tensor | None) -> None:
    for batch in _workspace_batches(group):
        _launch(module, batch, hp, go)


@functools.lru_cache(maxsize=4096)
def _one_pass(module, n: int, topk_block: int, quant_block: int) -> bool:
    return bool(module.one_pass(n, topk_block, quant_block))


def _workspace_batches(group: list):
    """Split a group of (job, entry, index) so that each launch's second-pass workspace
    stays within WORKSPACE_BYTES."""
    batch, used = [], 0
    for item in group:
        ent = item[1]
        need = 8 * ent.n_quant_blocks if ent.two else 0
        if batch and used + need > WORKSPACE_BYTES:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += need
    if batch:
        yield batch


@functools.lru_cache(maxsize=64)
def _beta_powers(beta1: float, beta2: float, m: int, device: torch.device) -> torch.Tensor:
    # beta^age in float64, rounded to float32, exactly as reference.window_moments does.
    ages = torch.arange(m, dtype=torch.float64)
    return torch.cat([(beta1 ** ages).to(torch.float32), (beta2 ** ages).to(torch.float32)]).to(device)


@functools.lru_cache(maxsize=256)
def _coef_bits(beta1: float, beta2: float, step: int) -> int:
    c1 = (1.0 - beta1) / (1.0 - beta1 ** step)
    c2 = (1.0 - beta2) / (1.0 - beta2 ** step)
    return struct.unpack("<q", struct.pack("<ff", c1, c2))[0]


assert (F_N, F_START, F_WS, F_GO, REC) == (7, 10, 13, 14, 16), "the record literal of _launch follows these fields"


def _launch(module, batch: list, hp: StepHyper, go: torch.Tensor | None) -> None:
    job0 = batch[0][0]
    lay0 = job0.layout
    device = job0.param.device
    flat, rows2 = [], []  # the records of table, one after another; those of table2
    start = chunks = ws_off = 0
    chunk2 = module.CHUNK2  # elements per pass-2 block, as built
    b1, b2 = hp.beta1, hp.beta2
    go_ptr = go.data_ptr() if go is not None else 0
    go_stride = go.element_size() if go is not None and go.numel() > 1 else 0  # one flag per job
    for job, ent, i in batch:
        step = int(job.state["step"]) + 1  # the step this launch takes (advanced after it)
        # Fields in the order of F_PARAM .. F_GO, then the reserved one (REC in all).
        rec = [job.param.data_ptr(), job.grad.data_ptr(), *ent.fields, start, step,
               _coef_bits(b1, b2, step), -1, go_ptr + i * go_stride, 0]
        if ent.two:
            rec[F_WS] = ws_off
            ws_off += ent.n_quant_blocks
            rec2 = rec.copy()
            rec2[F_START] = chunks
            chunks += -(-rec[F_N] // chunk2)
            rows2.append(rec2)
        start += ent.n_topk_blocks
        flat += rec
    ntensors = len(batch)
    # Both tables in one host-to-device copy (table2 holds one dummy record when empty).
    for rec2 in rows2 or [[0] * REC]:
        flat += rec2
    both = _to_device(flat, device)
    table, table2 = both[:REC * ntensors], both[REC * ntensors:]
    ws = torch.empty(2 * max(ws_off, 1), dtype=torch.float32, device=device)
    wd = float(hp.weight_decay)
    module.step(table, ntensors, start, table2, len(rows2), chunks,
                _beta_powers(float(b1), float(b2), lay0.m, device), ws,
                lay0.topk_block, lay0.k_block, lay0.quant_block, lay0.m,
                float(hp.lr), float(1.0 - hp.lr * wd), wd != 0.0, float(hp.eps),
                hp.ef_rounding == "stochastic", wd != 0.0 or float(hp.eps) == 0.0,
                DTYPES[job0.param.dtype], DTYPES[job0.grad.dtype], float(hp.alpha))


def gradient_flags(module, grads: list, device: torch.device) -> torch.Tensor | None:
    """len(grads) + 1 bools on `device`: whether each gradient is finite, then whether all
    are (the step's `go`); one multi-tensor read of the gradients (csrc/nonfinite.cu). None
    when the kernel cannot read them: a non-contiguous gradient or another dtype."""
    flat, chunks, chunk = [], 0, module.CHECK_CHUNK
    for g in grads:
        dt = DTYPES.get(g.dtype)
        if dt is None or not g.is_contiguous():
            return None
        nbytes = g.numel() * g.element_size()  # > 0: empty gradients are not checked
        flat += (g.data_ptr(), nbytes, dt, chunks)
        chunks += -(-nbytes // chunk)
    flags = torch.ones(len(grads) + 1, dtype=torch.bool, device=device)
    module.nonfinite(_to_device(flat, device), len(grads), chunks, flags)
    return flags


def _to_device(flat: list, device: torch.device) -> torch.Tensor:
    # Through array('q') and frombuffer: a third of torch.tensor's time on nested lists.
    host = torch.frombuffer(array.array("q", flat), dtype=torch.int64)
    return host.pin_memory().to(device, non_blocking=True)
