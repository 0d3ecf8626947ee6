"""How a flat shard of n elements splits into top-k blocks and quant blocks.

Both kinds of block tile the shard from its first element; the last block of each
kind may be partial. Nothing here crosses a shard boundary, which is why a step
needs no communication and why a checkpoint is tied to its layout.

State of one shard (all allocated by the optimizer, counted by `state_bytes`):

| key       | dtype    | shape            | where        |
| --------- | -------- | ---------------- | ------------ |
| step      | int64    | ()               | CPU          |
| layout    | int64    | (7,)             | CPU          |
| ef        | uint8    | (ceil(n/2),)     | param device |
| ef_min    | float32  | (n_quant_blocks,)| param device |
| ef_max    | float32  | (n_quant_blocks,)| param device |
| win_idx   | int16    | (m, k_total)     | param device |
| win_val   | bfloat16 | (m, k_total)     | param device |
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from .config import MicroAdamConfig, topk_count

LAYOUT_VERSION = 1
# State keys in a fixed order; kernels and checkpoints rely on the names.
TENSOR_KEYS = ("ef", "ef_min", "ef_max", "win_idx", "win_val")
STATE_KEYS = ("step", "layout") + TENSOR_KEYS


@dataclasses.dataclass(frozen=True)
class Layout:
    """Block structure of one shard.

    n: elements in the shard; topk_block, quant_block: block sizes in elements;
    k_block: entries kept per full top-k block; k_last: entries kept in the last
    top-k block (ceil(density * its length), == k_block when it is full); m: window rows.
    """

    n: int
    topk_block: int
    k_block: int
    k_last: int
    quant_block: int
    m: int
    version: int = LAYOUT_VERSION

    @classmethod
    def for_numel(cls, n: int, config: MicroAdamConfig) -> "Layout":
        n = int(n)
        nb = -(-n // config.topk_block)
        last_len = n - (nb - 1) * config.topk_block if n else 0
        return cls(n=n, topk_block=config.topk_block, k_block=config.k_per_block,
                   k_last=topk_count(config.density, last_len),
                   quant_block=config.quant_block, m=config.m)

    # -- derived sizes ---------------------------------------------------------
    @property
    def n_topk_blocks(self) -> int:
        return -(-self.n // self.topk_block)


    @property
    def k_total(self) -> int:
        """Window entries per row: k_block for each full block, k_last for the last."""
        if self.n == 0:
            return 0
        return (self.n_topk_blocks - 1) * self.k_block + self.k_last

    @property
    def n_quant_blocks(self) -> int:
        return -(-self.n // self.quant_block)

    @property
    def ef_bytes(self) -> int:
        return (self.n + 1) // 2

    def block_k(self) -> torch.Tensor:
        """k of every top-k block, int64 (n_topk_blocks,)."""
        k = torch.full((self.n_topk_blocks,), self.k_block, dtype=torch.int64)
        if self.n_topk_blocks:
            k[-1] = self.k_last
        return k

    # -- state ---------------------------------------------------------------
    def state_bytes(self) -> int:
        """Exact bytes of the state the optimizer allocates for this shard."""
        if self.n == 0:
            return 0
        return (8 + 8 * 7                      # step, layout
                + self.ef_bytes                 # 4-bit codes
                + 2 * 4 * self.n_quant_blocks   # fp32 min and max per quant block
                + self.m * self.k_total * (2 + 2))  # int16 index + bf16 value

    def new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Zero state: EF decodes to 0 (min = max = 0); empty window rows hold value 0."""
        return {
            "step": torch.zeros((), dtype=torch.int64),
            "layout": self.to_tensor(),
            "ef": torch.zeros(self.ef_bytes, dtype=torch.uint8, device=device),
            "ef_min": torch.zeros(self.n_quant_blocks, dtype=torch.float32, device=device),
            "ef_max": torch.zeros(self.n_quant_blocks, dtype=torch.float32, device=device),
            "win_idx": torch.zeros(self.m, self.k_total, dtype=torch.int16, device=device),
            "win_val": torch.zeros(self.m, self.k_total, dtype=torch.bfloat16, device=device),
        }

    def expected_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {
            "step": (torch.int64, ()),
            "layout": (torch.int64, (7,)),
            "ef": (torch.uint8, (self.ef_bytes,)),
            "ef_min": (torch.float32, (self.n_quant_blocks,)),
            "ef_max": (torch.float32, (self.n_quant_blocks,)),
            "win_idx": (torch.int16, (self.m, self.k_total)),
            "win_val": (torch.bfloat16, (self.m, self.k_total)),
        }

    # -- (de)serialisation -------------------------------------------------------
    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.version, self.n, self.topk_block, self.k_block,
                             self.k_last, self.quant_block, self.m], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Layout":
        v = [int(x) for x in t.reshape(-1).tolist()]
        if len(v) != 7:
            raise ValueError(f"a MicroAdam layout tensor has 7 entries, got {len(v)}: {v}")
        version, n, topk_block, k_block, k_last, quant_block, m = v
        return cls(n=n, topk_block=topk_block, k_block=k_block, k_last=k_last,
                   quant_block=quant_block, m=m, version=version)

    def describe(self) -> str:
        return (f"n={self.n}, topk_block={self.topk_block}, k_block={self.k_block}, k_last={self.k_last}, "
                f"quant_block={self.quant_block}, m={self.m}, version={self.version}")


def state_bytes(numel: int | Iterable[int], **hyperparams) -> int:
    """Exact optimizer-state bytes for shards of `numel` elements (an int or a list).

    Accepts the same hyper-parameters as `MicroAdam` (only m, density, topk_block
    and quant_block change the size). Equals what the optimizer allocates.
    """
    config = MicroAdamConfig.from_kwargs(**hyperparams)
    sizes = [numel] if isinstance(numel, int) else list(numel)
    total = 0
    for n in sizes:
        if int(n) < 0:
            raise ValueError(f"Invalid numel: {n}; expected an integer >= 0")
        total += Layout.for_numel(int(n), config).state_bytes()
    return total
