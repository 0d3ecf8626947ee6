"""The fused CUDA backend: builds launch tables and calls the kernels of csrc/.

`resolve(name, device, run_reference)` is called by `ops.select_backend` and returns
("cuda", runner) when the extension loads, else ("reference", run_reference) with one
warning (backend="auto") or a RuntimeError (backend="cuda").

A runner call groups the jobs by (param dtype, grad dtype, block sizes, m) and makes
one launch table per group: a step costs a handful of kernel launches per group, not
one per tensor. Jobs the kernels cannot take (non-contiguous tensors, other dtypes)
run through the reference.
"""

from __future__ import annotations

import functools
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
F_PARAM, F_GRAD, F_EF, F_EF_MIN, F_EF_MAX, F_WIN_IDX, F_WIN_VAL, F_N, F_K_TOTAL, F_K_LAST, \
    F_START, F_STEP, F_COEF, F_WS = range(14)

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


def _kernel_can_take(job) -> bool:
    # Written out (no generator): this runs for every tensor of every step, on the host
    # time during which the GPU waits for the launch.
    p, g, st = job.param, job.grad, job.state
    if p.dtype not in DTYPES or g.dtype not in DTYPES or not p.is_cuda:
        return False
    if not (p.is_contiguous() and g.is_contiguous()):
        return False
    dev = p.get_device()  # an index (cheaper than torch.device objects); p is on CUDA
    if g.get_device() != dev:
        return False
    for k in _STATE_TENSORS:
        t = st[k]
        if not t.is_contiguous() or t.get_device() != dev:
            return False
    return True


def run_cuda(module, jobs: list, hp: StepHyper, fallback: Callable) -> None:
    """Runner: one fused step for every job (see module docstring)."""
    groups: dict[tuple, list] = {}
    rest = []
    for job in jobs:
        if not _kernel_can_take(job):
            rest.append(job)
            continue
        lay = job.layout
        key = (job.param.device, job.param.dtype, job.grad.dtype, lay.topk_block, lay.k_block,
               lay.quant_block, lay.m)
        groups.setdefault(key, []).append(job)
    for key, group in groups.items():
        for batch in _workspace_batches(module, group):
            _launch(module, batch, hp)
    if rest:
        fallback(rest, hp)


@functools.lru_cache(maxsize=4096)
def _one_pass(module, n: int, topk_block: int, quant_block: int) -> bool:
    return bool(module.one_pass(n, topk_block, quant_block))


def _needs_second_pass(module, lay: Layout) -> bool:
    return not _one_pass(module, lay.n, lay.topk_block, lay.quant_block)


def _workspace_batches(module, group: list):
    """Split a group so that each launch's second-pass workspace stays within WORKSPACE_BYTES.
    Yields lists of (job, needs the second pass)."""
    batch, used = [], 0
    for job in group:
        two = _needs_second_pass(module, job.layout)
        need = 8 * job.layout.n_quant_blocks if two else 0
        if batch and used + need > WORKSPACE_BYTES:
            yield batch
            batch, used = [], 0
        batch.append((job, two))
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


assert (F_N, F_START, F_WS, REC) == (7, 10, 13, 16), "the record literal of _launch follows these fields"


def _launch(module, batch: list, hp: StepHyper) -> None:
    job0 = batch[0][0]
    lay0 = job0.layout
    device = job0.param.device
    rows, rows2 = [], []
    start = chunks = ws_off = 0
    chunk2 = module.CHUNK2  # elements per pass-2 block, as built
    b1, b2 = hp.beta1, hp.beta2
    for job, two in batch:
        lay, st = job.layout, job.state
        step = int(st["step"])
        # Fields in the order of F_PARAM .. F_WS, then the two reserved ones (REC in all).
        rec = [job.param.data_ptr(), job.grad.data_ptr(), st["ef"].data_ptr(), st["ef_min"].data_ptr(),
               st["ef_max"].data_ptr(), st["win_idx"].data_ptr(), st["win_val"].data_ptr(),
               lay.n, lay.k_total, lay.k_last, start, step, _coef_bits(b1, b2, step), -1, 0, 0]
        if two:
            rec[F_WS] = ws_off
            ws_off += lay.n_quant_blocks
            rec2 = rec.copy()
            rec2[F_START] = chunks
            chunks += -(-lay.n // chunk2)
            rows2.append(rec2)
        start += lay.n_topk_blocks
        rows.append(rec)
    # Both tables in one host-to-device copy (table2 holds one dummy record when empty).
    both = _to_device(rows + (rows2 or [[0] * REC]), device)
    table, table2 = both[:REC * len(rows)], both[REC * len(rows):]
    ws = torch.empty(2 * max(ws_off, 1), dtype=torch.float32, device=device)
    wd = float(hp.weight_decay)
    module.step(table, len(rows), start, table2, len(rows2), chunks,
                _beta_powers(float(b1), float(b2), lay0.m, device), ws,
                lay0.topk_block, lay0.k_block, lay0.quant_block, lay0.m,
                float(hp.lr), float(1.0 - hp.lr * wd), wd != 0.0, float(hp.eps),
                hp.ef_rounding == "stochastic", wd != 0.0 or float(hp.eps) == 0.0,
                DTYPES[job0.param.dtype], DTYPES[job0.grad.dtype])


def _to_device(rows: list, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=torch.int64).reshape(-1)
    return host.pin_memory().to(device, non_blocking=True)
