"""FSDP2 wrapping shared by the workers in this folder (imported as a sibling module)."""

import torch

PRECISIONS = ("fp32", "mp", "bf16")


def shard_linears(model: torch.nn.Module, mesh, precision: str) -> torch.nn.Module:
    """fully_shard each Linear of `model` (a Sequential), then the model, on `mesh`.

    precision: "fp32" (fp32 params and compute), "mp" (fp32 params, bf16 compute through a
    MixedPrecisionPolicy, fp32 gradient reduction) or "bf16" (the model cast to bf16 first).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "mp" else MixedPrecisionPolicy())
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)
