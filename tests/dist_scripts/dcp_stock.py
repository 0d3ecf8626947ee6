"""Worker for tests/test_dcp_stock.py: torch's stock checkpoint calls on MicroAdam under
FSDP2 (gloo, CPU), run as `torchrun --nproc_per_node N dcp_stock.py --phase P --out DIR`.

Every scenario: model A trains STEPS_BEFORE steps, is saved through one stock path, then
trains STEPS_AFTER more (the uninterrupted run). Model B, from another seed, either fresh or
after steps on other batches, loads the checkpoint through the same path and trains the
same STEPS_AFTER steps. Each rank compares its own local params and MicroAdam state with
A's, bitwise, after the load and after every step.

Phases:
  main (2 ranks): every path x FSDP2 flavour x even/uneven shards; FSDP1's stock calls
      refused by name, FSDP1's helper round trip; the `_init_optim_state` call.
  three (3 ranks): the paths at 3 ranks; a 2-rank checkpoint (ranks 0-1 on a sub-mesh)
      loaded at 3 ranks and a 3-rank one loaded at 2: both must fail loudly.
  hsdp (4 ranks): a 2x2 HSDP mesh (replicate x shard).
Each rank writes OUT/<phase>_rank<R>.json: {scenario: result}.
"""

import argparse
import json
import os
import shutil
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from fsdp_common import shard_linears
from microadam_dist import MicroAdam
from microadam_dist.optim import local_tensor
from microadam_dist.teardown import finish

HYPER = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, m=3, density=0.1,
             topk_block=64, quant_block=32)
STEPS_BEFORE, STEPS_AFTER = 5, 4
PATHS = ("dcp", "dcp_offload", "flat", "async", "full_bcast", "full_all")


def make_model(rows: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # The last Linear has 1 output: its weight and bias have fewer rows than ranks, so
    # some ranks hold empty shards.
    return torch.nn.Sequential(torch.nn.Linear(9, rows), torch.nn.Tanh(), torch.nn.Linear(rows, rows),
                               torch.nn.Tanh(), torch.nn.Linear(rows, 1))


def build(flavour: str, mesh, rows: int, seed: int, **over):
    model = shard_linears(make_model(rows, seed), mesh, flavour)
    hyper = dict(HYPER, **over)
    # Two param groups (weights, biases), as trainers build them for weight decay.
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = MicroAdam([{"params": weights}, {"params": biases, "weight_decay": 0.0}], **hyper)
    return model, opt


def train_step(model, opt, step: int, rank: int, salt: int = 0) -> None:
    g = torch.Generator().manual_seed(1000 * salt + 17 * step + rank)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 9, generator=g).to(dtype)
    y = torch.randn(8, 1, generator=g).to(dtype)
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def snapshot(model, opt) -> dict:
    out = {}
    for name, p in model.named_parameters():
        out[f"param.{name}"] = local_tensor(p).detach().clone()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"state.{names[id(p)]}.{k}"] = v.detach().clone()
    return out


def differences(a: dict, b: dict) -> list:
    diffs = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            diffs.append(k)
    return diffs


def save(path_kind: str, model, opt, ckpt: str, rank: int, group=None) -> None:
    if path_kind.startswith("full"):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = {"model": get_model_state_dict(model, options=opts),
              "optim": get_optimizer_state_dict(model, opt, options=opts)}
        if rank == 0:
            os.makedirs(ckpt, exist_ok=True)
            torch.save(sd, os.path.join(ckpt, "full.pt"))
        dist.barrier(group=group)
        return
    opts = StateDictOptions(cpu_offload=path_kind == "dcp_offload",
                            flatten_optimizer_state_dict=path_kind == "flat")
    sd = {"model": get_model_state_dict(model, options=opts),
          "optim": get_optimizer_state_dict(model, opt, options=opts)}
    if path_kind == "async":
        dcp.async_save(sd, checkpoint_id=ckpt, process_group=group).result()
    else:
        dcp.save(sd, checkpoint_id=ckpt, process_group=group)


