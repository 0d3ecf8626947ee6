"""The executable specification of one MicroAdam step (pure PyTorch, any device).

Every function follows docs/algorithm.md line by line; the CUDA kernels are tested
against these functions, and these are tested against a float64 oracle. Arithmetic
is float32 in the order the document gives, so that a kernel that performs the
same operations reproduces the EF codes exactly (nearest rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..layout import Layout

QLEVELS = 15  # 4-bit codes 0..15


class StepHyper(NamedTuple):
    """Per-group scalars of one step (python floats; step is the 1-based t after increment)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    ef_rounding: str
    alpha: float = 0.0


# -- error feedback: 4-bit asymmetric quantization per quant block -----------------------

def unpack_codes(ef: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n/2),) -> int64 codes (n,): element 2j is the low nibble of byte j."""
    codes = torch.stack([ef & 0x0F, ef >> 4], dim=1).reshape(-1)
    return codes[:n].to(torch.int64)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int codes (n,) in [0, 15] -> uint8 (ceil(n/2),); the unused high nibble of an odd n is 0."""
    n = codes.numel()
    c = codes.to(torch.uint8)
    if n % 2:
        c = torch.cat([c, c.new_zeros(1)])
    c = c.view(-1, 2)
    return c[:, 0] | (c[:, 1] << 4)


def _per_element(stat: torch.Tensor, n: int, quant_block: int) -> torch.Tensor:
    return stat.repeat_interleave(quant_block)[:n]


def dequantize_ef(ef: torch.Tensor, ef_min: torch.Tensor, ef_max: torch.Tensor,
                  n: int, quant_block: int) -> torch.Tensor:
    """Q^-1: float32 (n,) with x = min + code * ((max - min) / 15)."""
    codes = unpack_codes(ef, n).to(torch.float32)
    lo = _per_element(ef_min, n, quant_block)
    scale = _per_element((ef_max - ef_min) / QLEVELS, n, quant_block)
    return lo + codes * scale


def hash_uniform(step: int, n: int, device: torch.device) -> torch.Tensor:
    """Counter-based uniform numbers in [0, 1) for element indices 0..n-1 at `step`.

    xi(t, i) = lowbias32((i mod 2^32) * 0x9E3779B1 + t * 0x85EBCA77 mod 2^32) >> 8, times 2^-24.
    A pure function of (t, i): stochastic rounding is reproducible across resumes
    and identical in the CUDA kernel.
    """
    mask = 0xFFFFFFFF
    i = torch.arange(n, dtype=torch.int64, device=device) & mask
    x = (i * 0x9E3779B1 + (int(step) * 0x85EBCA77 & mask)) & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (2.0 ** -24)


