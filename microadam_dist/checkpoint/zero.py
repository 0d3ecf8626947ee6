"""Offline reshard of DeepSpeed ZeRO checkpoints written with "type": "MicroAdam".

ZeRO-1/2 here; ZeRO-3 (per-parameter partitioning) in `zero3.py`, reached through the
same `reshard_zero`; the file names, reading and atomic publishing both use are in
`ds_files.py`. A ZeRO-1/2 checkpoint `SAVE_DIR/TAG` holds
`mp_rank_00_model_states.pt` (module, world size `dp_world_size`) and per
data-parallel rank `zero_pp_rank_{r}_mp_rank_00_optim_states.pt` (`bf16_zero_pp_...`
for bf16 runs) whose `optimizer_state_dict` has the fp32 master partition of every param group
(padding stripped), and MicroAdam's state_dict (`base_optimizer_state`) whose
`["microadam"]["partition"]` (integrations/ds_partitions.py) says which range of the
padded flat group each rank's tensor covers. ZeRO-1/2 flatten a group's params in
order, pad it to a multiple of 2·world_size (DeepSpeed's nccl_start_alignment_factor)
and cut equal partitions; the last rank's tail is padding.

Resharding materializes each group over its real elements (the padding belongs to no
parameter: its state is dropped and counted), pads for the new world size and rebuilds
every new partition (`reshard.rebuild_shard`); the master weights move exactly. The
output loads with `engine.load_checkpoint` in a run of the new world size (and the
same ZeRO stage 1 or 2, group structure and hyper-parameters). The BF16 optimizer,
parameter_alignment paddings and model parallelism are refused with a message.
"""

from __future__ import annotations

import copy
import glob
import os
from typing import Any

import torch

from .ds_files import (BF16_PREFIX, MODEL_FILE, config_of_group, load, model_file_zero3, optim_file,
                       publish)
from .io import CheckpointError
from .reshard import ReshardError, ReshardReport, ShardState, materialize, rebuild_shard, retarget
from .zero3 import reshard_zero3

ALIGNMENT_FACTOR = 2  # DeepSpeed stage_1_and_2: nccl_start_alignment_factor


def _has_model(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in (MODEL_FILE, model_file_zero3(0)))


def _optim_prefix(folder: str) -> str:
    for prefix in ("", BF16_PREFIX):
        if os.path.isfile(os.path.join(folder, optim_file(0, prefix))):
            return prefix
    raise CheckpointError(f"{folder} holds no {optim_file(0)} (nor {optim_file(0, BF16_PREFIX)}): "
                          "saved without ZeRO, or incomplete")


def resolve(path: str) -> tuple[str, str]:
    """(save_dir, tag) for a DeepSpeed save_dir (its `latest` names the tag) or a tag dir."""
    path = os.path.abspath(path)
    if _has_model(path):
        return os.path.dirname(path), os.path.basename(path)
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if tag and _has_model(os.path.join(path, tag)):
            return path, tag
    raise CheckpointError(f"{path} is not a DeepSpeed checkpoint (no {MODEL_FILE} or {model_file_zero3(0)}, "
                          "nor a 'latest' naming a folder with one)")


def is_deepspeed(path: str) -> bool:
    try:
        resolve(path)
        return True
    except CheckpointError:
        return False


def _group_layout(metas: list[dict], gi: int) -> tuple[list[dict], int]:
    """Params of flat group gi in order [{"name", "shape", "numel", "start"}], and the real
    (unpadded) element count, from every rank's pieces."""
    params: dict[str, dict] = {}
    for meta in metas:
        t = meta["tensors"][gi]
        for pc in t["pieces"]:
            start = t["global_offset"] + pc["offset"] - pc["param_offset"]
            numel = int(torch.Size(pc["shape"]).numel())
            params.setdefault(pc["name"], {"name": pc["name"], "shape": pc["shape"], "numel": numel, "start": start})
    ordered = sorted(params.values(), key=lambda p: p["start"])
    at = 0
    for p in ordered:
        if p["start"] != at:
            raise ReshardError(f"group {gi}: param {p['name']!r} starts at {p['start']}, expected {at} "
                               "(parameter_alignment padding or round-robin order is not supported)")
        at += p["numel"]
    return ordered, at


