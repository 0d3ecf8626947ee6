"""Offline reshard / consolidate of FSDP DCP checkpoints.

Two forms are read:

* the stock form, what torch's `get_optimizer_state_dict` + `dcp.save` write (and so
  `integrations.fsdp.save_checkpoint`, Accelerate, Lightning, torchtitan):
  {"model": {fqn: tensor}, "optim" (or "optimizer"): {"state": {fqn: state},
  "param_groups": [{..., "params": [fqn]}]}}. A DTensor (FSDP2) param's state is in the
  checkpoint form of sharded_state.py: per key one 1-D tensor of S padded chunks, chunk r
  being shard r's state. A plain param's state is the live form (replicated).
  The output is the stock form again, for M shards: the stock calls load it at M ranks.
  The flattened variant (`flatten_optimizer_state_dict=True`, as torchtitan saves it: the
  model's params at the top level, {"state.{fqn}.{key}": tensor, "param_groups.{fqn}.{hyper}":
  value} under "optimizer") is read as the nested form and written back flattened.
* the rank-keyed form of `integrations.fsdp.save_checkpoint` under FSDP1 and of older
  FSDP2 / DDP checkpoints: {"optim": {"microadam_meta": JSON (world size, engine, param
  groups by fqn), "microadam_rank{R}": {fqn: live state, "_info": JSON with, per fqn, the
  rank's flat range of the param, global shape, engine, layout}}}. The output is rank-keyed.

Each shard's state is moved with `reshard.reshard_tensor` to the ranges FSDP2 gives a world
of M ranks: `fully_shard` splits dim 0 in chunks of ceil(rows / M) rows. DDP / single-device
states are replicas: one is used and copied to every rank. FSDP1 FlatParameters are refused
(their padding depends on the world size; see docs/checkpoints.md).

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
from ..layout import STATE_KEYS, Layout
from ..sharded_state import SHARDS_KEY, padded_local, padded_sizes, unpadded
from . import io as ckio
from .io import CheckpointError
from .keys import INFO_KEY, META_KEY, rank_key
from .reshard import ReshardError, ReshardReport, ShardState, reshard_tensor
from .sharded import CONSOLIDATED

SUPPORTED_PLACEMENTS = (["Shard(dim=0)"],)


def is_dcp(path: str) -> bool:
    """True for a DCP directory (it has DCP's `.metadata`)."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def _read_dcp(path: str) -> dict:
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
        return torch.load(out, weights_only=True)


def _stock_key(sd: dict) -> str | None:
    """Where a stock-form checkpoint keeps the optimizer: "optim" (torch, torchtitan, our
    helper, Lightning) or "optimizer" (Accelerate)."""
    for key in ("optim", "optimizer"):
        o = sd.get(key)
        if isinstance(o, dict) and "state" in o and "param_groups" in o:
            return key
    return None


_FLAT = ("state.", "param_groups.")


def _flat_key(sd: dict) -> str | None:
    """Where a checkpoint keeps the optimizer in torch's flattened form
    (`flatten_optimizer_state_dict=True`): "optimizer" (torchtitan) or "optim"."""
    for key in ("optimizer", "optim"):
        o = sd.get(key)
        if (isinstance(o, dict) and any(isinstance(n, str) and n.startswith(_FLAT[0]) for n in o)
                and all(isinstance(n, str) and n.startswith(_FLAT) for n in o)):
            return key
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _unflatten(flat: dict) -> dict:
    """torch's flattened optimizer state dict -> the nested form. A key's last dotted part
    is the state key or hyper-parameter (neither holds a dot; fqns may). The flattened form
    keeps hyper-parameters per param, not groups: params with equal ones share a group, in
    the order they first appear (the hyper-parameters each param gets are exact)."""
    state: dict[str, dict] = {}
    hypers: dict[str, dict] = {}
    for name, value in flat.items():
        is_state = name.startswith(_FLAT[0])
        fqn, _, key = name[len(_FLAT[0 if is_state else 1]):].rpartition(".")
        (state if is_state else hypers).setdefault(fqn, {})[key] = value
    missing = sorted(set(state) - set(hypers))
    if missing:
        raise CheckpointError(f"flattened optimizer state of {missing[0]!r} has no 'param_groups.{missing[0]}.*' "
                              "hyper-parameters: corrupt checkpoint")
    groups: list[dict] = []
    for fqn, h in hypers.items():
        for g in groups:
            if g.keys() - {"params"} == h.keys() and all(_same(g[k], v) for k, v in h.items()):
                g["params"].append(fqn)
                break
        else:
            groups.append(dict(h, params=[fqn]))
    return {"state": state, "param_groups": groups}


def _flatten(optim: dict) -> dict:
    """The nested form -> torch's flattened form (the inverse of `_unflatten`)."""
    out = {f"{_FLAT[0]}{fqn}.{k}": v for fqn, entry in optim["state"].items() for k, v in entry.items()}
    for g in optim["param_groups"]:
        for fqn in g["params"]:
            out.update({f"{_FLAT[1]}{fqn}.{k}": v for k, v in g.items() if k != "params"})
    return out


def load_dcp(path: str) -> dict:
    """The whole DCP checkpoint as one nested dict of full tensors (single process);
    raises CheckpointError unless it holds a MicroAdam state in one of the forms."""
    sd = _read_dcp(path)
    optim = sd.get("optim")
    if (isinstance(optim, dict) and META_KEY in optim) or _stock_key(sd) or _flat_key(sd):
        return sd
    raise CheckpointError(
        f"{path} holds no MicroAdam state: expected 'optim' or 'optimizer' with 'state' and "
        f"'param_groups' (torch's get_optimizer_state_dict, nested or flattened) or 'optim.{META_KEY}' "
        "(the rank-keyed format of microadam_dist.integrations.fsdp.save_checkpoint under FSDP1)")


def _nested(sd: dict) -> tuple[dict, str | None]:
    """(`sd` with a flattened optimizer state dict made nested, the key of that optimizer
    or None where it was not flattened)."""
    flat = _flat_key(sd)
    return (dict(sd, **{flat: _unflatten(sd[flat])}), flat) if flat is not None else (sd, None)


def _model_tensors(sd: dict, model_src: str | None) -> dict:
    """{fqn: full model tensor}: the checkpoint's "model", else its top-level tensors
    (torchtitan's layout), or a DCP dir `model_src` (Accelerate keeps the model apart; its
    keys may carry a "model." prefix)."""
    if model_src is None:
        if isinstance(sd.get("model"), dict):
            return sd["model"]
        return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    msd = _read_dcp(model_src)
    model = msd["model"] if isinstance(msd.get("model"), dict) else msd
    return {(k[len("model."):] if isinstance(k, str) and k.startswith("model.") else k): v
            for k, v in model.items() if isinstance(v, torch.Tensor)}


def _config(group: dict, overrides: dict) -> MicroAdamConfig:
    d = {k: group[k] for k in MicroAdamConfig.field_names() if k in group}
    d.update(overrides)
    d["betas"] = tuple(d["betas"])
    return MicroAdamConfig(**d)


def _rank_keyed_shards(optim: dict, meta: dict) -> dict[str, dict]:
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


def _stock_shards(optim: dict, model: dict) -> dict[str, dict]:
    """fqn -> the entry of `_rank_keyed_shards` for a stock-form optimizer state dict, each
    param's global shape taken from its model tensor."""
    out: dict[str, dict] = {}
    for fqn, entry in optim["state"].items():
        if not isinstance(entry, dict) or any(k not in entry for k in STATE_KEYS):
            raise CheckpointError(f"the optimizer state of {fqn!r} is not a MicroAdam state "
                                  f"(expected the keys {list(STATE_KEYS)})")
        if not isinstance(model.get(fqn), torch.Tensor):
            raise CheckpointError(f"no model tensor {fqn!r} to take the param's shape from; for a "
                                  "checkpoint that holds the optimizer alone pass the model's DCP dir "
                                  "(--model-src DIR / model_src=)")
        shape = list(model[fqn].shape)
        n = model[fqn].numel()
        t = {"shape": shape, "numel": n, "placements": None, "skips": 0, "entry": entry}
        if entry["win_idx"].dtype == torch.int16:  # a plain param's live state: a replica
            out[fqn] = dict(t, engine="local", shards=[ShardState(0, n, entry)])
        else:
            out[fqn] = dict(t, engine="fsdp2", shards=_split_stock(fqn, entry, shape))
    return out


def _split_stock(fqn: str, entry: dict, shape: list[int]) -> list[ShardState]:
    """The shard states of one param's checkpoint form (sharded_state.py): S = layout's
    numel / 7; shard r's state is the first `expected_specs()` elements of chunk r of every
    key, at the flat range FSDP2's dim-0 split gives rank r."""
    layout_t, guard = entry["layout"], entry.get(SHARDS_KEY)
    shards = layout_t.numel() // 7
    if layout_t.dtype != torch.int64 or layout_t.dim() != 1 or shards < 1 or layout_t.numel() != 7 * shards:
        raise CheckpointError(f"{fqn!r}: 'layout' is {layout_t.dtype} {tuple(layout_t.shape)}, expected "
                              "int64 (7 * shards,): corrupt checkpoint")
    if guard is not None and tuple(guard.shape) != (shards, shards + 1):
        raise ReshardError(f"{fqn!r}: the guard {SHARDS_KEY!r} has shape {tuple(guard.shape)}, not "
                           f"({shards}, {shards + 1}) for the {shards} shards of its layout; only a "
                           "1-D split (FSDP2's fully_shard, Shard(0) of dim 0) can be resharded")
    ranges = _fsdp2_ranges(shape, shards)
    layouts = [Layout.from_tensor(layout_t[7 * r:7 * r + 7]) for r in range(shards)]
    sizes = padded_sizes(layouts[0], ranges[0][1])
    out = []
    for r, (lay, (off, numel, _)) in enumerate(zip(layouts, ranges)):
        if lay.n != numel:
            raise ReshardError(
                f"{fqn!r}: shard {r} of {shards} holds {lay.n} elements, but fully_shard's dim-0 split "
                f"of shape {shape} over {shards} ranks gives it {numel}; only FSDP2's Shard(0) on a 1-D "
                "mesh (or HSDP's shard dimension) can be resharded")
        st = {}
        for key, (dtype, spec) in lay.expected_specs().items():
            full = entry[key].reshape(-1)
            want = torch.uint8 if key == "win_idx" else dtype
            if full.dtype != want or full.numel() != shards * sizes[key]:
                raise CheckpointError(f"{fqn!r}: state {key!r} is {full.dtype} ({full.numel()},), expected "
                                      f"{want} ({shards * sizes[key]},) for {shards} shards: corrupt checkpoint")
            st[key] = unpadded(key, full[r * sizes[key]:(r + 1) * sizes[key]], spec).clone()
        out.append(ShardState(off, numel, st))
    return out


def _source(sd: dict, model: dict) -> tuple[str | None, list[dict], dict[str, dict]]:
    """(stock optimizer key or None for the rank-keyed form, param groups by fqn, tensors)."""
    key = _stock_key(sd)
    optim = sd.get("optim")
    if isinstance(optim, dict) and META_KEY in optim:
        meta = json.loads(optim[META_KEY])
        return None, meta["param_groups"], _rank_keyed_shards(optim, meta)
    return key, [dict(g) for g in sd[key]["param_groups"]], _stock_shards(sd[key], model)


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


def _moved_states(groups: list[dict], tensors: dict, world: int, overrides: dict):
    """Yield (group index, fqn, tensor info, [(offset, numel, first row, state) per dst rank], report)."""
    for gi, group in enumerate(groups):
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


def _stock_entry(t: dict, placed: list, cfg: MicroAdamConfig, copy: bool) -> dict:
    """One param's state for a stock-form checkpoint of len(placed) shards: the live form
    for a plain param (the source's own when `copy`), else the checkpoint form of
    sharded_state.py as full tensors, each shard padded as `export_state` pads it."""
    if t["engine"] == "local":
        return t["entry"] if copy else placed[0][3]
    cpu = torch.device("cpu")
    states = [st if k else Layout.for_numel(0, cfg).new_state(cpu) for _, k, _, st in placed]
    largest = max(range(len(placed)), key=lambda r: placed[r][1])
    sizes = padded_sizes(Layout.from_tensor(states[largest]["layout"]), placed[largest][1])
    out = {SHARDS_KEY: torch.zeros(len(placed), len(placed) + 1, dtype=torch.uint8)}
    for key in STATE_KEYS:
        out[key] = torch.cat([padded_local(key, st, sizes[key], cpu) for st in states])
    return out


def _write(out: dict, dst: str, prefix: str) -> None:
    """dcp.save `out` into a staging dir beside `dst`; rename it into place once its
    metadata reads back with a key under `prefix`."""
    import torch.distributed.checkpoint as dcp

    dst = os.path.abspath(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    stage = os.path.join(os.path.dirname(dst), f".tmp-{os.path.basename(dst)}-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(out, checkpoint_id=stage, no_dist=True)
        read = dcp.FileSystemReader(stage).read_metadata().state_dict_metadata
        if not any(k.startswith(prefix) for k in read):
            raise CheckpointError(f"DCP write to {stage} did not read back")
        ckio.replace_dir(stage, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def reshard_dcp(src: str, dst: str, world_size: int, model_src: str | None = None,
                **overrides: Any) -> ReshardReport:
    """FSDP DCP checkpoint `src` -> DCP checkpoint `dst` of the same form for `world_size`
    ranks: the stock form loads through torch's stock calls (and `integrations.fsdp.
    load_checkpoint`), the rank-keyed form through `load_checkpoint`. `model_src`: a DCP
    dir holding the model, for a stock checkpoint that holds the optimizer alone."""
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}; expected an integer >= 1")
    sd, flat = _nested(load_dcp(src))
    key, src_groups, tensors = _source(sd, _model_tensors(sd, model_src))
    groups = [dict(g, **overrides) for g in src_groups]
    total = ReshardReport()
    if key is not None:
        state = {}
        for gi, fqn, t, placed, rep in _moved_states(src_groups, tensors, world_size, overrides):
            total.add(rep)
            state[fqn] = _stock_entry(t, placed, _config(src_groups[gi], overrides), copy=not overrides)
        optim = {"state": state, "param_groups": groups}
        _write(dict(sd, **{key: _flatten(optim) if flat else optim}), dst, f"{key}.")
        return total
    meta = json.loads(sd["optim"][META_KEY])
    ranks: list[dict] = [{} for _ in range(world_size)]
    infos: list[dict] = [{} for _ in range(world_size)]
    skips = 0
    for gi, fqn, t, placed, rep in _moved_states(src_groups, tensors, world_size, overrides):
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
    _write(out, dst, f"optim.{META_KEY}")
    return total


def consolidate_dcp(src: str, dst_file: str, model_src: str | None = None) -> ReshardReport:
    """FSDP DCP checkpoint (either form) -> one consolidated checked file (the format of
    `sharded.consolidate_dir`: full model tensors and a single-process MicroAdam state_dict)."""
    sd, _ = _nested(load_dcp(src))
    model_all = _model_tensors(sd, model_src)
    key, src_groups, tensors = _source(sd, model_all)
    names = [f for g in src_groups for f in g["params"]]
    index = {f: i for i, f in enumerate(names)}
    state, total, step = {}, ReshardReport(), 0
    for gi, fqn, t, placed, rep in _moved_states(src_groups, tensors, 1, {}):
        total.add(rep)
        state[index[fqn]] = placed[0][3]
        step = int(placed[0][3]["step"])
    groups = []
    for g in src_groups:
        groups.append(dict({k: v for k, v in g.items() if k != "params"},
                           betas=tuple(g["betas"]), params=[index[f] for f in g["params"]]))
    model = {f: model_all[f] for f in names if f in model_all}
    extra = sd.get("extra", "{}")
    obj = {"format": CONSOLIDATED, "step": step,
           "hyper": [{k: v for k, v in g.items() if k != "params"} for g in src_groups],
           "names": names, "shapes": {f: list(model[f].shape) for f in model},
           "groups": {f: gi for gi, g in enumerate(src_groups) for f in g["params"]},
           "extra": json.loads(extra) if isinstance(extra, str) else {}, "model": model,
           "optimizer": {"state": state, "param_groups": groups,
                         "microadam": {"format": 1, "nonfinite_skips": 0}}}
    ckio.save_file(obj, dst_file)
    return total


__all__ = ["is_dcp", "load_dcp", "reshard_dcp", "consolidate_dcp"]
