"""Which part of the model each tensor of a DeepSpeed rank's MicroAdam covers.

MicroAdam's blocks tile the tensor the engine hands it (docs/algorithm.md), so a
checkpoint is only meaningful together with the map from those tensors back to
the model. `partition_metadata(engine)` records that map for one rank; it is saved
in every rank's optimizer state (`state_dict()["microadam"]["partition"]`) for the
reshard tool, and its `signature` decides whether a checkpoint loads as is.

Format (version 1), one dict per rank:

    {"format": 1, "engine": "deepspeed", "deepspeed_version": str,
     "zero_stage": 0..3,
     "partitioning": "none"      # stage 0: one tensor per parameter, replicated
                   | "flat"      # ZeRO-1/2 (and the BF16 optimizer): each param group is
                                 #   flattened (params in `pieces` order), padded to a
                                 #   multiple of the world size, and cut in equal slices
                   | "per_param" # ZeRO-3: every parameter is padded and sliced on its own;
                                 #   a sub-group's tensor concatenates this rank's slices
     "world_size": data-parallel size, "rank": this rank,
     "tensors": [  # in the order of the optimizer's param_groups / ZeRO-3 sub-groups
        {"group": param-group index, "sub_group": ZeRO-3 sub-group index or None,
         "numel": elements of the tensor (padding included),
         "global_offset": where the tensor starts in the padded flat group ("flat"), else 0,
         "group_numel": padded elements of the whole flat group ("flat"), else numel,
         "padding": elements of the tensor that belong to no parameter,
         "pieces": [{"name": parameter name, "shape": [...], "offset": start in this
                     tensor, "param_offset": start in the flattened parameter,
                     "length": elements}]}]}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

FORMAT = 1
_COMPARED = ("partitioning", "world_size", "numels")


def _rank(group: Any = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _world(group: Any = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _name(engine: Any, p: torch.Tensor) -> str:
    names = getattr(engine, "param_names", {}) or {}
    return names.get(p, f"<unnamed param {getattr(p, 'ds_id', id(p))}>")


def _tensor(group: int, sub_group: Any, numel: int, pieces: list[dict], global_offset: int = 0,
            group_numel: int | None = None) -> dict[str, Any]:
    covered = sum(pc["length"] for pc in pieces)
    return {"group": group, "sub_group": sub_group, "numel": int(numel), "global_offset": int(global_offset),
            "group_numel": int(numel if group_numel is None else group_numel),
            "padding": int(numel - covered), "pieces": pieces}


def _flat_pieces(engine: Any, params: list, offsets: list[int], start: int, size: int) -> list[dict]:
    """Pieces of the params laid out at `offsets` that fall in [start, start + size)."""
    out = []
    for p, off in zip(params, offsets):
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        lo, hi = max(off, start), min(off + n, start + size)
        if hi > lo:
            out.append({"name": _name(engine, p), "shape": list(p.shape), "offset": lo - start,
                        "param_offset": lo - off, "length": hi - lo})
    return out


def _cumulative(params: list) -> list[int]:
    offs, acc = [], 0
    for p in params:
        offs.append(acc)
        acc += p.numel()
    return offs


def partition_metadata(engine: Any) -> dict[str, Any]:
    """This rank's map from MicroAdam's tensors to the model (format in the module docstring)."""
    import deepspeed  # only called from a live engine

    opt = engine.optimizer
    stage = int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0
    tensors: list[dict[str, Any]] = []
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        kind = "flat"
        world = rank = None
        for i, part in enumerate(opt.single_partition_of_fp32_groups):
            pg = opt.real_dp_process_group[i]
            world, rank = _world(pg), _rank(pg)
            size, total = part.numel(), opt.bit16_groups_flat[i].numel()
            params = opt.round_robin_bit16_groups[i]
            offsets = list(getattr(opt, "round_robin_bit16_offsets", [None] * (i + 1))[i] or _cumulative(params))
            tensors.append(_tensor(i, None, size, _flat_pieces(engine, params, offsets, rank * size, size),
                                   rank * size, total))
    elif hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1, fp32 grad accumulation)
        kind = "flat"
        world = rank = None
        for i, part in enumerate(opt.fp32_groups_flat_partition):
            pg = opt.real_dp_process_group[i]
            world, rank = _world(pg), _rank(pg)
            size, total = part.numel(), opt.bf16_groups_flat[i].numel()
            params = opt.bf16_groups[i]
            tensors.append(_tensor(i, None, size, _flat_pieces(engine, params, _cumulative(params), rank * size, size),
                                   rank * size, total))
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        kind = "per_param"
        world, rank = _world(opt.dp_process_group), _rank(opt.dp_process_group)
        for sg, flat in enumerate(opt.fp32_partitioned_groups_flat):
            pieces, at = [], 0
            for p in opt.fp16_groups[sg]:
                pn = p.partition_numel()
                start = rank * pn
                length = max(0, min(pn, p.ds_numel - start))
                if length:
                    pieces.append({"name": _name(engine, p), "shape": list(p.ds_shape), "offset": at,
                                   "param_offset": start, "length": length})
                at += pn
            tensors.append(_tensor(int(opt.sub_group_to_group_id[sg]), sg, flat.numel(), pieces))
    else:  # stage 0: the basic optimizer holds the params (or fp32 copies of them) whole
        kind = "none"
        world, rank = _world(), _rank()
        low = getattr(opt, "fp16_groups", None)  # FP16_UnfusedOptimizer: fp32 copies of these
        for i, group in enumerate(engine.basic_optimizer.param_groups):
            for j, t in enumerate(group["params"]):
                p = low[i][j] if low is not None else t
                tensors.append(_tensor(i, j, t.numel(), [{"name": _name(engine, p), "shape": list(p.shape),
                                                          "offset": 0, "param_offset": 0, "length": t.numel()}]))
    return {"format": FORMAT, "engine": "deepspeed", "deepspeed_version": deepspeed.__version__,
            "zero_stage": stage, "partitioning": kind, "world_size": int(world or 1), "rank": int(rank or 0),
            "tensors": tensors}


def signature(meta: dict[str, Any]) -> dict[str, Any]:
    """What two ranks' states must share to be loaded into each other, plus the stage for messages.

    Replicated ("none") states do not depend on the world size. ZeRO-1 and ZeRO-2 cut the
    same flat partitions, so their checkpoints are interchangeable.
    """
    kind = meta["partitioning"]
    return {"zero_stage": meta["zero_stage"], "partitioning": kind,
            "world_size": None if kind == "none" else meta["world_size"],
            "numels": [t["numel"] for t in meta["tensors"]]}


def compatible(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _COMPARED)


def describe(sig: dict[str, Any]) -> str:
    """One line naming a signature: stage, partitioning, world size and tensor sizes."""
    numels = sig["numels"]
    shown = ", ".join(map(str, numels[:4])) + (f", ... ({len(numels)} tensors)" if len(numels) > 4 else "")
    ws = "any world size" if sig["world_size"] is None else f"data-parallel world size {sig['world_size']}"
    return (f"ZeRO stage {sig['zero_stage']}, {sig['partitioning']} partitioning, {ws}, "
            f"elements per rank tensor [{shown}]")


__all__ = ["partition_metadata", "signature", "compatible", "describe", "FORMAT"]
