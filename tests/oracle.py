"""An independent float64 oracle of one MicroAdam step, written from docs/algorithm.md.

It imports nothing from microadam_dist: numpy only, loops over blocks, float64
arithmetic throughout. Tests compare the package against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def k_for(density: float, length: int) -> int:
    return max(1, min(length, math.ceil(round(density * length, 9))))


@dataclass
class OracleState:
    """Float64 picture of a shard's state.

    codes: int (n,) EF codes; qmin, qmax: (nq,); rows: m lists, one per window row, of
    (global indices int array, values float64 array) -- empty arrays for unwritten rows.
    """

    codes: np.ndarray
    qmin: np.ndarray
    qmax: np.ndarray
    rows: list
    t: int


def fresh_state(n: int, quant_block: int, m: int) -> OracleState:
    nq = -(-n // quant_block)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0))
    return OracleState(np.zeros(n, dtype=np.int64), np.zeros(nq), np.zeros(nq), [empty] * m, 0)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Element i is the low nibble of byte i//2 when i is even, the high nibble when odd."""
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        byte = int(packed[i // 2])
        out[i] = byte & 0xF if i % 2 == 0 else byte >> 4
    return out


def dequantize(st: OracleState, n: int, quant_block: int) -> np.ndarray:
    e = np.empty(n)
    for q in range(len(st.qmin)):
        s, stop = q * quant_block, min((q + 1) * quant_block, n)
        scale = (st.qmax[q] - st.qmin[q]) / 15.0
        e[s:stop] = st.qmin[q] + st.codes[s:stop] * scale
    return e


def topk_blocks(a: np.ndarray, topk_block: int, density: float) -> np.ndarray:
    """Global indices of the selected entries, block after block, ascending in a block."""
    n = a.size
    chosen = []
    for s in range(0, n, topk_block):
        blk = np.abs(a[s:s + topk_block])
        k = k_for(density, blk.size)
        # sort by (-|a|, index): the larger magnitude first, then the lower index
        order = sorted(range(blk.size), key=lambda i: (-blk[i], i))[:k]
        chosen.extend(sorted(s + i for i in order))
    return np.array(chosen, dtype=np.int64)


def quantize(a: np.ndarray, quant_block: int):
    """Nearest-rounding codes and per-block min/max, float64; also the exact (q) positions."""
    n = a.size
    nq = -(-n // quant_block)
    codes = np.zeros(n, dtype=np.int64)
    qpos = np.zeros(n)
    qmin, qmax = np.zeros(nq), np.zeros(nq)
    for q in range(nq):
        s, stop = q * quant_block, min((q + 1) * quant_block, n)
        lo, hi = a[s:stop].min(), a[s:stop].max()
        qmin[q], qmax[q] = lo, hi
        scale = (hi - lo) / 15.0
        if scale > 0:
            x = (a[s:stop] - lo) / scale
            qpos[s:stop] = x
            codes[s:stop] = np.clip(np.rint(x), 0, 15)
    return codes, qmin, qmax, qpos


@dataclass
class OracleResult:
    theta: np.ndarray
    a_before_zero: np.ndarray
    selected: np.ndarray
    a_after_zero: np.ndarray
    codes: np.ndarray
    qmin: np.ndarray
    qmax: np.ndarray
    qpos: np.ndarray
    m_hat: np.ndarray
    v_hat: np.ndarray


def step(theta: np.ndarray, g: np.ndarray, st: OracleState, *, lr, beta1, beta2, eps,
         weight_decay, m, density, topk_block, quant_block, alpha=0.0) -> OracleResult:
    """One step in float64; mutates `st` (codes, min/max, window, t) and returns the details.

    alpha > 0 (step 7): theta also loses lr * alpha * Q^-1(EF) of the EF just quantized, and
    the EF keeps (1 - alpha) of itself through its ranges (codes unchanged).

    The window stores the selected values unrounded (float64): a test that feeds the
    oracle the package's state each step replaces them with the stored bf16 values.
    """
    n = theta.size
    st.t += 1
    t = st.t
    a = g.astype(np.float64) + dequantize(st, n, quant_block)
    a_before = a.copy()
    sel = topk_blocks(a, topk_block, density)
    st.rows[(t - 1) % m] = (sel, a[sel].copy())
    a[sel] = 0.0
    codes, qmin, qmax, qpos = quantize(a, quant_block)
    st.codes, st.qmin, st.qmax = codes, qmin, qmax
    m_hat, v_hat = moments(st.rows, n, t, m, beta1, beta2)
    new = theta * (1.0 - lr * weight_decay) - lr * m_hat / (np.sqrt(v_hat) + eps)
    if alpha:
        new = new - lr * alpha * dequantize(st, n, quant_block)
        st.qmin, st.qmax = (1.0 - alpha) * qmin, (1.0 - alpha) * qmax
    return OracleResult(new, a_before, sel, a, codes, qmin, qmax, qpos, m_hat, v_hat)


def moments(rows, n: int, t: int, m: int, beta1: float, beta2: float):
    s1, s2 = np.zeros(n), np.zeros(n)
    for r, (idx, val) in enumerate(rows):
        age = (t - 1 - r) % m
        np.add.at(s1, idx, beta1 ** age * val)
        np.add.at(s2, idx, beta2 ** age * val * val)
    return (1 - beta1) / (1 - beta1 ** t) * s1, (1 - beta2) / (1 - beta2 ** t) * s2


def xi(t: int, i: int) -> float:
    """The documented counter hash (docs/algorithm.md, step 4), in plain Python ints."""
    mask = 0xFFFFFFFF
    x = ((i & mask) * 0x9E3779B1 + t * 0x85EBCA77) & mask
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    x ^= x >> 16
    return (x >> 8) * 2.0 ** -24


def launch_sizes(sizes: list[int], topk_block: int, first: int) -> list[int]:
    """Tensors per launch of one group under the documented policy (docs/paper.md): a launch
    once the pending tensors hold `first` top-k blocks, then 4x as many each time; the rest last."""
    out, pending, blocks, at = [], 0, 0, first
    for n in sizes:
        pending, blocks = pending + 1, blocks + -(-n // topk_block)
        if blocks >= at:
            out, pending, blocks, at = out + [pending], 0, 0, 4 * at
    return out + ([pending] if pending else [])