def quantize_ef(a: torch.Tensor, quant_block: int, rounding: str, step: int):
    """Q: float32 (n,) -> (uint8 codes (ceil(n/2),), min (nq,), max (nq,)).

    Per quant block: lo, hi = min, max; scale = (hi - lo) / 15;
    code = clamp(rint((x - lo) / scale), 0, 15) (nearest, ties to even) or
    clamp(floor((x - lo) / scale + xi), 0, 15) (stochastic); code = 0 where scale == 0.
    """
    n = a.numel()
    nq = -(-n // quant_block)
    pad = nq * quant_block - n
    blocks = torch.nn.functional.pad(a, (0, pad)).view(nq, quant_block)
    if pad:
        # Padding must not widen the last block's range: fill with one of its own values.
        blocks[-1, quant_block - pad:] = blocks[-1, 0]
    lo = blocks.amin(dim=1)
    hi = blocks.amax(dim=1)
    scale = (hi - lo) / QLEVELS
    q = (a - _per_element(lo, n, quant_block)) / _per_element(scale, n, quant_block)
    if rounding == "nearest":
        codes = torch.round(q)
    else:
        codes = torch.floor(q + hash_uniform(step, n, a.device))
    codes = codes.clamp_(0, QLEVELS)
    codes = torch.where(_per_element(scale, n, quant_block) > 0, codes, torch.zeros_like(codes))
    return pack_codes(codes), lo, hi


# -- top-k per block --------------------------------------------------------------

def select_topk(a: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest-|a| entries of every top-k block; ties go to the lower index.

    Returns (global indices int64 (k_total,), block-local indices int64 (k_total,)),
    block after block, ascending within a block.
    """
    n, bsz = layout.n, layout.topk_block
    nb = layout.n_topk_blocks
    pad = nb * bsz - n
    mag = torch.nn.functional.pad(a.abs(), (0, pad), value=-1.0).view(nb, bsz)
    # A stable descending sort keeps equal magnitudes in index order: ties -> lower index.
    order = torch.sort(mag, dim=1, descending=True, stable=True).indices[:, : layout.k_block]
    local = torch.sort(order, dim=1).values
    if layout.k_last < layout.k_block:
        last = torch.sort(order[-1, : layout.k_last]).values
        local = torch.cat([local[:-1].reshape(-1), last])
    else:
        local = local.reshape(-1)
    block_of = torch.repeat_interleave(
        torch.arange(nb, device=a.device), layout.block_k().to(a.device))
    return block_of * bsz + local, local


def window_ages(step: int, m: int) -> list[int]:
    """Age of each window row at 1-based step t: row (t-1) mod m was written now (age 0)."""
    return [(step - 1 - r) % m for r in range(m)]


def window_positions(win_idx: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Global positions (m, k_total) int64 of the block-local indices in the window."""
    block_of = torch.repeat_interleave(
        torch.arange(layout.n_topk_blocks, device=win_idx.device),
        layout.block_k().to(win_idx.device))
    return block_of * layout.topk_block + win_idx.to(torch.int64)


# -- the step -----------------------------------------------------------------------

def compress_(grad: torch.Tensor, state: dict, layout: Layout, step: int, rounding: str) -> None:
    """Lines 5-10 of Algorithm 1: EF add, top-k into window row (t-1) mod m, zero, requantize."""
    n = layout.n
    a = grad.reshape(-1).to(torch.float32) + dequantize_ef(
        state["ef"], state["ef_min"], state["ef_max"], n, layout.quant_block)
    glob, local = select_topk(a, layout)
    row = (step - 1) % layout.m
    state["win_idx"][row].copy_(local.to(torch.int16))
    state["win_val"][row].copy_(a[glob].to(torch.bfloat16))
    a[glob] = 0.0
    ef, lo, hi = quantize_ef(a, layout.quant_block, rounding, step)
    state["ef"].copy_(ef)
    state["ef_min"].copy_(lo)
    state["ef_max"].copy_(hi)


def window_moments(state: dict, layout: Layout, step: int, beta1: float, beta2: float):
    """Lines 11-12: m_hat, v_hat float32 (n,) rebuilt from the window.

    m_hat = (1-b1)/(1-b1^t) * sum_r b1^age_r V_r, v_hat = (1-b2)/(1-b2^t) * sum_r b2^age_r V_r^2;
    coefficients are computed in float64 and rounded to float32.
    """
    n, m = layout.n, layout.m
    pos = window_positions(state["win_idx"], layout)
    val = state["win_val"].to(torch.float32)
    ages = torch.tensor(window_ages(step, m), dtype=torch.float64)
    w1 = (beta1 ** ages).to(torch.float32).to(val.device).unsqueeze(1)
    w2 = (beta2 ** ages).to(torch.float32).to(val.device).unsqueeze(1)
    acc1 = torch.zeros(n, dtype=torch.float32, device=val.device)
    acc2 = torch.zeros(n, dtype=torch.float32, device=val.device)
    acc1.index_add_(0, pos.reshape(-1), (w1 * val).reshape(-1))
    acc2.index_add_(0, pos.reshape(-1), (w2 * (val * val)).reshape(-1))
    c1 = float((1.0 - beta1) / (1.0 - beta1 ** step))
    c2 = float((1.0 - beta2) / (1.0 - beta2 ** step))
    return acc1 * c1, acc2 * c2


def update_(param: torch.Tensor, m_hat: torch.Tensor, v_hat: torch.Tensor, hp: StepHyper) -> None:
    """Line 13 with decoupled weight decay: theta <- theta*(1 - lr*wd) - lr * m_hat/(sqrt(v_hat)+eps)."""
    p = param.reshape(-1).to(torch.float32)
    if hp.weight_decay:
        p = p * float(1.0 - hp.lr * hp.weight_decay)
    p = p - float(hp.lr) * (m_hat / (torch.sqrt(v_hat) + float(hp.eps)))
    param.copy_(p.view_as(param))


def feed_back_ef_(param: torch.Tensor, state: dict, layout: Layout, hp: StepHyper) -> None:
    """Step 7 (alpha > 0): theta <- theta - lr*(alpha*e), e = Q^-1 of the EF just written;
    then the EF ranges are scaled by float32(1 - alpha), so the EF decodes to (1 - alpha)*e."""
    e = dequantize_ef(state["ef"], state["ef_min"], state["ef_max"], layout.n, layout.quant_block)
    p = param.reshape(-1).to(torch.float32)
    p = p - float(hp.lr) * (float(hp.alpha) * e)
    param.copy_(p.view_as(param))
    keep = float(1.0 - hp.alpha)
    state["ef_min"].mul_(keep)
    state["ef_max"].mul_(keep)


def step_shard(param: torch.Tensor, grad: torch.Tensor, state: dict, layout: Layout,
               hp: StepHyper) -> None:
    """One MicroAdam step on one flat shard; state['step'] must already hold the new t."""
    step = int(state["step"])
    compress_(grad, state, layout, step, hp.ef_rounding)
    m_hat, v_hat = window_moments(state, layout, step, hp.beta1, hp.beta2)
    update_(param, m_hat, v_hat, hp)
    if hp.alpha:
        feed_back_ef_(param, state, layout, hp)