def reshard_zero(src: str, dst: str, world_size: int, sub_group_size: int | None = None) -> ReshardReport:
    """DeepSpeed ZeRO-1/2/3 checkpoint `src` (save_dir or tag dir) -> save_dir `dst` holding the
    same tag for `world_size` data-parallel ranks (and `dst/latest`).

    `sub_group_size` (ZeRO-3 only) is the one of the run that will load the result;
    by default the one recorded in the checkpoint's DeepSpeed config.
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}; expected an integer >= 1")
    root, tag = resolve(src)
    folder = os.path.join(root, tag)
    stage3 = not os.path.isfile(os.path.join(folder, MODEL_FILE))
    model = load(os.path.join(folder, model_file_zero3(0) if stage3 else MODEL_FILE))
    old_world = int(model["dp_world_size"])
    if not stage3 and not glob.glob(os.path.join(folder, f"*{optim_file(0)}")):
        return _replicated(folder, tag, dst, world_size, model)
    prefix = _optim_prefix(folder)
    files = [os.path.join(folder, optim_file(r, prefix)) for r in range(old_world)]
    extra = sorted(set(glob.glob(os.path.join(folder, "*_optim_states.pt"))) - set(files))
    if extra:
        raise CheckpointError(f"{folder} holds optimizer files beyond dp_world_size={old_world}: "
                              f"{[os.path.basename(e) for e in extra][:3]} (model parallelism is not supported)")
    sds = [load(f) for f in files]
    osds = [sd["optimizer_state_dict"] for sd in sds]
    # ZeRO-1/2 keep the basic optimizer's state_dict under base_optimizer_state, ZeRO-3 under
    # optimizer_state_dict (inside DeepSpeed's own optimizer_state_dict).
    key = "optimizer_state_dict" if stage3 else "base_optimizer_state"
    bases = [o.get(key) if isinstance(o, dict) else None for o in osds]
    if not all(isinstance(b, dict) and "microadam" in b for b in bases):
        raise CheckpointError(f"{folder} holds no MicroAdam state in every rank's {key} "
                              "(elastic checkpoints and other optimizers are not supported)")
    metas = [b["microadam"].get("partition") for b in bases]
    if any(m is None for m in metas):
        raise CheckpointError(f"{folder}: MicroAdam state lacks its partition metadata (saved without "
                              "microadam_dist.integrations.deepspeed?)")
    kind, stage = metas[0]["partitioning"], metas[0]["zero_stage"]
    for r, m in enumerate(metas):
        if m["rank"] != r or m["world_size"] != old_world:
            raise CheckpointError(f"{files[r]} holds rank {m['rank']} of {m['world_size']}, expected {r} of {old_world}")
    if kind == "per_param" and stage == 3 and stage3:
        models = [model] + [load(os.path.join(folder, model_file_zero3(r))) for r in range(1, old_world)]
        return reshard_zero3(folder, tag, dst, world_size, models, sds, metas, prefix, sub_group_size)
    if kind != "flat" or stage not in (1, 2) or "single_partition_of_fp32_groups" not in osds[0]:
        raise ReshardError(f"{folder}: ZeRO stage {stage} with {kind!r} partitioning; this tool reshards "
                           "ZeRO-1/2 fp32-master and ZeRO-3 checkpoints (the BF16 optimizer is not supported)")
    if any(any(pads) for pads in osds[0].get("param_alignment_paddings", [])):
        raise ReshardError(f"{folder}: parameter_alignment paddings are not supported")

    n_groups = len(metas[0]["tensors"])
    total = ReshardReport()
    new_parts: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    new_states: list[dict] = [{} for _ in range(world_size)]
    new_tensors: list[list[dict]] = [[] for _ in range(world_size)]
    paddings: list[list[int]] = [[] for _ in range(world_size)]
    for gi in range(n_groups):
        params, real = _group_layout(metas, gi)
        align = ALIGNMENT_FACTOR * world_size
        padded = -(-real // align) * align
        part = padded // world_size
        old_total = metas[0]["tensors"][gi]["group_numel"]
        masters = torch.cat([o["single_partition_of_fp32_groups"][gi].reshape(-1) for o in osds])[:real]
        if masters.numel() != real:
            raise CheckpointError(f"group {gi}: fp32 master partitions hold {masters.numel()} elements, "
                                  f"the params {real}")
        flat = torch.zeros(padded, dtype=masters.dtype)
        flat[:real] = masters
        shards = [ShardState(m["tensors"][gi]["global_offset"], m["tensors"][gi]["numel"], b["state"].get(gi, {}))
                  for m, b in zip(metas, bases)]
        have_state = all(s.state for s in shards if s.numel)
        cfg = config_of_group(bases[0]["param_groups"][gi])
        mat = None
        if have_state:
            whole = materialize(shards, old_total)
            total.padding_dropped += int((whole.idx >= real).sum())
            mat = retarget(whole, real, padded)
        for r in range(world_size):
            lo = r * part
            new_parts[r].append(flat[lo:min(lo + part, real)].clone() if lo < real else flat[:0].clone())
            paddings[r].append(max(0, lo + part - max(lo, real)))
            if mat is not None:
                st, rep = rebuild_shard(mat, lo, part, cfg)
                total.add(rep)
                new_states[r][gi] = st
            new_tensors[r].append(_piece_table(gi, params, lo, part, padded))
    _write(tag, dst, world_size, model, sds, new_parts, new_states, new_tensors, paddings, metas[0], prefix)
    return total


def _find_microadam(obj: Any) -> dict | None:
    """The MicroAdam state_dict inside DeepSpeed's (possibly wrapped) optimizer state."""
    if isinstance(obj, dict):
        if "microadam" in obj and "state" in obj:
            return obj
        for v in obj.values():
            found = _find_microadam(v)
            if found is not None:
                return found
    return None


