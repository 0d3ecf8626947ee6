"""Worker for tests/test_fsdp.py: run under `torchrun --nproc_per_node N` (gloo, CPU).

--phase train (2 ranks): for every engine (FSDP2 fp32 / bf16-compute / pure-bf16,
FSDP1 with use_orig_params False / True, DDP) it trains a small model with uneven
shards, dumps one step's inputs and outputs for the single-process reference check,
saves a DCP checkpoint, resumes into a fresh model and optimizer, and records what
the test asserts: state bytes, shard ranges, bitwise state after load, bitwise
params after the resumed steps. Also a control that saves every rank's state under
one shared key (what a replicated-looking tensor gets) to show the check catches it.
--phase mismatch (1 rank): loads the 2-rank FSDP2 checkpoint and records the error.
Each rank writes OUT/<phase>_rank<R>.json.
"""

import argparse
import contextlib
import json
import os

import torch
import torch.distributed as dist

from fsdp_common import shard_linears
from microadam_dist import MicroAdam, state_bytes
from microadam_dist.integrations import fsdp
from microadam_dist.teardown import finish

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, m=3, density=0.1,
             topk_block=64, quant_block=32)
KINDS = ("fsdp2", "fsdp2_mp", "fsdp2_bf16", "fsdp1_flat", "fsdp1_orig", "ddp")
FSDP2_PRECISION = {"fsdp2": "fp32", "fsdp2_mp": "mp", "fsdp2_bf16": "bf16"}
STEPS_BEFORE, STEPS_AFTER = 4, 3


def make_model(rows: int = 33, seed: int = 0, outputs: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 33 rows over 2 ranks: uneven FSDP2 shards (17/16); FSDP1 ranks split params unevenly.
    return torch.nn.Sequential(torch.nn.Linear(7, rows), torch.nn.Tanh(), torch.nn.Linear(rows, rows),
                               torch.nn.Tanh(), torch.nn.Linear(rows, outputs))


def wrap(kind: str, model: torch.nn.Module, mesh):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    if kind in FSDP2_PRECISION:
        return shard_linears(model, mesh, FSDP2_PRECISION[kind])
    if kind == "fsdp1_flat":  # one FlatParameter per Linear (nested units)
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FSDP(model, use_orig_params=False, device_id=torch.device("cpu"),
                    auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}))
    if kind == "fsdp1_orig":  # one FlatParameter for the model: some ranks hold empty views
        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    raise ValueError(kind)


def build(kind, mesh, seed=0, rows=33, outputs=5, **over):
    model = wrap(kind, make_model(rows, seed, outputs), mesh)
    hyper = dict(HYPER, **over)
    if kind == "fsdp1_orig":
        hyper["ef_rounding"] = "stochastic"
    return model, MicroAdam(model.parameters(), **hyper)


def batch(step: int, rank: int, dtype, outputs: int = 5):
    g = torch.Generator().manual_seed(1000 + 31 * step + 7919 * rank)
    return torch.randn(8, 7, generator=g).to(dtype), torch.randn(8, outputs, generator=g).to(dtype)


def train_step(model, opt, step, rank, dtype, outputs=5):
    opt.zero_grad(set_to_none=True)
    x, y = batch(step, rank, dtype, outputs)
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    opt.step()


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt):
    """Local param shards and every state tensor, cloned."""
    local = [fsdp.local_tensor(p).detach().clone() for p in params_of(opt)]
    state = [{k: v.clone() for k, v in opt.state[p].items()} if opt.state.get(p) else {}
             for p in params_of(opt)]
    return local, state


def same(a, b) -> bool:
    la, sa = a
    lb, sb = b
    return (len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))
            and all(x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)
                    for x, y in zip(sa, sb)))


def full_params(kind, model):
    """fqn -> full param (flat fp32) for the shard-range value check, where cheap to get."""
    if kind.startswith("fsdp2"):
        return {fsdp.clean_fqn(n): p.full_tensor().detach().float().reshape(-1).tolist()
                for n, p in model.named_parameters()}
    if kind == "fsdp1_orig":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model):
            return {fsdp.clean_fqn(n): p.detach().float().reshape(-1).tolist() for n, p in model.named_parameters()}
    return {}


