"""Offline reshard of DeepSpeed ZeRO-3 checkpoints written with "type": "MicroAdam".

ZeRO-3 partitions every parameter on its own: a parameter of N elements is padded to
a multiple of the world size W and rank r holds elements [r·P, (r+1)·P) of it,
P = ceil(N / W). Within a param group the parameters are cut into *sub-groups*
(DeepSpeed's `_create_fp16_sub_groups`: params in order, a sub-group closes once its
summed P reaches `sub_group_size`), and MicroAdam steps one flat fp32 tensor per
sub-group and rank: the concatenation of that rank's slices of the sub-group's params
(the "per_param" partitioning of `integrations/ds_partitions.py`).

A checkpoint `SAVE_DIR/TAG` holds per rank `zero_pp_rank_{r}_mp_rank_00_model_states.pt`
(module placeholders, `param_shapes` per sub-group, `dp_world_size`) and
`[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, whose `optimizer_state_dict` has
`fp32_flat_groups` (one tensor per sub-group), `partition_count` and MicroAdam's
state_dict (state keyed by sub-group, partition metadata under `["microadam"]`).

Resharding works per param group. The old ranks' sub-group tensors, laid end to end,
form one index space; `reshard.materialize` reads their states there, `reshard.remap`
moves every element to its place in the new ranks' sub-group tensors (padding
elements, which belong to no parameter, are dropped and their window entries
counted), and `reshard.rebuild_shard` builds each new tensor's state, with the same
guarantee as every other reshard (docs/checkpoints.md). The fp32 master weights move
exactly. The new sub-groups are the ones DeepSpeed will build at the new world size
with `sub_group_size` (by default the one in the checkpoint's DeepSpeed config), so
the result loads with `engine.load_checkpoint` in a ZeRO-3 run of the new world size
with the same param groups, hyper-parameters and sub_group_size.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch

from .ds_files import config_of_group, model_file_zero3, optim_file, publish
from .io import CheckpointError
from .reshard import ReshardError, ReshardReport, ShardState, materialize, rebuild_shard, remap

DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default


def sub_groups(numels: list[int], world: int, sub_group_size: int) -> list[list[int]]:
    """Indices of a param group's params in each sub-group, as DeepSpeed cuts them at `world`."""
    parts = [-(-n // world) for n in numels]
    if not numels:
        return []
    if sub_group_size is None or sub_group_size >= sum(parts):
        return [list(range(len(numels)))]
    out, cur, size = [], [], 0
    for i, pn in enumerate(parts):
        cur.append(i)
        size += pn
        if size >= sub_group_size or i == len(numels) - 1:
            out.append(cur)
            cur, size = [], 0
    return out


def _params_of_group(metas: list[dict], gi: int) -> list[dict]:
    """The params of param group gi in DeepSpeed's order: [{"name", "shape", "numel"}].

    Rank 0 holds the first slice of every non-empty parameter, so its pieces list them
    all, in sub-group order and by offset inside each sub-group.
    """
    out = []
    for t in metas[0]["tensors"]:
        if t["group"] != gi:
            continue
        for pc in sorted(t["pieces"], key=lambda pc: pc["offset"]):
            out.append({"name": pc["name"], "shape": list(pc["shape"]),
                        "numel": int(torch.Size(pc["shape"]).numel())})
    return out


def _new_tables(params: list[dict], groups_idx: list[list[int]], world: int, gi: int, sg0: int) -> list[list[dict]]:
    """Partition metadata ("per_param" tensors) of every new rank for one param group."""
    tables: list[list[dict]] = [[] for _ in range(world)]
    for j, members in enumerate(groups_idx):
        for r in range(world):
            pieces, at = [], 0
            for i in members:
                n = params[i]["numel"]
                pn = -(-n // world)
                length = max(0, min(pn, n - r * pn))
                if length:
                    pieces.append({"name": params[i]["name"], "shape": params[i]["shape"], "offset": at,
                                   "param_offset": r * pn, "length": length})
                at += pn
            covered = sum(pc["length"] for pc in pieces)
            tables[r].append({"group": gi, "sub_group": sg0 + j, "numel": at, "global_offset": 0,
                              "group_numel": at, "padding": at - covered, "pieces": pieces})
    return tables


def _positions(tables: list[list[dict]], start: dict[str, int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """For tensors laid end to end (rank-major, then sub-group): each element's index in the
    group's real elements (params concatenated in order; -1 for padding), and each
    tensor's (offset, numel) in that end-to-end space."""
    ranges, at = [], 0
    for tabs in tables:
        for t in tabs:
            ranges.append((at, t["numel"]))
            at += t["numel"]
    where = torch.full((at,), -1, dtype=torch.int64)
    k = 0
    for tabs in tables:
        for t in tabs:
            off = ranges[k][0]
            for pc in t["pieces"]:
                lo = start[pc["name"]] + pc["param_offset"]
                where[off + pc["offset"]:off + pc["offset"] + pc["length"]] = torch.arange(lo, lo + pc["length"])
            k += 1
    return where, ranges


def reshard_zero3(folder: str, tag: str, dst: str, world: int, models: list[dict], sds: list[dict],
                  metas: list[dict], prefix: str, sub_group_size: int | None) -> ReshardReport:
    """ZeRO-3 checkpoint in `folder` (already read: per-rank model states `models`, optimizer
    files `sds`, partition metadata `metas`) -> `dst/tag` for `world` ranks."""
    osds = [sd["optimizer_state_dict"] for sd in sds]
    inner = [o["optimizer_state_dict"] for o in osds]
    if any("fp32_flat_groups" not in o for o in osds):
        raise CheckpointError(f"{folder}: ZeRO-3 optimizer files lack fp32_flat_groups")
    if "ds_zero_partition_groups" in osds[0]:
        raise ReshardError(f"{folder}: AutoEP partition groups are not supported")
    if any(m.get("frozen_param_fragments") for m in models):
        raise ReshardError(f"{folder}: frozen parameters (partitioned outside the optimizer) are not supported")
    if sub_group_size is None:
        zc = (models[0].get("ds_config") or {}).get("zero_optimization") or {}
        sub_group_size = int(zc.get("sub_group_size", DEFAULT_SUB_GROUP_SIZE))
    n_groups = len(inner[0]["param_groups"])
    total = ReshardReport()
    new_tables: list[list[dict]] = [[] for _ in range(world)]
    new_flats: list[list[torch.Tensor]] = [[] for _ in range(world)]
    new_states: list[dict] = [{} for _ in range(world)]
    group_params: list[list[int]] = []
    param_shapes: list[OrderedDict] = []
    sg = 0
    for gi in range(n_groups):
        params = _params_of_group(metas, gi)
        start, acc = {}, 0
        for p in params:
            start[p["name"]] = acc
            acc += p["numel"]
        # Old tensors of this group, end to end: rank-major, then sub-group (state key).
        old_tables = [[t for t in m["tensors"] if t["group"] == gi] for m in metas]
        old_where, old_ranges = _positions(old_tables, start)
        if int((old_where >= 0).sum()) != acc or int(torch.unique(old_where[old_where >= 0]).numel()) != acc:
            raise CheckpointError(f"{folder}: group {gi}: the ranks' pieces do not cover its {acc} elements once")
        keys = [(r, t["sub_group"]) for r, tabs in enumerate(old_tables) for t in tabs]
        flats = [osds[r]["fp32_flat_groups"][s].reshape(-1) for r, s in keys]
        if [f.numel() for f in flats] != [k for _, k in old_ranges]:
            raise CheckpointError(f"{folder}: group {gi}: fp32_flat_groups sizes {[f.numel() for f in flats]} "
                                  f"differ from the partition metadata {[k for _, k in old_ranges]}")
        old_flat = torch.cat(flats) if flats else torch.zeros(0)
        real = torch.zeros(acc, dtype=old_flat.dtype)
        real[old_where[old_where >= 0]] = old_flat[old_where >= 0]
        # New sub-groups and tensors.
        members = sub_groups([p["numel"] for p in params], world, sub_group_size)
        tables = _new_tables(params, members, world, gi, sg)
        new_where, new_ranges = _positions(tables, start)
        group_params.append(list(range(sg, sg + len(members))))
        param_shapes += [OrderedDict((params[i]["name"], torch.Size(params[i]["shape"])) for i in ms)
                         for ms in members]
        new_flat = torch.zeros(new_where.numel(), dtype=real.dtype)
        new_flat[new_where >= 0] = real[new_where[new_where >= 0]]
        states = [inner[r]["state"].get(s, {}) for r, s in keys]
        cfg = config_of_group(inner[0]["param_groups"][gi])
        mat = None
        if all(st for st, (_, k) in zip(states, old_ranges) if k):
            shards = [ShardState(off, k, st) for (off, k), st in zip(old_ranges, states)]
            whole = materialize(shards, old_where.numel())
            # Old element i goes to the new position of the real element it holds.
            target = torch.full_like(old_where, -1)
            live = old_where >= 0
            to_new = torch.empty(acc, dtype=torch.int64)
            to_new[new_where[new_where >= 0]] = torch.nonzero(new_where >= 0).reshape(-1)
            target[live] = to_new[old_where[live]]
            mat, dropped = remap(whole, target, new_where.numel())
            total.padding_dropped += dropped
        k = 0
        for r in range(world):
            for j, t in enumerate(tables[r]):
                off, numel = new_ranges[k]
                k += 1
                new_tables[r].append(t)
                new_flats[r].append(new_flat[off:off + numel].clone())
                if mat is not None and numel:
                    st, rep = rebuild_shard(mat, off, numel, cfg)
                    total.add(rep)
                    new_states[r][sg + j] = st
        sg += len(members)
    _write(tag, dst, world, models[0], sds, inner[0], new_flats, new_states, new_tables, group_params,
           param_shapes, metas[0], prefix)
    return total


def _write(tag, dst, world, model, sds, inner0, flats, states, tables, group_params, param_shapes, meta0,
           prefix) -> None:
    files: dict[str, Any] = {}
    metas = []
    for r in range(world):
        files[model_file_zero3(r)] = dict(model, dp_world_size=world, param_shapes=param_shapes)
        meta = dict(meta0, world_size=world, rank=r, tensors=tables[r])
        metas.append(meta)
        groups = copy.deepcopy(inner0["param_groups"])
        for g, ids in zip(groups, group_params):
            g["params"] = list(ids)
        osd = dict(sds[0]["optimizer_state_dict"], partition_count=world, fp32_flat_groups=flats[r])
        osd["optimizer_state_dict"] = {**{k: v for k, v in inner0.items() if k not in ("state", "param_groups")},
                                       "state": states[r], "param_groups": groups,
                                       "microadam": dict(inner0["microadam"], partition=meta)}
        files[optim_file(r, prefix)] = dict(sds[0], optimizer_state_dict=osd)
    publish(dst, tag, files, metas[0])


__all__ = ["reshard_zero3", "sub_groups"]