def _replicated(folder: str, tag: str, dst: str, world_size: int, model: dict) -> ReshardReport:
    """ZeRO-0: the optimizer holds every parameter whole on every rank and its state sits in
    the model-states file; it does not depend on the world size, so the checkpoint is
    copied (with the new dp_world_size recorded)."""
    sd = _find_microadam(model.get("optimizer"))
    meta = (sd or {}).get("microadam", {}).get("partition")
    if meta is None:
        raise CheckpointError(f"{folder} holds neither ZeRO optimizer files nor a MicroAdam state with "
                              "partition metadata in its model states")
    if meta["partitioning"] != "none":
        raise CheckpointError(f"{folder}: {meta['partitioning']!r} partitioning without its ZeRO optimizer files")
    publish(dst, tag, {MODEL_FILE: dict(model, dp_world_size=world_size)}, dict(meta, world_size=world_size))
    return ReshardReport()


def _piece_table(gi: int, params: list[dict], lo: int, size: int, padded: int) -> dict:
    pieces = []
    for p in params:
        a, b = max(p["start"], lo), min(p["start"] + p["numel"], lo + size)
        if b > a:
            pieces.append({"name": p["name"], "shape": p["shape"], "offset": a - lo,
                           "param_offset": a - p["start"], "length": b - a})
    covered = sum(pc["length"] for pc in pieces)
    return {"group": gi, "sub_group": None, "numel": size, "global_offset": lo, "group_numel": padded,
            "padding": size - covered, "pieces": pieces}


def _slice_mappings(template: Any, table: dict) -> Any:
    """DeepSpeed's per-rank param_slice_mappings (name -> fragment_address(numel, start))."""
    from collections import OrderedDict
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # only needed for DeepSpeed's universal-checkpoint tools
        return template
    return OrderedDict((pc["name"], fragment_address(numel=pc["length"], start=pc["offset"]))
                       for pc in table["pieces"])


def _write(tag, dst, world, model, sds, parts, states, tables, paddings, meta0, prefix) -> None:
    files: dict[str, Any] = {MODEL_FILE: dict(model, dp_world_size=world)}
    base0 = sds[0]["optimizer_state_dict"]["base_optimizer_state"]
    metas = []
    for r in range(world):
        sd = copy.copy(sds[0])
        osd = dict(sd["optimizer_state_dict"])
        meta = dict(meta0, world_size=world, rank=r, tensors=tables[r])
        metas.append(meta)
        osd["base_optimizer_state"] = {"state": states[r], "param_groups": copy.deepcopy(base0["param_groups"]),
                                       "microadam": dict(base0["microadam"], partition=meta)}
        osd["single_partition_of_fp32_groups"] = parts[r]
        osd["group_paddings"] = paddings[r]
        osd["partition_count"] = [world] * len(parts[r])
        if "param_slice_mappings" in osd:
            osd["param_slice_mappings"] = [_slice_mappings(t, tab) for t, tab in
                                           zip(osd["param_slice_mappings"], tables[r])]
        files[optim_file(r, prefix)] = dict(sd, optimizer_state_dict=osd)
    publish(dst, tag, files, metas[0])


__all__ = ["reshard_zero", "is_deepspeed", "resolve"]
