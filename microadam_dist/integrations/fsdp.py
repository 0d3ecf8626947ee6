"""MicroAdam under PyTorch FSDP2 (`fully_shard`), FSDP1, DDP and single devices:
checkpoint helpers through torch.distributed.checkpoint (DCP).

Training needs nothing from this module, and neither do checkpoints under FSDP2 or DDP:
`MicroAdam.state_dict()` hands each DTensor param's state out in a form that torch's stock
calls (`get_optimizer_state_dict`, `dcp.save` / `dcp.load`, `set_optimizer_state_dict`)
carry bitwise (sharded_state.py). `save_checkpoint` / `load_checkpoint` are those calls
plus a check, on the checkpoint's metadata alone, that every rank refuses another number
of shards with the reshard command instead of DCP's size mismatch.

FSDP1 reshapes optimizer state like its params, so there each rank's state goes under a
rank-unique key (`microadam_rank{R}`) with its flat range and layout beside it; the same
reader loads rank-keyed checkpoints that older versions wrote for FSDP2 and DDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint.keys import INFO_KEY, META_KEY, clean_fqn, rank_key
from ..config import MicroAdamConfig
from ..layout import STATE_KEYS, Layout
from ..optim import RESHARD_HINT, MicroAdam, holds_fsdp1_params, local_tensor

FORMAT = 1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """Where this rank's local tensor of one optimizer param lies in the whole param.

    engine: "fsdp2" (DTensor), "fsdp1" (FlatParameter or, with use_orig_params=True,
    a view of one), or "local" (DDP, single device: the rank holds the whole tensor).
    global_shape / global_numel: the whole param (for a FlatParameter, the padded
    unsharded flat tensor). flat_offset, local_numel: this rank's elements are
    global_flat[flat_offset : flat_offset + local_numel]; flat_offset is -1 when they
    are not one contiguous range (e.g. a DTensor sharded on dim 1; see `extra`).
    extra: engine details (FSDP2: placements, mesh shape, per-dim offset; FSDP1:
    use_orig_params and, for a FlatParameter, its segments [fqn or None, start, numel]).
    """

    fqn: str
    engine: str
    rank: int
    world_size: int
    global_shape: tuple[int, ...]
    global_numel: int
    flat_offset: int
    local_numel: int
    extra: dict

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["global_shape"] = list(self.global_shape)
        return d


def shard_infos(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[ShardInfo]:
    """One `ShardInfo` per optimizer param, in the optimizer's param order.

    Raises ValueError for a param that `model` does not hold.
    """
    rank, world = _rank_world()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # names without DDP's "module." prefix, as torch's own FQNs
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), clean_fqn(name))
    fsdp1 = _fsdp1_index(model)
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not "
                                 "a parameter of the model passed in; pass the model the optimizer trains")
            out.append(_shard_info(names[id(p)], p, rank, world, fsdp1.get(id(p))))
    return out


def _shard_info(fqn: str, p: torch.Tensor, rank: int, world: int, fsdp1: tuple | None) -> ShardInfo:
    local = local_tensor(p)
    if local is not p:  # a DTensor: FSDP2 (or any DTensor sharding)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape = tuple(p.shape)
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(local_shape) != tuple(local.shape):
            raise RuntimeError(f"{fqn}: local shard shape {tuple(local.shape)} differs from the "
                               f"DTensor's computed {tuple(local_shape)}; padded local shards are not supported")
        extra = {"placements": [repr(pl) for pl in p.placements],
                 "mesh_shape": list(p.device_mesh.shape), "global_offset": list(offset)}
        return ShardInfo(fqn, "fsdp2", rank, world, shape, p.numel(),
                         _flat_offset(shape, tuple(local_shape), tuple(offset)), local.numel(), extra)
    if fsdp1 is not None:
        handle, index, prefix = fsdp1
        fp = handle.flat_param
        if index is None:  # the FlatParameter itself (use_orig_params=False)
            total = int(fp._padded_unsharded_size.numel())
            return ShardInfo(fqn, "fsdp1", handle.rank, handle.world_size, (total,), total,
                             handle.rank * p.numel(), p.numel(),
                             {"use_orig_params": False, "segments": _segments(prefix, fp)})
        info = fp._shard_param_infos[index]
        shape = tuple(fp._shapes[index])
        numel = int(fp._numels[index])
        start, count = (int(info.intra_param_start_idx), int(info.numel_in_shard)) if info.in_shard else (0, 0)
        if count != p.numel():
            raise RuntimeError(f"{fqn}: FSDP1 view holds {p.numel()} elements, its shard info says {count}")
        return ShardInfo(fqn, "fsdp1", handle.rank, handle.world_size, shape, numel, start, count,
                         {"use_orig_params": True})
    return ShardInfo(fqn, "local", rank, world, tuple(p.shape), p.numel(), 0, p.numel(), {})


def _flat_offset(shape: tuple, local_shape: tuple, offset: tuple) -> int:
    """Row-major flat offset of a block, or -1 if the block is not contiguous in the flat view."""
    if 0 in local_shape:
        return 0
    dims = len(shape)
    # Contiguous iff, past the first dim whose extent exceeds 1, every dim is whole.
    first = next((d for d in range(dims) if local_shape[d] != 1), dims)
    if any(local_shape[d] != shape[d] for d in range(first + 1, dims)):
        return -1
    flat, stride = 0, 1
    for d in reversed(range(dims)):
        flat += offset[d] * stride
        stride *= shape[d]
    return flat


def _fsdp1_index(model: torch.nn.Module) -> dict[int, tuple]:
    """id(param) -> (FlatParamHandle, index of the original param or None for the
    FlatParameter, the clean name prefix of the FSDP unit)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without distributed
        return {}
    out: dict[int, tuple] = {}
    for prefix, mod in model.named_modules():
        handle = getattr(mod, "_handle", None) if isinstance(mod, FSDP) else None
        if handle is None:
            continue
        fp = handle.flat_param
        unit = clean_fqn(prefix + "." if prefix else "")
        out[id(fp)] = (handle, None, unit)
        for i, orig in enumerate(getattr(fp, "_params", None) or []):
            out[id(orig)] = (handle, i, unit)
    return out


