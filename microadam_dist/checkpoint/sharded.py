"""The engine-agnostic sharded checkpoint: one checked file per rank plus meta.json.

Each parameter is a flat tensor of `numel` elements; rank r holds the range
[offset, offset + numel) of it (any tiling; `even_ranges` is the default) with its
param values and its MicroAdam state. meta.json records the format, world size,
step, hyper-parameters per group, and for every tensor its shape, group and every
rank's (offset, numel, layout); the files' sizes and digests are added by
`io.publish_dir`. Rank files hold {"rank", "tensors": {name: {"offset", "numel",
"param", "state"}}, "extra"}.

`save_sharded` / `load_sharded` are collective when torch.distributed is initialized;
`reshard_dir`, `consolidate_dir` and `split_file` are offline and single-process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Sequence

import torch

from ..config import MicroAdamConfig
from . import io as ckio
from .io import CheckpointError
from .reshard import ReshardReport, ShardState, even_ranges, reshard_tensor

FORMAT = "microadam_dist.sharded"
CONSOLIDATED = "microadam_dist.consolidated"


@dataclasses.dataclass
class LocalShard:
    """This rank's part of one parameter: flat elements [offset, offset + numel) of a
    tensor of `shape`, its values `param` (1-D) and its MicroAdam `state` ({} if none)."""

    name: str
    shape: tuple
    group: int
    offset: int
    numel: int
    param: torch.Tensor
    state: dict


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def hyper_json(config: MicroAdamConfig | dict) -> dict:
    d = config.as_dict() if isinstance(config, MicroAdamConfig) else dict(config)
    d["betas"] = list(d["betas"])
    return d


def config_of(hyper: dict, **overrides: Any) -> MicroAdamConfig:
    # Param groups may carry other keys (e.g. a scheduler's initial_lr): keep ours only.
    d = {k: v for k, v in dict(hyper, **overrides).items() if k in MicroAdamConfig.field_names()}
    d["betas"] = tuple(d["betas"])
    return MicroAdamConfig(**d)


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


def save_sharded(root: str, tag: str, shards: Sequence[LocalShard], hyper: Sequence[dict], step: int,
                 engine: str = "flat", extra: dict | None = None, rank_extra: Any = None) -> str:
    """Write this rank's shards as checkpoint ROOT/TAG (collective; atomic: published by
    rank 0 only after every rank's file is written and verified). Returns the path."""
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    stage = ckio.staging_dir(root, tag)
    if rank == 0:
        shutil.rmtree(stage, ignore_errors=True)  # a stale stage of an interrupted save
        os.makedirs(stage)
    if d:
        d.barrier()
    payload = {"rank": rank, "extra": rank_extra,
               "tensors": {s.name: {"offset": s.offset, "numel": s.numel, "param": _cpu(s.param),
                                    "state": _cpu(s.state)} for s in shards}}
    ckio.save_file(payload, os.path.join(stage, rank_file(rank)))
    table = [(s.name, list(s.shape), s.group, s.offset, s.numel,
              s.state["layout"].tolist() if s.state else None) for s in shards]
    tables = [None] * world
    if d:
        d.all_gather_object(tables, table)
    else:
        tables = [table]
    path = os.path.join(root, tag)
    if rank == 0:
        tensors: dict[str, dict] = {}
        for r, tab in enumerate(tables):
            for name, shape, group, off, numel, layout in tab:
                t = tensors.setdefault(name, {"name": name, "shape": shape, "group": group,
                                              "numel": int(torch.Size(shape).numel()), "shards": []})
                t["shards"].append({"rank": r, "offset": off, "numel": numel, "layout": layout})
        meta = {"format": FORMAT, "engine": engine, "world_size": world, "step": int(step),
                "hyper": [hyper_json(h) for h in hyper], "tensors": list(tensors.values()),
                "extra": extra or {}}
        ckio.publish_dir(root, tag, meta)
    if d:
        d.barrier()
    return path


