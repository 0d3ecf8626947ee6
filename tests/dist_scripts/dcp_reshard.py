"""Worker for tests/test_dcp_reshard.py: the offline reshard tool on checkpoints in torch's
stock form (get_optimizer_state_dict + dcp.save), run as
`torchrun --nproc_per_node 3 dcp_reshard.py --out DIR` (gloo, CPU).

  same: a 2-rank checkpoint (ranks 0-1 on a sub-mesh) resharded to 2 ranks and loaded
      through the stock calls: the state after the load and every later step are bitwise
      those of the uninterrupted run.
  2to3 (through the CLI) and 3to2 (through reshard_dcp): loaded through the stock calls at
      the new size; each rank's state equals `reshard_tensor` of the source shards for the
      rank's own range (offsets from torch.chunk of the rows), and training continues.
  accelerate: the 2-rank state saved by Accelerate's own save_fsdp_model / save_fsdp_optimizer
      (the optimizer alone in optimizer_0, the model in pytorch_model_fsdp_0), resharded to
      3 by the CLI with --model-src, loaded as Accelerate's FSDP2 resume loads it: the same
      oracle. model_src_refused: --model-src with a --src that is not DCP is refused.
  titan: the 2-rank state in torchtitan's layout (model params at the top level, the
      optimizer flattened by flatten_optimizer_state_dict=True under "optimizer", a
      train_state beside), resharded to 3 by the CLI with --set lr, written back flattened
      and loaded through the flattened stock calls: the same oracle, the new lr, training
      continues; consolidating it gives the state consolidating the nested save gives.
Each rank writes OUT/reshard_rank<R>.json: {scenario: result}.
"""

import argparse
import contextlib
import io
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from dcp_stock import (STEPS_AFTER, STEPS_BEFORE, build, differences, guarded, load, save, snapshot, train_step,
                       write_and_finish)
from microadam_dist.checkpoint.__main__ import main as checkpoint_cli
from microadam_dist.checkpoint.dcp import consolidate_dcp, reshard_dcp
from microadam_dist.checkpoint.io import load_file
from microadam_dist.checkpoint.reshard import ShardState, reshard_tensor
from microadam_dist.config import MicroAdamConfig
from microadam_dist.layout import STATE_KEYS
from microadam_dist.optim import local_tensor

ROWS = 65  # uneven over 2 and 3 ranks; the 1-row last layer leaves empty shards


def rows_range(shape, world: int, rank: int) -> tuple[int, int]:
    """(flat offset, numel) of `rank` when torch.chunk splits dim 0 in `world` chunks."""
    rows = shape[0]
    row = int(torch.Size(shape[1:]).numel())
    chunk = -(-rows // world)
    lo, hi = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    return lo * row, (hi - lo) * row


def dump_shards(model, opt, world: int, rank: int, path: str) -> None:
    """This rank's live state per param with its flat range: the source shards of the oracle."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(p)]: (rows_range(list(p.shape), world, rank), {k: v.clone() for k, v in st.items()})
           for p, st in opt.state.items()}
    torch.save(out, path)


def oracle_diffs(model, opt, src_files: list, world: int, rank: int) -> list:
    """Keys where this rank's loaded state differs from reshard_tensor of the source shards."""
    sources = [torch.load(f, weights_only=True) for f in src_files]
    diffs = []
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        shards = [ShardState(off, n, st) for src in sources for (off, n), st in [src[name]]]
        cfg = MicroAdamConfig(**{k: v for k, v in groups[id(p)].items() if k in MicroAdamConfig.field_names()})
        ranges = [rows_range(list(p.shape), world, r) for r in range(world)]
        want_range, want = ranges[rank], reshard_tensor(shards, p.numel(), ranges, cfg)[0][rank]
        have = opt.state[p]
        if want_range[1] == 0:  # an empty shard: no state to move, layout n=0
            if int(have["layout"][1]) != 0 or have["ef"].numel():
                diffs.append(f"{name}.empty")
            continue
        if local_tensor(p).numel() != want_range[1]:
            diffs.append(f"{name}.range")
        for k, v in want.items():
            if have[k].dtype != v.dtype or have[k].shape != v.shape or not torch.equal(have[k].cpu(), v.cpu()):
                diffs.append(f"{name}.{k}")
    return diffs


def accelerate_dirs(out_dir: str) -> tuple[str, str]:
    """(model dir, optimizer dir) that Accelerate's save_state writes under `out_dir`."""
    from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME
    return os.path.join(out_dir, f"{FSDP_MODEL_NAME}_0"), os.path.join(out_dir, f"{OPTIMIZER_NAME}_0")


def accelerate_save(model, opt, out_dir: str) -> None:
    """What Accelerator.save_state does under FSDP2 with SHARDED_STATE_DICT: Accelerate's own
    save functions, which read the plugin alone on that path (no Accelerator needed; its
    logger needs the PartialState). They dcp.save on the default group: rank 2 joins
    through `join_saves`."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import save_fsdp_model, save_fsdp_optimizer
    PartialState(cpu=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    save_fsdp_model(plugin, None, model, out_dir)
    save_fsdp_optimizer(plugin, None, opt, model, out_dir)


def join_saves(out_dir: str) -> None:
    """A rank outside the saving sub-mesh takes part in `accelerate_save`'s two dcp.save
    collectives with nothing to write."""
    for path in accelerate_dirs(out_dir):
        os.makedirs(path, exist_ok=True)
        dcp.save({}, storage_writer=dcp.FileSystemWriter(path))


def accelerate_load(model, opt, model_dir: str, optim_dir: str) -> None:
    """Accelerate's FSDP2 resume (load_fsdp_model / load_fsdp_optimizer) through the stock
    calls it makes, with the options its plugin gives them."""
    opts = StateDictOptions(cpu_offload=True)
    msd = {"model": get_model_state_dict(model, options=opts)}
    dcp.load(msd, storage_reader=dcp.FileSystemReader(model_dir))
    set_model_state_dict(model, msd["model"], options=opts)
    osd = {"optimizer": get_optimizer_state_dict(model, opt, options=opts)}
    dcp.load(osd, storage_reader=dcp.FileSystemReader(optim_dir))
    set_optimizer_state_dict(model, opt, osd["optimizer"], options=opts)


TITAN_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)
TITAN_LR = 0.0123


def titan_save(model, opt, path: str, group) -> None:
    """What torchtitan's CheckpointManager saves: the model's keys at the top level, its
    OptimizersContainer's flattened state dict under "optimizer", and the train state."""
    sd = {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=TITAN_OPTS),
          "train_state": {"step": torch.tensor(STEPS_BEFORE, dtype=torch.int32)}}
    dcp.save(sd, checkpoint_id=path, process_group=group)