def _segments(prefix: str, fp) -> list:
    """[param fqn or None for padding, start, numel] for each piece of an unsharded FlatParameter."""
    names = iter(fp._fqns)
    out, start = [], 0
    for numel, pad in zip(fp._numels_with_padding, fp._is_padding_mask):
        out.append([None if pad else prefix + clean_fqn(next(names)), start, int(numel)])
        start += int(numel)
    return out


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in this rank's optimizer state (what `state_bytes` predicts).

    Any optimizer: a DTensor state (torch AdamW's moments under FSDP2) counts by its local
    shard, not by its global size."""
    return sum(local_tensor(v).numel() * v.element_size() for st in optimizer.state.values()
               for v in st.values() if isinstance(v, torch.Tensor))


# -- the DCP state dict ------------------------------------------------------------------

def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def _engines(infos: list[ShardInfo]) -> str:
    return "+".join(sorted({i.engine for i in infos})) or "none"


def _require_microadam(optimizer: Any) -> None:
    if not isinstance(optimizer, MicroAdam):
        raise TypeError(f"expected a MicroAdam optimizer, got {type(optimizer).__name__}; use "
                        "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict for others")


def optimizer_state_dict(model: torch.nn.Module, optimizer: MicroAdam) -> dict[str, Any]:
    """This rank's MicroAdam state as a DCP-ready dict (collective-free; call on every rank).

    {"microadam_meta": JSON str (format, world size, engine, param groups by fqn),
     "microadam_rank{R}": {fqn: {step, layout, ef, ef_min, ef_max, win_idx, win_val},
                           "_info": JSON str (ShardInfo and layout per param, counters)}}
    The tensors are the optimizer's own (not copies): save before the next step.
    """
    _require_microadam(optimizer)
    infos = shard_infos(model, optimizer)
    rank, world = _rank_world()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups, it = [], iter(infos)
    for g in optimizer.param_groups:
        hyper = {k: _jsonable(v) for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "params": [next(it).fqn for _ in g["params"]]})
    mine: dict[str, Any] = {}
    described = {}
    for p, info in zip(params, infos):
        st = optimizer.state.get(p)
        if not st:
            continue
        mine[info.fqn] = {k: st[k] for k in STATE_KEYS}
        described[info.fqn] = {**info.as_dict(), "layout": st["layout"].tolist()}
    mine[INFO_KEY] = json.dumps({"rank": rank, "params": described,
                                 "nonfinite_skips": optimizer.nonfinite_skips})
    meta = json.dumps({"format": FORMAT, "world_size": world, "engine": _engines(infos),
                       "param_groups": groups})
    return {META_KEY: meta, rank_key(rank): mine}


def set_optimizer_state_dict(model: torch.nn.Module, optimizer: MicroAdam, state_dict: dict) -> None:
    """Restore this rank's state from a dict shaped like `optimizer_state_dict`'s, after
    `torch.distributed.checkpoint.load` filled it. Validates everything first."""
    _require_microadam(optimizer)
    infos = shard_infos(model, optimizer)
    rank, _ = _rank_world()
    meta = json.loads(state_dict[META_KEY])
    problem = _mismatch(meta, json.loads(state_dict[rank_key(rank)][INFO_KEY])
                        if rank_key(rank) in state_dict else None, infos, optimizer, "the state dict")
    if problem:
        raise ValueError(problem)
    mine = state_dict[rank_key(rank)]
    info = json.loads(mine[INFO_KEY])
    index = {i.fqn: n for n, i in enumerate(infos)}
    state = {index[fqn]: {k: mine[fqn][k] for k in STATE_KEYS} for fqn in info["params"]}
    groups, start = [], 0
    for saved in meta["param_groups"]:
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"}
        groups.append({**hyper, "params": list(range(start, start + len(saved["params"])))})
        start += len(saved["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups,
                               "microadam": {"format": 1, "nonfinite_skips": info["nonfinite_skips"]}})


def _expected_layout(info: ShardInfo, group: dict) -> Layout:
    config = MicroAdamConfig(**{k: group[k] for k in MicroAdamConfig.field_names()})
    return Layout.for_numel(info.local_numel, config)


def _mismatch(meta: dict, saved: dict | None, infos: list[ShardInfo], optimizer: MicroAdam,
              where: str) -> str:
    """'' when this rank can load `saved` (its info entry); otherwise the error to raise."""
    rank, world = _rank_world()
    if meta.get("format") != FORMAT:
        return f"{where} holds MicroAdam checkpoint format {meta.get('format')!r}; this version reads {FORMAT}"
    head = (f"MicroAdam checkpoint in {where} was saved by {meta['world_size']} rank(s) "
            f"({meta['engine']}); this run has {world} rank(s) ({_engines(infos)})")
    saved_fqns = [f for g in meta["param_groups"] for f in g["params"]]
    fqns = [i.fqn for i in infos]
    if saved_fqns != fqns:
        missing = sorted(set(saved_fqns) - set(fqns))[:3]
        new = sorted(set(fqns) - set(saved_fqns))[:3]
        return (f"{head}, and its params differ from the optimizer's (only in the checkpoint: {missing}; "
                f"only in the optimizer: {new}; or another order or grouping)")
    # As in Optimizer.load_state_dict, the saved hyper-parameters replace the group's.
    groups = [{**g, **{k: v for k, v in sg.items() if k != "params"}}
              for g, sg in zip(optimizer.param_groups, meta["param_groups"]) for _ in g["params"]]
    if saved is None:
        info = infos[0] if infos else None
        need = _expected_layout(info, groups[0]).describe() if info else "none"
        return (f"{head}: rank {rank} has no state in it (this run needs e.g. {info.fqn if info else ''} "
                f"[{need}]); {RESHARD_HINT}")
    if saved.get("rank") != rank:
        # DCP keeps one copy of equal keys; a state not stored under a rank-unique key
        # comes back as another rank's.
        return (f"{head}: the state loaded for rank {rank} was written by rank {saved.get('rank')} "
                "(saved under a key shared by all ranks, so all but one rank's state is lost)")
    for info, group in zip(infos, groups):
        entry = saved["params"].get(info.fqn)
        need = _expected_layout(info, group)
        if entry is None:
            if need.n and meta["world_size"] != world:
                return (f"{head}: rank {rank} holds {info.local_numel} elements of {info.fqn!r} "
                        f"[{need.describe()}] but saved no state for it; {RESHARD_HINT}")
            continue
        have = Layout.from_tensor(torch.tensor(entry["layout"]))
        if have != need:
            return (f"{head}: {info.fqn!r} on rank {rank} was saved with layout [{have.describe()}] "
                    f"(flat range {entry['flat_offset']}+{entry['local_numel']} of {entry['global_numel']}) "
                    f"but this run needs [{need.describe()}] (flat range {info.flat_offset}+"
                    f"{info.local_numel}); {RESHARD_HINT}")
    if meta["world_size"] != world:
        return f"{head}; {RESHARD_HINT}"
    return ""


# -- save / load a whole training state -----------------------------------------------

def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None) -> None:
    """Save {"model": get_model_state_dict, "optim": get_optimizer_state_dict, "extra": the
    JSON of `extra`} to the DCP directory `path`: torch's stock form, which every framework's
    loader reads. MicroAdam under FSDP1: the rank-keyed form (`optimizer_state_dict`).
    Collective: call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = (optimizer_state_dict(model, optimizer) if isinstance(optimizer, MicroAdam) and holds_fsdp1_params(optimizer)
             else get_optimizer_state_dict(model, optimizer))
    sd = {"model": get_model_state_dict(model), "optim": optim, "extra": json.dumps(extra or {})}
    dcp.save(sd, checkpoint_id=os.fspath(path))


def check_shards(path: str | os.PathLike, model: torch.nn.Module, optimizer: MicroAdam,
                 key: str = "optim") -> None:
    """Raise ValueError, naming both shard counts and the reshard command, if a stock-form
    MicroAdam state under `key` of DCP checkpoint `path` was saved for another number of
    shards than this run's. Reads only the metadata, which every rank reads alike, so every
    rank raises the same error without a collective."""
    import torch.distributed.checkpoint as dcp
    from .. import sharded_state

    stored = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    for info, (p, group) in zip(shard_infos(model, optimizer), params):
        meta = stored.get(f"{key}.state.{info.fqn}.{sharded_state.SHARDS_KEY}")
        geo = sharded_state.geometry(p)
        saved = int(meta.size[1]) - 1 if meta is not None and len(getattr(meta, "size", ())) == 2 else None
        if meta is None and geo is None:
            continue
        if meta is None and f"{key}.state.{info.fqn}.layout" not in stored:
            continue  # no state saved for this param (never stepped)
        now = geo.shards if geo is not None else 1
        if saved != now:
            was = f"{saved} shard(s)" if saved is not None else "an unsharded param"
            here = f"{now} shard(s)" if geo is not None else "an unsharded param"
            raise ValueError(f"MicroAdam checkpoint {os.fspath(path)}: {info.fqn!r} was saved for {was}; "
                             f"this run holds {here}. A MicroAdam state is tied to its sharding: load it "
                             f"at the world size it was saved with, or {RESHARD_HINT}")
        if geo is None:
            continue
        # Same shards: the window and block sizes (m, density, block sizes) must match too,
        # or DCP would stop at a size mismatch; the padded sizes tell them apart.
        need = _expected_layout(info, group)
        for k, size in sharded_state.padded_sizes(need, geo.max_numel).items():
            have = stored.get(f"{key}.state.{info.fqn}.{k}")
            if have is not None and tuple(have.size) != (now * size,):
                raise ValueError(
                    f"MicroAdam checkpoint {os.fspath(path)}: state {k!r} of {info.fqn!r} holds "
                    f"{tuple(have.size)} elements, but this run's layout [{need.describe()}] over {now} "
                    f"shard(s) needs ({now * size},): it was saved with another m, density or block "
                    f"size. Build the optimizer with the saved hyper-parameters, or {RESHARD_HINT}; "
                    "its --set KEY=VALUE changes m, density or the block sizes")


def check_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: MicroAdam,
                     key: str = "optim") -> dict:
    """Validate that this run can load the MicroAdam state under `key` of DCP checkpoint
    `path`, reading only its metadata. Collective; every rank raises the same ValueError
    (naming both layouts and the reshard command) if any rank cannot. Returns the
    rank's saved info entry (what `load_checkpoint` needs to build its load template)."""
    import torch.distributed.checkpoint as dcp

    infos = shard_infos(model, optimizer)
    rank, world = _rank_world()
    stored = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    sd: dict[str, Any] = {META_KEY: ""}
    mine = f"{key}.{rank_key(rank)}.{INFO_KEY}"
    if mine in stored:
        sd[rank_key(rank)] = {INFO_KEY: ""}
    if f"{key}.{META_KEY}" not in stored:
        problem = f"{os.fspath(path)} holds no MicroAdam state under {key!r}"
        meta, saved = {}, None
    else:
        dcp.load({key: sd}, checkpoint_id=os.fspath(path))
        meta = json.loads(sd[META_KEY])
        saved = json.loads(sd[rank_key(rank)][INFO_KEY]) if rank_key(rank) in sd else None
        problem = _mismatch(meta, saved, infos, optimizer, os.fspath(path))
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    first = next(((r, p) for r, p in enumerate(problems) if p), None)
    if first:
        raise ValueError(first[1] if first[0] == rank else f"rank {first[0]} cannot load: {first[1]}")
    return saved


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Load what `save_checkpoint` wrote into `model` and `optimizer`; returns `extra`.

    The stock form through torch's get_* templates, `dcp.load` and set_*, after
    `check_shards`; the rank-keyed form (FSDP1, older FSDP2 / DDP checkpoints) after
    `check_checkpoint`. Either way a checkpoint of another world size or layout is refused
    on every rank before any tensor is read. Collective: call on every rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as stock_set

    path = os.fspath(path)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    sd: dict[str, Any] = {"model": get_model_state_dict(model), "extra": ""}
    rank_keyed = isinstance(optimizer, MicroAdam) and f"optim.{META_KEY}" in stored
    if rank_keyed:
        saved = check_checkpoint(path, model, optimizer)
        rank, _ = _rank_world()
        params = {i.fqn: p for i, p in zip(shard_infos(model, optimizer),
                                           [p for g in optimizer.param_groups for p in g["params"]])}
        template = {fqn: Layout.from_tensor(torch.tensor(e["layout"])).new_state(local_tensor(params[fqn]).device)
                    for fqn, e in (saved or {"params": {}})["params"].items()}
        template[INFO_KEY] = ""
        sd["optim"] = {META_KEY: "", rank_key(rank): template}
    elif isinstance(optimizer, MicroAdam) and holds_fsdp1_params(optimizer):
        raise ValueError(f"{path} holds no rank-keyed MicroAdam state ('optim.{META_KEY}'), the only "
                         "form FSDP1 can load: it was not saved by save_checkpoint under FSDP1. Load it "
                         "with the engine it was saved with (FSDP2's fully_shard or DDP); to move it to "
                         f"another world size: {RESHARD_HINT}")
    else:
        if isinstance(optimizer, MicroAdam):
            check_shards(path, model, optimizer)
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    if rank_keyed:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    else:
        stock_set(model, optimizer, sd["optim"])
    return json.loads(sd["extra"])


__all__ = ["ShardInfo", "shard_infos", "state_nbytes", "optimizer_state_dict",
           "set_optimizer_state_dict", "save_checkpoint", "load_checkpoint", "check_checkpoint", "check_shards",
           "rank_key", "clean_fqn", "META_KEY", "INFO_KEY"]
