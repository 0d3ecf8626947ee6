"""Move the MicroAdam state of one logical flat tensor between shardings (pure functions).

Top-k and quant blocks tile each rank's own shard (docs/algorithm.md: no block spans two
ranks, so a step needs no communication), so a new sharding has new top-k and quant
blocks and the state must be re-materialized, not copied:

1. `materialize`: dequantize every source EF to its global positions and list every
   window entry that was written as (global index, age, value), with
   age = (t - 1 - row) mod m.
2. `rebuild`: for each destination shard, the entries fall into the new top-k blocks
   by global index and into rows by age (same step t, ages kept). Where a new block
   row would hold more than its k entries, the largest |value| stay (ties: lower
   index) and the rest are *folded*: their value is added to the dense EF residual, so
   their mass is kept. The EF is then requantized once per new quant block (nearest).
   A new quant block that covers exactly the range of a source quant block and
   received no folded mass keeps its source codes, min and max bit for bit.

The guarantee is stated in docs/checkpoints.md and checked by tests/test_reshard.py.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..config import MicroAdamConfig
from ..layout import STATE_KEYS, Layout
from ..ops import reference


class ReshardError(ValueError):
    """The source shards cannot be resharded (inconsistent, overlapping or corrupt)."""


@dataclasses.dataclass
class ShardState:
    """One source shard: elements [offset, offset + numel) of the flat tensor and its state."""

    offset: int
    numel: int
    state: dict


@dataclasses.dataclass
class Materialized:
    """The state of the whole flat tensor, independent of any sharding.

    step: the common step t; ef: float32 (n,) dequantized EF at global positions;
    idx: int64 (E,) global indices, age: int64 (E,), val: float32 (E,) (bf16-exact)
    of every written window entry; ef_blocks: {(start, end): (codes int64, min, max)}
    of every source quant block, so that untouched blocks can be copied exactly.
    """

    n: int
    step: int
    m: int
    ef: torch.Tensor
    idx: torch.Tensor
    age: torch.Tensor
    val: torch.Tensor
    ef_blocks: dict


@dataclasses.dataclass
class ReshardReport:
    """Entry counts of one rebuild: entries_in == entries_kept + entries_folded."""

    entries_in: int = 0
    entries_kept: int = 0
    entries_folded: int = 0
    filler: int = 0  # zero-valued entries added to fill rows that have fewer than k entries
    folded_abs_mass: float = 0.0
    ef_blocks_copied: int = 0
    ef_blocks_requantized: int = 0
    padding_dropped: int = 0  # entries at engine padding (no parameter), see `retarget`

    def add(self, other: "ReshardReport") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def even_ranges(n: int, world_size: int) -> list[tuple[int, int]]:
    """(offset, numel) of each rank when a flat tensor of n elements is split in
    ceil(n / world_size) chunks (the last ones may be short or empty)."""
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}; expected an integer >= 1")
    chunk = -(-n // world_size) if n else 0
    out = []
    for r in range(world_size):
        lo = min(n, r * chunk)
        hi = min(n, lo + chunk)
        out.append((lo, hi - lo))
    return out


def _check_cover(ranges: Sequence[tuple[int, int]], n: int, what: str) -> None:
    pos = 0
    for off, numel in sorted((o, k) for o, k in ranges if k > 0):
        if off != pos:
            gap = "overlap" if off < pos else "gap"
            raise ReshardError(f"{what} shards do not tile [0, {n}): {gap} at element {min(off, pos)}")
        pos = off + numel
    if pos != n:
        raise ReshardError(f"{what} shards cover [0, {pos}) but the tensor has {n} elements")


def _check_state(st: dict, numel: int, where: str) -> Layout:
    missing = [k for k in STATE_KEYS if k not in st]
    if missing:
        raise ReshardError(f"{where}: state lacks {missing}; not a MicroAdam state")
    layout = Layout.from_tensor(st["layout"])
    if layout.n != numel:
        raise ReshardError(f"{where}: layout says n={layout.n} but the shard has {numel} elements")
    for k, (dtype, shape) in layout.expected_specs().items():
        t = st[k]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ReshardError(f"{where}: state {k!r} is {got}, expected {dtype} {shape}")
    return layout


def materialize(shards: Sequence[ShardState], n: int) -> Materialized:
    """Global EF and window entries of a flat tensor of n elements from its source shards."""
    _check_cover([(s.offset, s.numel) for s in shards], n, "source")
    live = [s for s in shards if s.numel > 0]
    steps = {int(s.state["step"]) for s in live if "step" in s.state}
    if len(steps) > 1:
        raise ReshardError(f"source shards were saved at different steps {sorted(steps)}; "
                           "every shard of a tensor must share its step count")
    step = steps.pop() if steps else 0
    ms = {int(Layout.from_tensor(s.state["layout"]).m) for s in live if "layout" in s.state}
    if len(ms) > 1:
        raise ReshardError(f"source shards have different window sizes m={sorted(ms)}")
    m = ms.pop() if ms else 1
    ef = torch.zeros(n, dtype=torch.float32)
    idx, age, val = [], [], []
    ef_blocks: dict = {}
    for si, s in enumerate(live):
        where = f"source shard {si} (offset {s.offset}, numel {s.numel})"
        lay = _check_state(s.state, s.numel, where)
        st = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.state.items()}
        ef[s.offset:s.offset + s.numel] = reference.dequantize_ef(
            st["ef"], st["ef_min"], st["ef_max"], lay.n, lay.quant_block)
        codes = reference.unpack_codes(st["ef"], lay.n)
        for q in range(lay.n_quant_blocks):
            lo, hi = q * lay.quant_block, min(lay.n, (q + 1) * lay.quant_block)
            ef_blocks[(s.offset + lo, s.offset + hi)] = (
                codes[lo:hi], st["ef_min"][q].clone(), st["ef_max"][q].clone())
        written = [r for r in range(lay.m) if r < step]
        if not written or lay.k_total == 0:
            continue
        local = st["win_idx"].to(torch.int64)
        blen = torch.repeat_interleave(
            torch.tensor([min(lay.topk_block, lay.n - b * lay.topk_block) for b in range(lay.n_topk_blocks)]),
            lay.block_k())
        if bool(((local < 0) | (local >= blen)).any()):
            raise ReshardError(f"{where}: window index outside its top-k block: corrupt state")
        pos = reference.window_positions(st["win_idx"], lay) + s.offset
        ages = reference.window_ages(step, lay.m)
        for r in written:
            idx.append(pos[r])
            age.append(torch.full((lay.k_total,), ages[r], dtype=torch.int64))
            val.append(st["win_val"][r].to(torch.float32))
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
    return Materialized(n=n, step=step, m=m, ef=ef, idx=cat(idx, torch.int64), age=cat(age, torch.int64),
                        val=cat(val, torch.float32), ef_blocks=ef_blocks)


def retarget(mat: Materialized, keep: int, n: int) -> Materialized:
    """The state of elements [0, keep) placed in a tensor of n >= keep elements whose
    tail [keep, n) starts empty (zero EF, no window entries).

    For engines that pad a flat tensor to a multiple of the world size (ZeRO-1/2): the
    source padding belongs to no parameter, so its state is dropped, and the destination
    gets the padding its own world size needs.
    """
    if not 0 <= keep <= min(n, mat.n):
        raise ReshardError(f"cannot keep {keep} elements of a tensor of {mat.n} in one of {n}")
    sel = mat.idx < keep
    ef = torch.zeros(n, dtype=torch.float32)
    ef[:keep] = mat.ef[:keep]
    blocks = {k: v for k, v in mat.ef_blocks.items() if k[1] <= keep}
    return Materialized(n=n, step=mat.step, m=mat.m, ef=ef, idx=mat.idx[sel], age=mat.age[sel],
                        val=mat.val[sel], ef_blocks=blocks)


def remap(mat: Materialized, where: torch.Tensor, n: int) -> tuple[Materialized, int]:
    """The state moved element by element: element i goes to position where[i] of a tensor
    of n elements; where[i] < 0 drops it (engine padding, which belongs to no parameter).

    For engines whose shards are not one contiguous range of one tensor (ZeRO-3: each
    rank holds a slice of every parameter). Positions no element moves to start empty.
    A source quant block whose elements land contiguously and in order keeps its codes
    (`rebuild_shard` copies it if a new quant block covers exactly that range).
    Returns the moved state and the number of window entries dropped with the padding.
    """
    where = torch.as_tensor(where, dtype=torch.int64)
    if where.shape != (mat.n,):
        raise ReshardError(f"remap needs one target per element: {tuple(where.shape)} for {mat.n} elements")
    live = where >= 0
    dst = where[live]
    if dst.numel() and (int(dst.max()) >= n or int(torch.unique(dst).numel()) != dst.numel()):
        raise ReshardError(f"remap targets must be distinct positions in [0, {n})")
    ef = torch.zeros(n, dtype=torch.float32)
    ef[dst] = mat.ef[live]
    sel = live[mat.idx]
    blocks = {}
    for (s, e), v in mat.ef_blocks.items():
        w = where[s:e]
        if int(w[0]) >= 0 and torch.equal(w, w[0] + torch.arange(e - s)):
            blocks[(int(w[0]), int(w[0]) + e - s)] = v
    moved = Materialized(n=n, step=mat.step, m=mat.m, ef=ef, idx=where[mat.idx[sel]], age=mat.age[sel],
                         val=mat.val[sel], ef_blocks=blocks)
    return moved, int((~sel).sum())


def _keep_order(block: torch.Tensor, age: torch.Tensor, val: torch.Tensor, local: torch.Tensor,
                m: int) -> torch.Tensor:
    """Permutation sorting entries by (block, age), then |val| descending, then index ascending."""
    order = torch.argsort(local, stable=True)
    order = order[torch.argsort(-val[order].abs(), stable=True)]
    group = block * m + age
    return order[torch.argsort(group[order], stable=True)]


def rebuild_shard(mat: Materialized, offset: int, numel: int, config: MicroAdamConfig,
                  device: torch.device | str = "cpu") -> tuple[dict, ReshardReport]:
    """State of the destination shard [offset, offset + numel) under `config`, and its report."""
    rep = ReshardReport()
    if numel == 0:
        return {}, rep
    lay = Layout.for_numel(numel, config)
    st = lay.new_state(torch.device("cpu"))
    st["step"].fill_(mat.step)
    sel = (mat.idx >= offset) & (mat.idx < offset + numel)
    g = mat.idx[sel] - offset
    age, val = mat.age[sel], mat.val[sel]
    rep.entries_in = int(g.numel())
    B, m = lay.topk_block, lay.m
    block = g // B
    local = g - block * B
    kb = lay.block_k()
    # Group key: ages may reach the source m, which can exceed the new one.
    span = max(m, mat.m)
    order = _keep_order(block, age, val, local, span)
    g, age, val, block, local = g[order], age[order], val[order], block[order], local[order]
    # Rank within its (block, age) group: sorted, so rank = position - first position of the group.
    key = block * span + age
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    start = torch.cummax(torch.where(first, torch.arange(key.numel()), torch.zeros_like(key)), 0).values
    rank = torch.arange(key.numel()) - start
    keep = (age < m) & (rank < kb[block])

    ef = mat.ef[offset:offset + numel].clone()
    folded = ~keep
    ef.index_add_(0, g[folded], val[folded])
    rep.entries_folded = int(folded.sum())
    rep.entries_kept = rep.entries_in - rep.entries_folded
    rep.folded_abs_mass = float(val[folded].abs().sum())
    _fill_window(st, lay, mat.step, block[keep], local[keep], age[keep], val[keep], rep)
    _requantize(st, lay, ef, mat, offset, g[folded], rep)
    out = {k: (v if k in ("step", "layout") else v.to(device)) for k, v in st.items()}
    return out, rep


def _fill_window(st: dict, lay: Layout, step: int, block: torch.Tensor, local: torch.Tensor,
                 age: torch.Tensor, val: torch.Tensor, rep: ReshardReport) -> None:
    """Write kept entries into rows by age; pad each block row to k entries with zero values
    at the lowest unused indices, so every row stays ascending and duplicate-free."""
    nb, B, m = lay.n_topk_blocks, lay.topk_block, lay.m
    if step == 0:
        return
    length = torch.tensor([min(B, lay.n - b * B) for b in range(nb)])
    valid = torch.arange(B).unsqueeze(0) < length.unsqueeze(1)  # (nb, B)
    for r in range(m):
        a = (step - 1 - r) % m
        if r >= step:  # never written: stays index 0, value 0
            continue
        here = age == a
        vals = torch.zeros(nb, B, dtype=torch.float32)
        score = torch.where(valid, 1, 2).to(torch.int64)  # 0 kept, 1 free, 2 past the block end
        vals[block[here], local[here]] = val[here]
        score[block[here], local[here]] = 0
        sort_key = score * B + torch.arange(B).unsqueeze(0)
        chosen = torch.topk(sort_key, lay.k_block, dim=1, largest=False).indices  # (nb, k_block)
        chosen = torch.sort(chosen, dim=1).values
        picked_vals = torch.gather(vals, 1, chosen)
        if lay.k_last < lay.k_block:
            last = torch.topk(sort_key[-1], lay.k_last, largest=False).indices.sort().values
            cols = torch.cat([chosen[:-1].reshape(-1), last])
            row_vals = torch.cat([picked_vals[:-1].reshape(-1), vals[-1, last]])
        else:
            cols, row_vals = chosen.reshape(-1), picked_vals.reshape(-1)
        st["win_idx"][r] = cols.to(torch.int16)
        st["win_val"][r] = row_vals.to(torch.bfloat16)
        rep.filler += lay.k_total - int(here.sum())


def _requantize(st: dict, lay: Layout, ef: torch.Tensor, mat: Materialized, offset: int,
                folded_at: torch.Tensor, rep: ReshardReport) -> None:
    codes_packed, lo, hi = reference.quantize_ef(ef, lay.quant_block, "nearest", mat.step)
    codes = reference.unpack_codes(codes_packed, lay.n)
    touched = torch.zeros(lay.n_quant_blocks, dtype=torch.bool)
    touched[folded_at // lay.quant_block] = True
    copied = 0
    for q in range(lay.n_quant_blocks):
        a, b = q * lay.quant_block, min(lay.n, (q + 1) * lay.quant_block)
        src = mat.ef_blocks.get((offset + a, offset + b))
        if src is not None and not bool(touched[q]):
            # Same range, nothing folded in: keep the source codes exactly (requantizing
            # decoded values could move a code by one where min + 15*scale != max in fp32).
            codes[a:b], lo[q], hi[q] = src
            copied += 1
    st["ef"].copy_(reference.pack_codes(codes))
    st["ef_min"].copy_(lo)
    st["ef_max"].copy_(hi)
    rep.ef_blocks_copied += copied
    rep.ef_blocks_requantized += lay.n_quant_blocks - copied


def reshard_tensor(src: Sequence[ShardState], n: int, dst: Sequence[tuple[int, int]],
                   config: MicroAdamConfig, device: torch.device | str = "cpu"
                   ) -> tuple[list[dict], ReshardReport]:
    """States for destination shards `dst` [(offset, numel)] of a flat tensor of n elements.

    `config` gives the destination block sizes, density and m (it may differ from the
    source's). Returns one state per destination shard ({} for an empty one) and the
    summed report.
    """
    _check_cover(dst, n, "destination")
    mat = materialize(src, n)
    total = ReshardReport()
    out = []
    for off, numel in dst:
        st, rep = rebuild_shard(mat, off, numel, config, device)
        out.append(st)
        total.add(rep)
    # entries_in counts per destination; entries past every destination cannot exist
    # because the destination shards tile [0, n).
    assert total.entries_in == mat.idx.numel()
    return out, total


def consolidate_tensor(src: Sequence[ShardState], n: int, config: MicroAdamConfig
                       ) -> tuple[dict, ReshardReport]:
    """All shards -> the state of one shard of n elements (a single-process run)."""
    states, rep = reshard_tensor(src, n, [(0, n)], config)
    return states[0], rep


def split_tensor(state: dict, n: int, dst: Sequence[tuple[int, int]], config: MicroAdamConfig
                 ) -> tuple[list[dict], ReshardReport]:
    """One consolidated state of n elements -> states of the shards `dst`."""
    return reshard_tensor([ShardState(0, n, state)], n, dst, config)


__all__ = ["ShardState", "Materialized", "ReshardReport", "ReshardError", "even_ranges", "materialize",
           "retarget", "remap", "rebuild_shard", "reshard_tensor", "consolidate_tensor", "split_tensor"]