def titan_load(model, opt, path: str) -> None:
    """torchtitan's resume: the same layout as the template, then the flattened set calls."""
    sd = {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=TITAN_OPTS)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, {k: v for k, v in sd.items() if k != "optimizer"})
    set_optimizer_state_dict(model, opt, sd["optimizer"], options=TITAN_OPTS)


def consolidated_states(path: str) -> dict:
    """{param name: single-process state} of a consolidated file."""
    obj = load_file(path)
    return {obj["names"][i]: st for i, st in obj["optimizer"]["state"].items()}


def stored_keys(path: str) -> list:
    """The top-level keys of a DCP checkpoint's stored tensors and objects."""
    return sorted({k.split(".")[0] for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata})


def run_cli(*argv: str) -> dict:
    """The checkpoint CLI, run in this process: exit status and what it printed (a refusal
    raises SystemExit with its message, as python -m prints it)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = checkpoint_cli(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
            print(exc.code, file=err)
    return {"rc": rc, "stdout": out.getvalue()[-2000:], "stderr": err.getvalue()[-2000:]}


def continue_steps(model, opt, rank: int) -> dict:
    for s in range(STEPS_AFTER):
        train_step(model, opt, STEPS_BEFORE + s, rank, salt=3)
    return {"steps": sorted({int(st["step"]) for st in opt.state.values() if st["ef"].numel()}),
            "finite": all(bool(torch.isfinite(local_tensor(p).float()).all()) for p in model.parameters())}


def run(rank: int, world: int, tmp: str) -> dict:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    full = init_device_mesh("cpu", (world,))
    sub, sub_group = DeviceMesh("cpu", [0, 1]), dist.new_group([0, 1])
    ck2, ck3 = os.path.join(tmp, "ck2"), os.path.join(tmp, "ck3")
    acc = os.path.join(tmp, "accelerate")
    acc_model, acc_optim = accelerate_dirs(acc)
    titan, titan3 = os.path.join(tmp, "titan2"), os.path.join(tmp, "titan2to3")
    out: dict = {}
    # The 2-rank source and its uninterrupted continuation.
    if rank < 2:
        model, opt = build("fp32", sub, ROWS, seed=0)
        for s in range(STEPS_BEFORE):
            train_step(model, opt, s, rank)
        saved = snapshot(model, opt)
        save("dcp", model, opt, ck2, rank, group=sub_group)
        accelerate_save(model, opt, acc)  # the same state: the src2 dumps are its source shards
        titan_save(model, opt, titan, sub_group)
        dump_shards(model, opt, 2, rank, os.path.join(tmp, f"src2_{rank}.pt"))
        reference = []
        for s in range(STEPS_AFTER):
            train_step(model, opt, STEPS_BEFORE + s, rank)
            reference.append(snapshot(model, opt))
    else:
        join_saves(acc)
    # The 3-rank source.
    model, opt = build("fp32", full, ROWS, seed=2)
    for s in range(STEPS_BEFORE):
        train_step(model, opt, s, rank, salt=1)
    save("dcp", model, opt, ck3, rank)
    dump_shards(model, opt, 3, rank, os.path.join(tmp, f"src3_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        reshard_dcp(ck2, os.path.join(tmp, "ck2to2"), 2)
        reshard_dcp(ck3, os.path.join(tmp, "ck3to2"), 2)
        cli = subprocess.run([sys.executable, "-m", "microadam_dist.checkpoint", "reshard", "--src", ck2,
                              "--dst", os.path.join(tmp, "ck2to3"), "--world-size", "3"],
                             capture_output=True, text=True, timeout=120)
        out["cli"] = {"rc": cli.returncode, "stdout": cli.stdout[-2000:], "stderr": cli.stderr[-2000:]}
        out["accelerate_cli"] = dict(run_cli("reshard", "--src", acc_optim, "--dst", os.path.join(tmp, "acc2to3"),
                                         "--world-size", "3", "--model-src", acc_model),
                                     model_keys=stored_keys(acc_model), optim_keys=stored_keys(acc_optim))
        # A consolidated file as --src: resharding it needs no model dir, so --model-src
        # there is a mistake to report, not to ignore.
        consolidate_dcp(ck2, os.path.join(tmp, "ck2.pt"))
        wrong = os.path.join(tmp, "wrong")
        out["titan_cli"] = dict(run_cli("reshard", "--src", titan, "--dst", titan3, "--world-size", "3",
                                        "--set", f"lr={TITAN_LR}"),
                                src_keys=stored_keys(titan), dst_keys=stored_keys(titan3),
                                flat_keys=sorted(dcp.FileSystemReader(titan3).read_metadata().state_dict_metadata))
        consolidate_dcp(titan, os.path.join(tmp, "titan2.pt"))
        nested, flat = (consolidated_states(os.path.join(tmp, f)) for f in ("ck2.pt", "titan2.pt"))
        out["titan_consolidate"] = {"names": sorted(nested), "diffs": sorted(
            f"{n}.{k}" for n in set(nested) | set(flat) for k in STATE_KEYS
            if not torch.equal(nested.get(n, {}).get(k, torch.empty(0)), flat.get(n, {}).get(k, torch.empty(0))))}
        out["model_src_refused"] = dict(run_cli("reshard", "--src", os.path.join(tmp, "ck2.pt"), "--dst", wrong,
                                            "--world-size", "3", "--model-src", acc_model),
                                        dst_written=os.path.exists(wrong))
    dist.barrier()
    if rank < 2:
        model_b, opt_b = build("fp32", sub, ROWS, seed=1)
        train_step(model_b, opt_b, 0, rank, salt=7)
        load("dcp", model_b, opt_b, os.path.join(tmp, "ck2to2"), rank, sub_group)
        same = {"after_load": differences(saved, snapshot(model_b, opt_b)), "after_steps": []}
        for s in range(STEPS_AFTER):
            train_step(model_b, opt_b, STEPS_BEFORE + s, rank)
            same["after_steps"].append(differences(reference[s], snapshot(model_b, opt_b)))
        out["same"] = same
        model_c, opt_c = build("fp32", sub, ROWS, seed=1)
        load("dcp", model_c, opt_c, os.path.join(tmp, "ck3to2"), rank, sub_group)
        out["3to2"] = {"oracle_diffs": oracle_diffs(model_c, opt_c, [os.path.join(tmp, f"src3_{r}.pt")
                                                                     for r in range(3)], 2, rank),
                       **continue_steps(model_c, opt_c, rank)}
    dist.barrier()
    model_d, opt_d = build("fp32", full, ROWS, seed=1)
    load("dcp", model_d, opt_d, os.path.join(tmp, "ck2to3"), rank)
    out["2to3"] = {"oracle_diffs": oracle_diffs(model_d, opt_d, [os.path.join(tmp, f"src2_{r}.pt")
                                                                 for r in range(2)], 3, rank),
                   **continue_steps(model_d, opt_d, rank)}
    model_e, opt_e = build("fp32", full, ROWS, seed=1)
    accelerate_load(model_e, opt_e, acc_model, os.path.join(tmp, "acc2to3"))
    out["accelerate"] = {"oracle_diffs": oracle_diffs(model_e, opt_e, [os.path.join(tmp, f"src2_{r}.pt")
                                                                       for r in range(2)], 3, rank),
                         **continue_steps(model_e, opt_e, rank)}
    model_f, opt_f = build("fp32", full, ROWS, seed=1)
    titan_load(model_f, opt_f, titan3)
    out["titan"] = {"oracle_diffs": oracle_diffs(model_f, opt_f, [os.path.join(tmp, f"src2_{r}.pt")
                                                                  for r in range(2)], 3, rank),
                    "lrs": sorted({g["lr"] for g in opt_f.param_groups}), **continue_steps(model_f, opt_f, rank)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = os.path.join(args.out, "ckpt_reshard")
    write_and_finish({"reshard": guarded(run, rank, world, tmp)},
                     os.path.join(args.out, f"reshard_rank{rank}.json"), rank, tmp)


if __name__ == "__main__":
    main()