def load(path_kind: str, model, opt, ckpt: str, rank: int, group=None) -> None:
    if path_kind.startswith("full"):
        bcast = path_kind == "full_bcast"
        full = (torch.load(os.path.join(ckpt, "full.pt"), weights_only=True)
                if rank == 0 or not bcast else {"model": {}, "optim": {}})
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=bcast, cpu_offload=bcast)
        set_model_state_dict(model, full["model"], options=opts)
        set_optimizer_state_dict(model, opt, full["optim"], options=opts)
        return
    opts = StateDictOptions(cpu_offload=path_kind == "dcp_offload",
                            flatten_optimizer_state_dict=path_kind == "flat")
    sd = {"model": get_model_state_dict(model, options=opts),
          "optim": get_optimizer_state_dict(model, opt, options=opts)}
    dcp.load(sd, checkpoint_id=ckpt, process_group=group)
    set_model_state_dict(model, sd["model"], options=opts)
    set_optimizer_state_dict(model, opt, sd["optim"], options=opts)


def stored_chunks(ckpt: str) -> dict:
    """How many chunks DCP stored for the first weight and its MicroAdam state: one per
    shard, written once however many replicas hold it."""
    md = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    return {key: len(md[key].chunks) for key in ("model.0.weight", "optim.state.0.weight.ef",
                                                 "optim.state.0.weight.win_val", "optim.state.0.weight.step")}


def round_trip(path_kind: str, flavour: str, mesh, rows: int, history: int, rank: int, tmp: str,
               **over) -> dict:
    """The scenario of the module docstring; returns what the test asserts."""
    ckpt = os.path.join(tmp, f"{path_kind}-{flavour}-{rows}-{history}")
    model, opt = build(flavour, mesh, rows, seed=0, **over)
    for s in range(STEPS_BEFORE):
        train_step(model, opt, s, rank)
    saved = snapshot(model, opt)
    save(path_kind, model, opt, ckpt, rank)
    after_save = differences(saved, snapshot(model, opt))  # saving must not touch anything
    chunks = stored_chunks(ckpt) if path_kind == "dcp" else {}
    reference = []
    for s in range(STEPS_AFTER):
        train_step(model, opt, STEPS_BEFORE + s, rank)
        reference.append(snapshot(model, opt))

    model_b, opt_b = build(flavour, mesh, rows, seed=1, **over)
    for s in range(history):
        train_step(model_b, opt_b, s, rank, salt=7)
    load(path_kind, model_b, opt_b, ckpt, rank)
    res = {"after_save": after_save, "after_load": differences(saved, snapshot(model_b, opt_b)),
           "after_steps": []}
    for s in range(STEPS_AFTER):
        train_step(model_b, opt_b, STEPS_BEFORE + s, rank)
        res["after_steps"].append(differences(reference[s], snapshot(model_b, opt_b)))
    res["state_entries"] = len(opt_b.state)
    res["chunks"] = chunks
    res["local_numels"] = [local_tensor(p).numel() for p in model_b.parameters()]
    dist.barrier()
    if rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
    return res


def legacy_helper_checkpoint(mesh, rank: int, tmp: str) -> dict:
    """A checkpoint in the rank-keyed form that earlier versions' `save_checkpoint` wrote
    under FSDP2 still loads through `load_checkpoint` and resumes bitwise."""
    from microadam_dist.integrations import fsdp as helper
    ckpt = os.path.join(tmp, "legacy")
    model, opt = build("fp32", mesh, 65, seed=0)
    for s in range(STEPS_BEFORE):
        train_step(model, opt, s, rank)
    saved = snapshot(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": helper.optimizer_state_dict(model, opt),
              "extra": json.dumps({"step": STEPS_BEFORE})}, checkpoint_id=ckpt)
    reference = []
    for s in range(STEPS_AFTER):
        train_step(model, opt, STEPS_BEFORE + s, rank)
        reference.append(snapshot(model, opt))
    model_b, opt_b = build("fp32", mesh, 65, seed=1)
    extra = helper.load_checkpoint(ckpt, model_b, opt_b)
    res = {"after_save": [], "after_load": differences(saved, snapshot(model_b, opt_b)), "after_steps": [],
           "extra": extra, "local_numels": [local_tensor(p).numel() for p in model_b.parameters()]}
    for s in range(STEPS_AFTER):
        train_step(model_b, opt_b, STEPS_BEFORE + s, rank)
        res["after_steps"].append(differences(reference[s], snapshot(model_b, opt_b)))
    return res


