"""Offline reshard / consolidate of FSDP DCP checkpoints written by
`microadam_dist.integrations.fsdp.save_checkpoint`.

Such a checkpoint holds {"model": the model state (DCP reshards it by itself),
"optim": {"microadam_meta": JSON (world size, engine, param groups by fqn),
"microadam_rank{R}": {fqn: MicroAdam state, "_info": JSON with, per fqn, the rank's
flat range (flat_offset, local_numel) of the param, global shape, engine, layout}},
"extra": JSON}. Each rank's MicroAdam state is moved with `reshard.reshard_tensor`
to the ranges FSDP2 gives a world of M ranks: `fully_shard` splits dim 0 in chunks
of ceil(rows / M) rows. DDP/single-device ("local") states are replicas: rank 0's is
used and copied to every rank. FSDP1 FlatParameters are refused (their padding
depends on the world size; see docs/checkpoints.md).

The output is written with DCP into a staging directory beside the destination and
renamed into place once its metadata reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from typing import Any

import torch

from ..config import MicroAdamConfig
from .keys import INFO_KEY, META_KEY, rank_key
from . import io as ckio
from .io import CheckpointError
from .reshard import ReshardError, ReshardReport, ShardState, reshard_tensor
from .sharded import CONSOLIDATED

SUPPORTED_PLACEMENTS = (["Shard(dim=0)"],)


def is_dcp(path: str) -> bool:
    """True for a DCP directory (it has DCP's `.metadata`)."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def load_dcp(path: str) -> dict:
    """The whole DCP checkpoint as one nested dict of full tensors (single process)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    if not is_dcp(path):
        raise CheckpointError(f"{path} is not a DCP checkpoint (no .metadata)")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        out = os.path.join(tmp, "full.pt")
        try:
            dcp_to_torch_save(path, out)
        except Exception as exc:
            raise CheckpointError(f"cannot read DCP checkpoint {path}: {exc}") from exc
        sd = torch.load(out, weights_only=True)
    optim = sd.get("optim")
    if not isinstance(optim, dict) or META_KEY not in optim:
        raise CheckpointError(f"{path} holds no MicroAdam state (no 'optim.{META_KEY}'); it was not "
                              "written by microadam_dist.integrations.fsdp.save_checkpoint")
    return sd


def _config(group: dict, overrides: dict) -> MicroAdamConfig:
    d = {k: group[k] for k in MicroAdamConfig.field_names() if k in group}
    d.update(overrides)
    d["betas"] = tuple(d["betas"])
    return MicroAdamConfig(**d)


def _tensor_shards(optim: dict, meta: dict) -> dict[str, dict]:
    """fqn -> {"shape", "numel", "engine", "placements", "shards": [ShardState]} from every rank."""
    out: dict[str, dict] = {}
    for r in range(meta["world_size"]):
        entry = optim.get(rank_key(r))
        if entry is None:
            continue
        info = json.loads(entry[INFO_KEY])
        for fqn, e in info["params"].items():
            t = out.setdefault(fqn, {"shape": e["global_shape"], "numel": e["global_numel"],
                                     "engine": e["engine"], "placements": e["extra"].get("placements"),
                                     "shards": [], "skips": info.get("nonfinite_skips", 0)})
            if e["engine"] == "fsdp1":
                raise ReshardError(
                    f"{fqn!r} is an FSDP1 shard: FSDP1 FlatParameters are padded per world size, which "
                    "this tool cannot move yet; save with FSDP2 (fully_shard) or DDP to reshard")
            if e["engine"] == "fsdp2" and e["extra"].get("placements") not in SUPPORTED_PLACEMENTS:
                raise ReshardError(f"{fqn!r} has placements {e['extra'].get('placements')}; only "
                                   f"{SUPPORTED_PLACEMENTS[0]} on a 1-D mesh (fully_shard's default) is supported")
            if e["flat_offset"] < 0:
                raise ReshardError(f"{fqn!r} on rank {r} is not one contiguous flat range")
            t["shards"].append(ShardState(e["flat_offset"], e["local_numel"], entry[fqn]))
    return out


def _fsdp2_ranges(shape: list[int], world: int) -> list[tuple[int, int, int]]:
    """(flat offset, numel, first row) of each rank under fully_shard's dim-0 chunking."""
    rows = shape[0] if shape else 1
    row = int(torch.Size(shape[1:]).numel()) if shape else 1
    chunk = -(-rows // world)
    out = []
    for r in range(world):
        r0 = min(rows, r * chunk)
        r1 = min(rows, r0 + chunk)
        out.append((r0 * row, (r1 - r0) * row, r0))
    return out


def _moved_states(sd: dict, world: int, overrides: dict):
    """Yield (group index, fqn, tensor info, [(offset, numel, first row, state) per dst rank], report)."""
    optim = sd["optim"]
    meta = json.loads(optim[META_KEY])
    tensors = _tensor_shards(optim, meta)
    for gi, group in enumerate(meta["param_groups"]):
        cfg = _config(group, overrides)
        for fqn in group["params"]:
            t = tensors.get(fqn)
            if t is None:  # never stepped: no state anywhere
                continue
            n = t["numel"]
            if t["engine"] == "local":
                (st,), rep = reshard_tensor(t["shards"][:1], n, [(0, n)], cfg)
                yield gi, fqn, t, [(0, n, 0, {k: v.clone() for k, v in st.items()}) for _ in range(world)], rep
                continue
            ranges = _fsdp2_ranges(t["shape"], world)
            states, rep = reshard_tensor(t["shards"], n, [(o, k) for o, k, _ in ranges], cfg)
            yield gi, fqn, t, [(o, k, r0, st) for (o, k, r0), st in zip(ranges, states)], rep


def reshard_dcp(src: str, dst: str, world_size: int, **overrides: Any) -> ReshardReport:
    """FSDP DCP checkpoint `src` -> DCP checkpoint `dst` loadable by
    `integrations.fsdp.load_checkpoint` in a run of `world_size` ranks (FSDP2 or DDP)."""
    import torch.distributed.checkpoint as dcp

    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}; expected an integer >= 1")
    sd = load_dcp(src)
    meta = json.loads(sd["optim"][META_KEY])
    groups = [dict(g, **overrides) for g in meta["param_groups"]]
    ranks: list[dict] = [{} for _ in range(world_size)]
    infos: list[dict] = [{} for _ in range(world_size)]
    total = ReshardReport()
    skips = 0
    for gi, fqn, t, placed, rep in _moved_states(sd, world_size, overrides):
        total.add(rep)
        skips = t["skips"]
        for r, (off, k, r0, st) in enumerate(placed):
            if not k:
                continue
            ranks[r][fqn] = st
            extra = ({"placements": t["placements"], "mesh_shape": [world_size],
                      "global_offset": [r0] + [0] * (len(t["shape"]) - 1)} if t["engine"] == "fsdp2" else {})
            infos[r][fqn] = {"fqn": fqn, "engine": t["engine"], "rank": r, "world_size": world_size,
                             "global_shape": t["shape"], "global_numel": t["numel"], "flat_offset": off,
                             "local_numel": k, "extra": extra, "layout": st["layout"].tolist()}
    optim: dict[str, Any] = {META_KEY: json.dumps(dict(meta, world_size=world_size, param_groups=groups))}
    for r in range(world_size):
        optim[rank_key(r)] = dict(ranks[r], **{INFO_KEY: json.dumps(
            {"rank": r, "params": infos[r], "nonfinite_skips": skips})})
    out = {"model": sd["model"], "optim": optim, "extra": sd.get("extra", "{}")}
    dst = os.path.abspath(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    stage = os.path.join(os.path.dirname(dst), f".tmp-{os.path.basename(dst)}-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(out, checkpoint_id=stage, no_dist=True)
        read = dcp.FileSystemReader(stage).read_metadata().state_dict_metadata
        if f"optim.{META_KEY}" not in read:
            raise CheckpointError(f"DCP write to {stage} did not read back")
        ckio.replace_dir(stage, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return total


def consolidate_dcp(src: str, dst_file: str) -> ReshardReport:
    """FSDP DCP checkpoint -> one consolidated checked file (the format of
    `sharded.consolidate_dir`: full model tensors and a single-process MicroAdam state_dict)."""
    sd = load_dcp(src)
    meta = json.loads(sd["optim"][META_KEY])
    names = [f for g in meta["param_groups"] for f in g["params"]]
    index = {f: i for i, f in enumerate(names)}
    state, total, step = {}, ReshardReport(), 0
    for gi, fqn, t, placed, rep in _moved_states(sd, 1, {}):
        total.add(rep)
        state[index[fqn]] = placed[0][3]
        step = int(placed[0][3]["step"])
    groups = []
    for g in meta["param_groups"]:
        groups.append(dict({k: v for k, v in g.items() if k != "params"},
                           betas=tuple(g["betas"]), params=[index[f] for f in g["params"]]))
    model = {f: sd["model"][f] for f in names if f in sd["model"]}
    obj = {"format": CONSOLIDATED, "step": step,
           "hyper": [{k: v for k, v in g.items() if k != "params"} for g in meta["param_groups"]],
           "names": names, "shapes": {f: list(model[f].shape) for f in model},
           "groups": {f: gi for gi, g in enumerate(meta["param_groups"]) for f in g["params"]},
           "extra": json.loads(sd.get("extra", "{}")), "model": model,
           "optimizer": {"state": state, "param_groups": groups,
                         "microadam": {"format": 1, "nonfinite_skips": 0}}}
    ckio.save_file(obj, dst_file)
    return total


__all__ = ["is_dcp", "load_dcp", "reshard_dcp", "consolidate_dcp"]
