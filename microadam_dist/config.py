"""Every MicroAdam hyper-parameter, validated once, with errors that name the field.

`MicroAdamConfig` is the one place that knows the allowed range of each
hyper-parameter. The optimizer, the DeepSpeed JSON glue and the checkpoint tools
all build one, so a bad value fails the same way wherever it enters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import torch

# Indices in the window are stored block-local as int16, so a top-k block can hold
# at most 2**15 elements (indices 0 .. 32767).
MAX_TOPK_BLOCK = 32768
MAX_WINDOW = 1024

EF_ROUNDINGS = ("nearest", "stochastic")
NONFINITE_MODES = ("skip", "raise", "off")
BACKENDS = ("auto", "reference", "cuda")

# Names used by the authors' package (ISTA-DASLab/MicroAdam) -> our names, so that
# its users can switch by changing one import.
ALIASES = {"k_init": "density", "quant_block_size": "quant_block"}


@dataclasses.dataclass(frozen=True)
class MicroAdamConfig:
    """MicroAdam hyper-parameters (see docs/configuration.md for each one's memory effect).

    lr, betas, eps, weight_decay: as in torch.optim.AdamW (decoupled weight decay).
    m: rows in the ring window of sparse gradients.
    density: fraction of each top-k block kept per step; k = ceil(density * topk_block).
    topk_block: elements per top-k block (<= 32768: indices are int16).
    quant_block: elements per 4-bit error-feedback quantization block.
    ef_rounding: "nearest" (default) or "stochastic" (unbiased) EF quantization.
    alpha: in [0, 1): each step also applies alpha * Q^-1(EF) and keeps (1 - alpha) of the EF
        (the authors' option of the same name; 0 = off).
    nonfinite: "skip" | "raise" | "off": what a step does with a NaN/Inf gradient.
    backend: "auto" (CUDA kernels for CUDA tensors when available), "reference", "cuda".
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    m: int = 10
    density: float = 0.01
    topk_block: int = 4096
    quant_block: int = 4096
    ef_rounding: str = "nearest"
    alpha: float = 0.0
    nonfinite: str = "skip"
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_real("lr", self.lr, low=0.0)
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2), each in [0, 1)")
        for i, b in enumerate(betas):
            try:
                _check_real(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)
            except ValueError as exc:
                raise ValueError(f"{exc} (betas={tuple(betas)!r})") from None
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        # > 0: entries outside the window have m_hat = v_hat = 0, and 0/(0 + eps) must be 0.
        _check_real("eps", self.eps, low=0.0, low_open=True)
        _check_real("weight_decay", self.weight_decay, low=0.0)
        _check_int("m", self.m, 1, MAX_WINDOW)
        _check_real("density", self.density, low=0.0, high=1.0, low_open=True)
        _check_int("topk_block", self.topk_block, 1, MAX_TOPK_BLOCK,
                   hint="block-local indices are stored as int16")
        _check_int("quant_block", self.quant_block, 1, 2**31 - 1)
        _check_choice("ef_rounding", self.ef_rounding, EF_ROUNDINGS)
        _check_alpha(self.alpha)
        _check_choice("nonfinite", self.nonfinite, NONFINITE_MODES)
        _check_choice("backend", self.backend, BACKENDS)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "MicroAdamConfig":
        """Build from keyword arguments, accepting the published package's aliases."""
        return cls(**normalize_kwargs(kwargs))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def k_per_block(self) -> int:
        """Entries kept per full top-k block: ceil(density * topk_block)."""
        return topk_count(self.density, self.topk_block)


def topk_count(density: float, length: int) -> int:
    """k for a block of `length` elements: ceil(density * length), at least 1.

    The product is rounded to 9 decimals first so that e.g. 0.01 * 3200 gives 32,
    not 33 through binary rounding of 0.01.
    """
    if length <= 0:
        return 0
    return max(1, min(length, math.ceil(round(density * length, 9))))


def normalize_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Map aliases to our names; reject unknown names and doubly given fields."""
    out: dict[str, Any] = {}
    allowed = MicroAdamConfig.field_names()
    for key, value in kwargs.items():
        name = ALIASES.get(key, key)
        if name not in allowed:
            raise ValueError(
                f"Unknown MicroAdam hyper-parameter {key!r}; accepted: "
                f"{', '.join(allowed)} (aliases: {', '.join(f'{a}->{b}' for a, b in ALIASES.items())})")
        if name in out:
            raise ValueError(f"MicroAdam hyper-parameter {name!r} given twice (as {name!r} and its alias)")
        out[name] = value
    return out


def _is_real(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real)


def _check_real(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    rng = f"{lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"
    if not _is_real(value):
        raise ValueError(f"Invalid {name}: {value!r}; expected a real number in {rng}")
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        raise ValueError(f"Invalid {name}: {value!r}; allowed range is {rng}")


def _check_alpha(value: Any) -> None:
    try:
        _check_real("alpha", value, low=0.0, high=1.0, high_open=True)
    except ValueError as exc:
        if _is_real(value) and float(value) == -2:
            # The authors' alpha = -2 adds the EF's quantization error to the update through a
            # float buffer of the param's size: the memory MicroAdam exists to save.
            raise ValueError(f"{exc} (alpha=-2, the published package's mode that keeps a dense "
                             "buffer of each param's size, is not supported)") from None
        raise


def _check_int(name: str, value: Any, low: int, high: int, hint: str = "") -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer in [{low}, {high}]{extra}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, choices))}")