def guarded(fn, *args, **kwargs) -> dict:
    try:
        return {"ok": True, **fn(*args, **kwargs)}
    except BaseException as exc:  # recorded for the test, which prints it
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}


def expect_failure(fn, *args) -> dict:
    try:
        fn(*args)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        return {"raised": True, "error": f"{type(exc).__name__}: {exc}"}
    return {"raised": False}


def init_state_call(mesh, rank: int) -> dict:
    """torch's `_init_optim_state` (what get/set_optimizer_state_dict run on an optimizer
    with no state): zero gradients, lr 0, one step(). It must create every state without
    touching params, the step count or the window; the first real step then equals a fresh
    optimizer's."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    model, opt = build("fp32", mesh, 33, seed=3)
    before = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
    _init_optim_state(opt)
    res = {"states": len(opt.state), "params_unchanged": all(
        torch.equal(before[n], local_tensor(p)) for n, p in model.named_parameters()),
        "steps": sorted({int(st["step"]) for st in opt.state.values()}),
        "windows_zero": all(not st["win_val"].any() and not st["win_idx"].any() and not st["ef"].any()
                            for st in opt.state.values()),
        "lrs": [g["lr"] for g in opt.param_groups]}
    train_step(model, opt, 0, rank)
    model2, opt2 = build("fp32", mesh, 33, seed=3)
    train_step(model2, opt2, 0, rank)
    res["first_step_as_fresh"] = differences(snapshot(model2, opt2), snapshot(model, opt))
    return res


def fsdp1_checks(rank: int, tmp: str) -> dict:
    """FSDP1: torch's stock optimizer state dict is refused by name; the helper round-trips."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from microadam_dist.integrations import fsdp as helper
    out = {}
    for orig in (False, True):
        torch.manual_seed(0)
        model = FSDP(make_model(33, 0), use_orig_params=orig, device_id=torch.device("cpu"))
        opt = MicroAdam(model.parameters(), **HYPER)
        for s in range(STEPS_BEFORE):
            train_step(model, opt, s, rank)
        key = f"orig{int(orig)}"
        out[f"{key}_get"] = expect_failure(get_optimizer_state_dict, model, opt)
        out[f"{key}_fsdp_api"] = expect_failure(FSDP.optim_state_dict, model, opt)
        ckpt = os.path.join(tmp, f"fsdp1-{key}")
        helper.save_checkpoint(ckpt, model, opt)
        saved = {k: v for k, v in snapshot(model, opt).items() if k.startswith("state.")}
        torch.manual_seed(1)
        model_b = FSDP(make_model(33, 1), use_orig_params=orig, device_id=torch.device("cpu"))
        opt_b = MicroAdam(model_b.parameters(), **HYPER)
        train_step(model_b, opt_b, 0, rank, salt=5)
        helper.load_checkpoint(ckpt, model_b, opt_b)
        loaded = {k: v for k, v in snapshot(model_b, opt_b).items() if k.startswith("state.")}
        out[f"{key}_helper_diffs"] = differences(saved, loaded)
        out[f"{key}_helper_states"] = len(loaded)
    return out