def scenario(kind, mesh, rank, world, out, tmp):
    dtype = torch.bfloat16 if kind == "fsdp2_bf16" else torch.float32
    res = {}
    model, opt = build(kind, mesh)
    for s in range(1, STEPS_BEFORE + 1):
        train_step(model, opt, s, rank, dtype)
    infos = fsdp.shard_infos(model, opt)
    res["infos"] = [i.as_dict() for i in infos]
    res["local_values"] = [fsdp.local_tensor(p).detach().float().reshape(-1).tolist() for p in params_of(opt)]
    res["full_values"] = full_params(kind, model)
    res["state_nbytes"] = fsdp.state_nbytes(opt)
    stepped = [fsdp.local_tensor(p).numel() for p in params_of(opt) if opt.state.get(p)]
    res["stepped_numels"] = stepped
    res["state_bytes_formula"] = state_bytes(stepped, **{k: v for k, v in HYPER.items()
                                                         if k in ("m", "density", "topk_block", "quant_block")})
    res["state_digest"] = float(sum(float(v.float().sum()) * (i + 1) for i, p in enumerate(params_of(opt))
                                    for v in opt.state.get(p, {}).values()))
    ckpt = os.path.join(tmp, f"ckpt_{kind}")
    fsdp.save_checkpoint(ckpt, model, opt, extra={"step": STEPS_BEFORE})
    saved = snapshot(opt)
    # The uninterrupted run; one step's inputs/outputs go to the single-process reference check.
    trajectory = []
    for s in range(STEPS_BEFORE + 1, STEPS_BEFORE + STEPS_AFTER + 1):
        if s == STEPS_BEFORE + 1:
            opt.zero_grad(set_to_none=True)
            x, y = batch(s, rank, dtype)
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            before = snapshot(opt)
            grads = [None if p.grad is None else fsdp.local_tensor(p.grad).detach().clone() for p in params_of(opt)]
            opt.step()
            torch.save({"hyper": {**HYPER, "ef_rounding": opt.param_groups[0]["ef_rounding"]},
                        "before": before, "grads": grads, "after": snapshot(opt)},
                       os.path.join(out, f"equiv_{kind}_rank{rank}.pt"))
        else:
            train_step(model, opt, s, rank, dtype)
        trajectory.append(snapshot(opt))
    # Resume into a fresh model (another init) and optimizer.
    model2, opt2 = build(kind, mesh, seed=1)
    extra = fsdp.load_checkpoint(ckpt, model2, opt2)
    res["extra"] = extra
    res["state_after_load_bitwise"] = same(snapshot(opt2), saved)
    resumed_ok = []
    for i, s in enumerate(range(STEPS_BEFORE + 1, STEPS_BEFORE + STEPS_AFTER + 1)):
        train_step(model2, opt2, s, rank, dtype)
        resumed_ok.append(same(snapshot(opt2), trajectory[i]))
    res["resume_bitwise"] = resumed_ok
    if kind == "fsdp2":
        # Same world size, another sharding of the same params (FSDP1): refused, both layouts named.
        model3, opt3 = build("fsdp1_orig", mesh, seed=2)
        try:
            fsdp.load_checkpoint(ckpt, model3, opt3)
            res["other_sharding_error"] = None
        except ValueError as exc:
            res["other_sharding_error"] = str(exc)
        # Another m in the constructor: the state's sizes differ, refused before DCP reads.
        model4, opt4 = build(kind, mesh, seed=3, m=4)
        try:
            fsdp.load_checkpoint(ckpt, model4, opt4)
            res["other_m_error"] = None
        except ValueError as exc:
            res["other_m_error"] = str(exc)
    return res


def adamw_state_control(mesh, rank):
    """torch AdamW on FSDP2: its moments are DTensors; state_nbytes must count the local shards."""
    model = wrap("fsdp2", make_model(), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, 1, rank, torch.float32)
    kinds = sorted({type(v).__name__ for st in opt.state.values() for v in st.values()})
    local = [p.to_local().numel() for p in model.parameters()]
    return {"state_nbytes": fsdp.state_nbytes(opt), "local_numels": local,
            "global_numels": [p.numel() for p in model.parameters()], "state_types": kinds}


def shared_key_control(mesh, rank, world, tmp):
    """Even shards (32 rows, 6 outputs) so that every rank's state tensors have equal shapes.
    Saved under one key for all ranks, DCP takes them for replicated and writes one copy:
    the bitwise comparison must flag it, and set_optimizer_state_dict must refuse it.
    Saved under rank keys (the library's way), the same comparison passes."""
    import torch.distributed.checkpoint as dcp
    out = {}
    model, opt = build("fsdp2", mesh, rows=32, outputs=6)
    for s in range(1, 3):
        train_step(model, opt, s, rank, torch.float32, outputs=6)
    original = fsdp.rank_key
    for variant, key_fn in (("shared_key", lambda r: "microadam_rank0"), ("rank_key", original)):
        fsdp.rank_key = key_fn
        try:
            ckpt = os.path.join(tmp, f"ckpt_control_{variant}")
            sd = fsdp.optimizer_state_dict(model, opt)
            dcp.save({"optim": sd}, checkpoint_id=ckpt)
            mine = sd[key_fn(rank)]
            back = {fqn: ({k: torch.zeros_like(v) for k, v in st.items()} if isinstance(st, dict) else "")
                    for fqn, st in mine.items()}
            loaded = {"optim": {fsdp.META_KEY: "", key_fn(rank): back}}
            dcp.load(loaded, checkpoint_id=ckpt)
            bitwise = all(torch.equal(back[fqn][k], v) for fqn, st in mine.items() if isinstance(st, dict)
                          for k, v in st.items())
            model2, opt2 = build("fsdp2", mesh, seed=1, rows=32, outputs=6)
            try:
                fsdp.set_optimizer_state_dict(model2, opt2, loaded["optim"])
                refused = None
            except ValueError as exc:
                refused = str(exc)
            out[variant] = {"bitwise": bitwise, "refused": refused}
        finally:
            fsdp.rank_key = original
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("train", "mismatch"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    result = {"rank": rank, "world": world}
    if args.phase == "train":
        for kind in KINDS:
            result[kind] = scenario(kind, mesh, rank, world, args.out, args.ckpt_dir)
        result["shared_key_control"] = shared_key_control(mesh, rank, world, args.ckpt_dir)
        result["adamw_state_control"] = adamw_state_control(mesh, rank)
    else:
        model, opt = build("fsdp2", mesh)
        try:
            fsdp.load_checkpoint(os.path.join(args.ckpt_dir, "ckpt_fsdp2"), model, opt)
            result["error"] = None
        except ValueError as exc:
            result["error"] = str(exc)
    with open(os.path.join(args.out, f"{args.phase}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    finish()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
