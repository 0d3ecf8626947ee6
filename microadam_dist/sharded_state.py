"""MicroAdam's state in torch's state-dict world: what `MicroAdam.state_dict()` hands to
torch.distributed.checkpoint (DCP) and what `load_state_dict` takes back.

A param that is a plain tensor (one device, DDP, DeepSpeed's partitions) keeps its state
as it lives in the optimizer (layout.py): every rank that holds it holds the same values.

A param that is a DTensor (FSDP2's `fully_shard`, HSDP, any DTensor sharding) needs more,
because each rank's state belongs to its own shard and differs in size and content. torch's
stock calls (`get_optimizer_state_dict`, `dcp.save` / `dcp.load`, the full-state gather
and the rank-0 broadcast) treat a plain tensor as a replicated value and derive a
DTensor's chunk offsets from its global shape, not from the local sizes. So each state
tensor of such a param leaves as a DTensor on the param's mesh:

* flattened to 1-D and zero-padded to the size of the largest shard's state, so that the
  global tensor is `shards * padded` long and chunk r of it (torch.chunk, DCP, the
  broadcast path's `distribute_tensor`) is exactly rank r's state;
* `Shard(0)` on every mesh dimension where the param is sharded, `Replicate()` where it is
  replicated (HSDP: one copy per replica group is written, every replica loads it);
* `step` and `layout` too (one and seven int64 per shard, on the param's device), since a
  rank may have skipped a step that another took and every rank's layout is its own;
* `win_idx` as its bytes (uint8, two per int16 index, native byte order): neither gloo
  nor NCCL carries int16, and the full-state gather and the broadcast are collectives;
* first, `shards`: a uint8 DTensor of global shape (shards, shards + 1). At another number
  of shards it cannot be copied into this run's (shards', shards' + 1) on ANY rank (its
  second dim, never 1, differs), so torch's rank-0 broadcast, which copies each tensor's
  chunk into the template key by key, fails on every rank at the first key instead of on
  some ranks at a later one (the others would wait in the next broadcast forever); DCP's
  load reports the size mismatch; every other path reaches `check_state`.

The padding is at most one shard's state per rank, and a shard never holds more than the
largest. The export is zero-copy where no padding is needed (the tensors are the live
state, as torch's own optimizers hand out theirs); `load_state_dict` copies back.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .layout import STATE_KEYS, Layout

SHARDS_KEY = "shards"
# Types that are never DTensors: step() takes them as they are, without a local_tensor call.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP2), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class Geometry(NamedTuple):
    """How a DTensor param's state is placed: its mesh, the state's placements, the number
    of shards (product of the sharded mesh dims), this rank's shard index, and the element
    count of the largest shard (torch.chunk puts the largest chunk first)."""

    mesh: Any
    placements: tuple
    shards: int
    index: int
    max_numel: int


def is_fsdp1_param(p: torch.Tensor) -> bool:
    """Whether FSDP1 (FullyShardedDataParallel) manages `p`: a FlatParameter, or (with
    use_orig_params=True) an original param viewing one. Their state has no checkpoint form."""
    return bool(getattr(p, "_fsdp_flattened", False))


def is_dtensor(t: Any) -> bool:
    return callable(getattr(t, "to_local", None)) and hasattr(t, "device_mesh")


def geometry(p: torch.Tensor) -> Geometry | None:
    """The state placement for param `p`, or None for a plain tensor."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    shape = list(p.shape)
    coordinate = mesh.get_coordinate()
    shards, index, state_placements = 1, 0, []
    for dim, pl in enumerate(placements):
        if pl.is_replicate():
            state_placements.append(Replicate())
        elif pl.is_shard():
            size = mesh.size(dim)
            shards *= size
            index = index * size + coordinate[dim]
            # The first chunk is the largest: ceil(rows / size) (torch.chunk, as FSDP2 and
            # DTensor split a dim).
            d = pl.dim if pl.dim >= 0 else pl.dim + len(shape)
            shape[d] = -(-shape[d] // size) if shape[d] else 0
            state_placements.append(Shard(0))
        else:
            raise RuntimeError(f"MicroAdam cannot place the state of a DTensor param with placements "
                               f"{placements}: each mesh dimension must shard or replicate it")
    max_numel = math.prod(shape)
    local = p.to_local().numel()
    if local > max_numel:
        raise RuntimeError(f"a DTensor param's local shard holds {local} elements, more than the "
                           f"largest chunk ({max_numel}) of its placements {placements}")
    return Geometry(mesh, tuple(state_placements), shards, index, max_numel)


def padded_sizes(layout: Layout, max_numel: int) -> dict[str, int]:
    """Elements per shard of each checkpoint-form tensor: the largest shard's size, which
    every rank derives alone (no communication) from the layout's block sizes. The window
    counts k_block for every top-k block, an upper bound of its last block's k."""
    n = max_numel
    k = -(-n // layout.topk_block) * layout.k_block
    return {"step": 1, "layout": 7, "ef": (n + 1) // 2, "ef_min": -(-n // layout.quant_block),
            "ef_max": -(-n // layout.quant_block), "win_idx": 2 * layout.m * k, "win_val": layout.m * k}


def _flat_bytes(key: str, t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if key == "win_idx" else flat


def padded_local(key: str, state: dict, size: int, device: torch.device) -> torch.Tensor:
    """One shard's chunk of checkpoint-form tensor `key`: the live tensor (layout.py)
    flattened (win_idx as bytes) and zero-padded to `size` elements (`padded_sizes`)."""
    if key == "step":
        local = state["step"].reshape(1).to(device=device, copy=True)
    elif key == "layout":
        local = state["layout"].to(device=device, copy=True)
    else:
        local = _flat_bytes(key, state[key])
    if local.numel() != size:
        pad = local.new_zeros(size)
        pad[:local.numel()] = local
        local = pad
    return local


def unpadded(key: str, chunk: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The live tensor (layout.py `shape`) at the start of one shard's 1-D checkpoint-form
    chunk, win_idx's bytes read back as int16 (the inverse of `padded_local`); a live tensor
    flattened gives itself back. A view, not a copy."""
    count = math.prod(shape)
    if key == "win_idx" and chunk.dtype == torch.uint8:
        chunk = chunk[:2 * count].view(torch.int16)
    return chunk[:count].reshape(shape)


def export_state(state: dict, geo: Geometry, device: torch.device) -> dict[str, Any]:
    """One DTensor param's state (plain local tensors, layout.py) in checkpoint form."""
    from torch.distributed.tensor import DTensor

    layout = Layout.from_tensor(state["layout"])
    sizes = padded_sizes(layout, geo.max_numel)
    guard = torch.zeros(1, geo.shards + 1, dtype=torch.uint8, device=device)
    out: dict[str, Any] = {SHARDS_KEY: DTensor.from_local(
        guard, geo.mesh, geo.placements, run_check=False,
        shape=torch.Size([geo.shards, geo.shards + 1]), stride=(geo.shards + 1, 1))}
    for key in STATE_KEYS:
        local = padded_local(key, state, sizes[key], device)
        out[key] = DTensor.from_local(local, geo.mesh, geo.placements, run_check=False,
                                      shape=torch.Size([geo.shards * sizes[key]]), stride=(1,))
    for key, value in state.items():  # anything else a state holds travels as it is
        out.setdefault(key, value)
    return out


def check_state(entry: dict, p: torch.Tensor, expected: Layout, name: str, hint: str) -> dict:
    """This rank's tensors of `entry` (a saved state of param `p`, either form; no copies:
    the live tensors, or the padded chunks of the checkpoint form), after checking that it
    fits the layout this run needs. Raises ValueError naming the param, both layouts and
    `hint` (the reshard command)."""
    return _validated(entry, p, expected, name, hint)


def import_state(entry: dict, parts: dict, p: torch.Tensor, expected: Layout) -> dict:
    """`entry`'s state as plain local tensors (layout.py), copied onto the param's device
    (step and layout on the CPU), from the `parts` that `check_state` returned for it."""
    device = local_tensor(p).device
    out: dict[str, Any] = {}
    for key, (_, shape) in expected.expected_specs().items():
        live = unpadded(key, parts[key].detach().reshape(-1), shape)
        out[key] = live.to("cpu" if key in ("step", "layout") else device, copy=True)
    for key, value in entry.items():  # anything else a state holds comes back as it is
        if key != SHARDS_KEY:
            out.setdefault(key, value)
    return out


def _validated(entry: dict, p: torch.Tensor, expected: Layout, name: str, hint: str) -> dict:
    """{key: this rank's tensor} of a valid saved state: the live form's tensors, or the
    local chunks (still padded, win_idx as bytes) of the checkpoint form."""
    if not isinstance(entry, dict):
        raise ValueError(f"MicroAdam state of {name} is a {type(entry).__name__}, not a dict: corrupt checkpoint")
    missing = [k for k in STATE_KEYS if k not in entry]
    if missing:
        raise ValueError(f"MicroAdam state of {name} lacks {missing}; not a MicroAdam state "
                         f"(layout version {expected.version}) or a truncated one")
    win_idx = entry["win_idx"]
    if isinstance(win_idx, torch.Tensor) and not is_dtensor(win_idx) and win_idx.dtype == torch.int16:
        return _validated_live(entry, expected, name, hint)
    return _validated_sharded(entry, p, expected, name, hint)


def _validated_live(entry: dict, expected: Layout, name: str, hint: str) -> dict:
    """The live form (a plain param's state, or a DTensor param's from a rank-keyed
    checkpoint): every tensor with its layout.py dtype and shape."""
    have = Layout.from_tensor(entry["layout"])
    if have != expected:
        raise ValueError(f"MicroAdam state of {name} was saved with layout [{have.describe()}] "
                         f"but this run needs [{expected.describe()}]; {hint}")
    for k, (dtype, shape) in expected.expected_specs().items():
        t = entry[k]
        if not isinstance(t, torch.Tensor) or is_dtensor(t) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"MicroAdam state {k!r} of {name} is {got}, expected {dtype} {shape}: "
                             "corrupt checkpoint")
    return {k: entry[k] for k in STATE_KEYS}


def _validated_sharded(entry: dict, p: torch.Tensor, expected: Layout, name: str, hint: str) -> dict:
    """The checkpoint form: 1-D tensors of `shards * padded` elements (DTensors, or plain
    tensors where the param is a plain tensor and the state was saved as one shard)."""
    geo = geometry(p)
    # The guard is absent where torch keeps only the live state's keys (the flattened form).
    guard, layout_t = entry.get(SHARDS_KEY), entry["layout"]
    if guard is not None and (not isinstance(guard, torch.Tensor) or guard.dim() != 2):
        raise ValueError(f"MicroAdam state {SHARDS_KEY!r} of {name} is not a 2-D tensor: corrupt checkpoint")
    if not isinstance(layout_t, torch.Tensor) or layout_t.dtype != torch.int64 or layout_t.dim() != 1:
        raise ValueError(f"MicroAdam state 'layout' of {name} is not a 1-D int64 tensor: corrupt checkpoint")
    saved_shards = guard.shape[1] - 1 if guard is not None else layout_t.numel() // 7
    shards = geo.shards if geo is not None else 1
    max_numel = geo.max_numel if geo is not None else p.numel()
    if (saved_shards != shards or layout_t.numel() != 7 * shards or local_tensor(layout_t).numel() != 7
            or (guard is not None and tuple(local_tensor(guard).shape) != (1, shards + 1))):
        _refuse_sharding(saved_shards, is_dtensor(layout_t), geo, name, expected, hint)
    have = Layout.from_tensor(local_tensor(layout_t).cpu())
    where = f" (shard {geo.index} of {shards})" if geo is not None and shards > 1 else ""
    if have != expected:
        raise ValueError(f"MicroAdam state of {name}{where} was saved with layout [{have.describe()}] "
                         f"but this run needs [{expected.describe()}]; {hint}")
    sizes = padded_sizes(expected, max_numel)
    specs = expected.expected_specs()
    out: dict[str, torch.Tensor] = {}
    for key in STATE_KEYS:
        t = entry[key]
        dtype = torch.uint8 if key == "win_idx" else specs[key][0]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (shards * sizes[key],):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"MicroAdam state {key!r} of {name} is {got}, expected {dtype} "
                             f"({shards * sizes[key]},) for {shards} shard(s): corrupt checkpoint")
        local = local_tensor(t)
        if local.numel() != sizes[key]:
            raise ValueError(f"MicroAdam state {key!r} of {name}: this rank's chunk holds {local.numel()} "
                             f"elements, expected {sizes[key]}: corrupt checkpoint")
        out[key] = local
    return out


def _refuse_sharding(saved: int, sharded: bool, geo: Geometry | None, name: str, expected: Layout,
                     hint: str) -> None:
    now = (f"{geo.shards} shard(s) on mesh {tuple(geo.mesh.shape)}" if geo is not None
           else "an unsharded param")
    what = (f"{saved} shards gathered into full tensors" if saved > 1 and not sharded
            else f"{saved} shard(s)")
    raise ValueError(f"MicroAdam state of {name} was saved for {what}; this run holds {now} "
                     f"and needs layout [{expected.describe()}]. A MicroAdam state is tied to its "
                     f"sharding: load it at the world size and mesh it was saved with, or {hint}")


__all__ = ["SHARDS_KEY", "local_tensor", "is_fsdp1_param", "unpadded", "Geometry", "geometry", "padded_sizes", "padded_local", "export_state", "check_state", "import_state", "is_dtensor"]