def cross_world(rank: int, world: int, tmp: str) -> dict:
    """(3 ranks) A checkpoint of 2 ranks (ranks 0-1 on a sub-mesh) loaded at 3, and one of
    3 loaded at 2, through the stock DCP calls."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    full = init_device_mesh("cpu", (world,))
    sub = DeviceMesh("cpu", [0, 1])
    sub_group = dist.new_group([0, 1])
    ck2, ck3 = os.path.join(tmp, "cross2"), os.path.join(tmp, "cross3")
    out = {}
    if rank < 2:
        model, opt = build("fp32", sub, 65, seed=0)
        for s in range(2):
            train_step(model, opt, s, rank)
        save("dcp", model, opt, ck2, rank, group=sub_group)
    dist.barrier()
    model, opt = build("fp32", full, 65, seed=0)
    for s in range(2):
        train_step(model, opt, s, rank)
    out["2to3"] = expect_failure(load, "dcp", model, opt, ck2, rank)
    save("dcp", model, opt, ck3, rank)
    if rank < 2:
        model2, opt2 = build("fp32", sub, 65, seed=0)
        for s in range(2):
            train_step(model2, opt2, s, rank)
        out["3to2"] = expect_failure(load, "dcp", model2, opt2, ck3, rank, sub_group)
    dist.barrier()
    # The full-state path: 2-rank full state dict broadcast into 3 ranks.
    if rank < 2:
        model, opt = build("fp32", sub, 65, seed=0)
        train_step(model, opt, 0, rank)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        osd = get_optimizer_state_dict(model, opt, options=opts)
        if rank == 0:
            torch.save(osd, os.path.join(tmp, "full2.pt"))
    dist.barrier()
    model, opt = build("fp32", full, 65, seed=0)
    train_step(model, opt, 0, rank)
    before = snapshot(model, opt)
    osd = torch.load(os.path.join(tmp, "full2.pt"), weights_only=True) if rank == 0 else {}
    out["2to3_full"] = expect_failure(lambda: set_optimizer_state_dict(
        model, opt, osd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)))
    out["2to3_full_untouched"] = not [k for k in differences(before, snapshot(model, opt)) if k.startswith("param.")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", required=True, choices=("main", "three", "hsdp"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    tmp = os.path.join(args.out, f"ckpt_{args.phase}")
    results: dict = {}
    if args.phase == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for path_kind in ("dcp", "full_bcast"):
            for rows in (64, 65):
                history = 0 if rows == 64 else 3
                results[f"{path_kind}/fp32/{rows}/{history}"] = guarded(round_trip, path_kind, "fp32", mesh, rows, history, rank, tmp)
    else:
        mesh = init_device_mesh("cpu", (world,))
        flavours = ("fp32", "mp", "bf16") if args.phase == "main" else ("fp32",)
        even = 64 if world == 2 else 66
        for path_kind in PATHS:
            for flavour in flavours:
                for rows in (even, 65):
                    # A fresh optimizer (the usual resume) and one with another history.
                    history = 0 if (rows == even) == (flavour != "mp") else 3
                    key = f"{path_kind}/{flavour}/{rows}/{history}"
                    results[key] = guarded(round_trip, path_kind, flavour, mesh, rows, history, rank, tmp)
        if args.phase == "main":
            results["init_state_call"] = guarded(init_state_call, mesh, rank)
            results["fsdp1"] = guarded(fsdp1_checks, rank, tmp)
            results["legacy/fp32/65/helper"] = guarded(legacy_helper_checkpoint, mesh, rank, tmp)
            # Stochastic EF rounding draws from a hash of (step, index): nothing else to save.
            results["dcp/stochastic/65/3"] = guarded(round_trip, "dcp", "fp32", mesh, 65, 3, rank, tmp,
                                                     ef_rounding="stochastic")
            # Another m than the checkpoint's: refused.
            model, opt = build("fp32", mesh, 64, seed=0)
            train_step(model, opt, 0, rank)
            save("dcp", model, opt, os.path.join(tmp, "other_m"), rank)
            model_b, opt_b = build("fp32", mesh, 64, seed=0, m=5)
            results["other_m"] = expect_failure(load, "dcp", model_b, opt_b, os.path.join(tmp, "other_m"), rank)
        else:
            results["cross_world"] = guarded(cross_world, rank, world, tmp)
    write_and_finish(results, os.path.join(args.out, f"{args.phase}_rank{rank}.json"), rank, tmp)


def write_and_finish(results: dict, path: str, rank: int, tmp: str) -> None:
    """Write this rank's results, wait for every rank, drop the checkpoints, tear down."""
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    finish()


if __name__ == "__main__":
    main()