def load_sharded(path: str) -> tuple[dict, dict]:
    """(meta, this rank's payload) of checkpoint `path` (collective).

    Refuses another world size with the reshard command in the message. Every rank
    checks all files' sizes and its own file's digest, then the ranks agree: if any
    rank failed, every rank raises, so no rank resumes from a damaged checkpoint.
    """
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    error, meta, payload = None, None, None
    try:
        meta = ckio.read_meta(path, verify=False)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta["world_size"] != world:
            raise CheckpointError(
                f"checkpoint {path} was saved by {meta['world_size']} ranks and this run has {world}; "
                f"run `python -m microadam_dist.checkpoint reshard --src {path} --dst NEW "
                f"--world-size {world}` and load NEW")
        payload = ckio.load_file(os.path.join(path, rank_file(rank)))
        if payload.get("rank") != rank:
            raise CheckpointError(f"{path}/{rank_file(rank)} holds rank {payload.get('rank')}")
    except CheckpointError as exc:
        error = exc
    if d:
        flags = [None] * world
        d.all_gather_object(flags, None if error is None else str(error))
        bad = [(r, e) for r, e in enumerate(flags) if e is not None]
        if bad and error is None:
            raise CheckpointError(f"rank {bad[0][0]} cannot load {path}: {bad[0][1]}")
    if error is not None:
        raise error
    return meta, payload


def _load_all(src: str) -> tuple[dict, list[dict]]:
    meta = ckio.read_meta(src, verify=True)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{src} has format {meta.get('format')!r}, expected {FORMAT!r}")
    payloads = [ckio.load_file(os.path.join(src, rank_file(r))) for r in range(meta["world_size"])]
    return meta, payloads


def _full_tensors(meta: dict, payloads: list[dict]):
    """Yield (tensor meta, full flat param, [ShardState]) for every tensor."""
    for t in meta["tensors"]:
        parts, shards = [], []
        for s in sorted(t["shards"], key=lambda s: s["offset"]):
            entry = payloads[s["rank"]]["tensors"][t["name"]]
            parts.append(entry["param"].reshape(-1))
            shards.append(ShardState(s["offset"], s["numel"], entry["state"]))
        yield t, torch.cat(parts) if parts else torch.zeros(0), shards


def reshard_dir(src: str, dst: str, world_size: int, **overrides: Any) -> ReshardReport:
    """Offline: checkpoint dir `src` (any world size) -> dir `dst` for `world_size` ranks
    split by `even_ranges`; `overrides` (e.g. topk_block=...) change the hyper-parameters."""
    meta, payloads = _load_all(src)
    hyper = [hyper_json(config_of(h, **overrides)) for h in meta["hyper"]]
    out: list[dict] = [{"rank": r, "extra": None, "tensors": {}} for r in range(world_size)]
    total = ReshardReport()
    new_tensors = []
    for t, full, shards in _full_tensors(meta, payloads):
        n = t["numel"]
        ranges = even_ranges(n, world_size)
        cfg = config_of(hyper[t["group"]])
        has_state = any(s.numel and s.state for s in shards)
        if has_state:
            states, rep = reshard_tensor(shards, n, ranges, cfg)
            total.add(rep)
        else:
            states = [{} for _ in ranges]
        entry = dict(t, shards=[])
        for r, ((off, k), st) in enumerate(zip(ranges, states)):
            out[r]["tensors"][t["name"]] = {"offset": off, "numel": k, "param": full[off:off + k].clone(),
                                            "state": st}
            entry["shards"].append({"rank": r, "offset": off, "numel": k,
                                    "layout": st["layout"].tolist() if st else None})
        new_tensors.append(entry)
    new_meta = dict(meta, world_size=world_size, hyper=hyper, tensors=new_tensors,
                    resharded_from={"path": os.path.abspath(src), "world_size": meta["world_size"],
                                    "report": dataclasses.asdict(total)})
    for k in ("files", "tag", "format_version"):
        new_meta.pop(k, None)
    _write_dir(dst, out, new_meta)
    return total


