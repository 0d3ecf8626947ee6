"""Shared pieces of the DeepSpeed test workers: a tiny model, its data, JSON configs, snapshots.

The workers run under torchrun on the CPU with gloo; they write what they observed
to torch files and the tests (tests/test_deepspeed*.py) assert on them.
"""

from __future__ import annotations

import os

import torch

# Small blocks so that even this tiny model has several top-k and quant blocks per
# partition, with partial last blocks.
HYPER = {"lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01, "m": 4,
         "density": 0.1, "topk_block": 64, "quant_block": 32, "alpha": 0.1, "backend": "reference"}
D_IN, D_HID, D_OUT = 13, 37, 5
MICRO_BATCH = 4


class Tiny(torch.nn.Module):
    """708 parameters in 4 tensors: two weight matrices, two biases."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(D_IN, D_HID)
        self.fc2 = torch.nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        return torch.nn.functional.mse_loss(out.float(), y.float())


def make_model(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups (weights with decay, biases without) so ZeRO cuts two flat partitions."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def batch(seed: int, step: int, rank: int, micro: int = 0, dtype=torch.float32):
    """Deterministic micro-batch for (seed, optimizer step, rank, micro step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank * 101 + micro)
    x = torch.randn(MICRO_BATCH, D_IN, generator=g)
    y = torch.randn(MICRO_BATCH, D_OUT, generator=g)
    return x.to(dtype), y.to(dtype)


def ds_config(stage: int, dtype: str = "fp32", accum: int = 1, clip: float = 0.0, scheduler: bool = False,
              sub_group_size: int = 100, **extra_params) -> dict:
    params = dict(HYPER)
    params.update(extra_params)
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": accum,
        "optimizer": {"type": "MicroAdam", "params": params},
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if stage == 3:
        # Partition every param (no persistent ones) and cut several sub-groups.
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                         "sub_group_size": sub_group_size})
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                           "warmup_num_steps": 4, "warmup_type": "linear"}}
    return cfg


def train_steps(engine, seed: int, steps: range, rank: int, accum: int = 1) -> list[float]:
    """Run whole optimizer steps (accum micro-batches each) on deterministic data."""
    dtype = next(engine.module.parameters()).dtype
    losses = []
    for step in steps:
        for micro in range(accum):
            x, y = batch(seed, step, rank, micro, dtype)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
    return losses


def optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors MicroAdam steps, in metadata order (ZeRO-3: every sub-group's flat partition)."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return list(opt.fp32_partitioned_groups_flat)
    return [p for g in engine.basic_optimizer.param_groups for p in g["params"]]


def snapshot(engine) -> dict:
    """Deep copy of master tensors, MicroAdam state and low-precision params (bitwise comparisons)."""
    state = engine.basic_optimizer.state
    tensors = optimizer_tensors(engine)
    out = {"master": [t.detach().clone() for t in tensors],
           "state": [{k: v.detach().clone() for k, v in state[t].items()} if t in state else {}
                     for t in tensors],
           "module": [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]}
    return out


def same(a, b) -> bool:
    """Bitwise equality of two nested snapshots."""
    if isinstance(a, torch.Tensor):
        def raw(t):
            return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(raw(a), raw(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered under ZeRO-3), fp32, keyed by name."""
    import deepspeed

    params = list(engine.module.named_parameters())
    if hasattr(params[0][1], "ds_id"):
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().float().clone() for n, p in params}
    return {n: p.detach().float().clone() for n, p in params}


def init_gloo() -> None:
    """deepspeed.init_distributed on gloo, without DeepSpeed's CPU shared-memory all-reduce.

    That op is JIT-compiled on first use (~80 s on 2 cores) and only speeds up CPU
    collectives; gloo does the same job, and the tests stay fast on a clean machine.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def rank_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