def _write_dir(dst: str, payloads: list[dict], meta: dict) -> str:
    root, tag = os.path.split(os.path.abspath(dst))
    os.makedirs(root, exist_ok=True)
    stage = ckio.staging_dir(root, tag)
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    for r, p in enumerate(payloads):
        ckio.save_file(p, os.path.join(stage, rank_file(r)))
    return ckio.publish_dir(root, tag, meta)


def consolidate_dir(src: str, dst_file: str) -> ReshardReport:
    """Offline: sharded dir -> one checked file loadable by a single-process run:
    {"format", "step", "hyper", "names", "extra", "model": {name: tensor of its shape},
    "optimizer": a MicroAdam state_dict over the params in `names` order}."""
    meta, payloads = _load_all(src)
    total = ReshardReport()
    model, state, groups = {}, {}, [dict(h, params=[]) for h in meta["hyper"]]
    names = []
    for i, (t, full, shards) in enumerate(_full_tensors(meta, payloads)):
        names.append(t["name"])
        model[t["name"]] = full.reshape(t["shape"]).clone()
        groups[t["group"]]["params"].append(i)
        if any(s.numel and s.state for s in shards):
            (st,), rep = reshard_tensor(shards, t["numel"], [(0, t["numel"])],
                                        config_of(meta["hyper"][t["group"]]))
            total.add(rep)
            state[i] = st
    for g in groups:
        g["betas"] = tuple(g["betas"])
    obj = {"format": CONSOLIDATED, "step": meta["step"], "hyper": meta["hyper"], "names": names,
           "shapes": {t["name"]: t["shape"] for t in meta["tensors"]},
           "groups": {t["name"]: t["group"] for t in meta["tensors"]},
           "extra": meta.get("extra", {}), "model": model,
           "optimizer": {"state": state, "param_groups": groups,
                         "microadam": {"format": 1, "nonfinite_skips": 0}}}
    os.makedirs(os.path.dirname(os.path.abspath(dst_file)), exist_ok=True)
    ckio.save_file(obj, dst_file)
    return total


def split_file(src_file: str, dst: str, world_size: int, **overrides: Any) -> ReshardReport:
    """Offline: a consolidated file (from `consolidate_dir`) -> sharded dir for `world_size` ranks."""
    obj = ckio.load_file(src_file)
    if not isinstance(obj, dict) or obj.get("format") != CONSOLIDATED:
        raise CheckpointError(f"{src_file} is not a consolidated MicroAdam checkpoint")
    hyper = [hyper_json(config_of(h, **overrides)) for h in obj["hyper"]]
    out: list[dict] = [{"rank": r, "extra": None, "tensors": {}} for r in range(world_size)]
    total = ReshardReport()
    tensors = []
    for i, name in enumerate(obj["names"]):
        full = obj["model"][name].reshape(-1)
        n = full.numel()
        ranges = even_ranges(n, world_size)
        st = obj["optimizer"]["state"].get(i)
        group = obj["groups"][name]
        if st:
            states, rep = reshard_tensor([ShardState(0, n, st)], n, ranges, config_of(hyper[group]))
            total.add(rep)
        else:
            states = [{} for _ in ranges]
        entry = {"name": name, "shape": obj["shapes"][name], "group": group, "numel": n, "shards": []}
        for r, ((off, k), s) in enumerate(zip(ranges, states)):
            out[r]["tensors"][name] = {"offset": off, "numel": k, "param": full[off:off + k].clone(), "state": s}
            entry["shards"].append({"rank": r, "offset": off, "numel": k,
                                    "layout": s["layout"].tolist() if s else None})
        tensors.append(entry)
    meta = {"format": FORMAT, "engine": "flat", "world_size": world_size, "step": obj["step"],
            "hyper": hyper, "tensors": tensors, "extra": obj.get("extra", {}),
            "resharded_from": {"path": os.path.abspath(src_file), "world_size": 1,
                               "report": dataclasses.asdict(total)}}
    _write_dir(dst, out, meta)
    return total


__all__ = ["FORMAT", "CONSOLIDATED", "LocalShard", "save_sharded", "load_sharded", "reshard_dir",
           "consolidate_dir", "split_file", "rank_file", "config_of", "hyper_json"]
