"""Two-rank DeepSpeed scenarios on the CPU (gloo), run once by tests/test_deepspeed.py.

    torchrun --nproc_per_node 2 tests/dist_scripts/ds_worker.py OUT_DIR SEED

Imports DeepSpeed before microadam_dist (the other worker does the opposite), trains
the tiny model under ZeRO 0-3 and writes `OUT_DIR/rank{r}.pt` with what it saw:
  train[(stage, dtype)]: losses, lr, partition metadata, state sizes, params before/after
  equiv[stage]: per step, the flat partitions and grads handed to MicroAdam (pre/post step)
  resume[stage]: bitwise comparison of an interrupted+resumed run with an uninterrupted one,
    and the weights at the save (DeepSpeed's gathered fp32 master, the module's own dtype)
  refuse[name]: the error of loading a checkpoint of another stage, and whether anything moved
  skip[stage]: state/params around a bf16 step that DeepSpeed's overflow check skips
"""

from __future__ import annotations

import gc
import os
import sys

import deepspeed  # noqa: I001  (first on purpose: the patch must apply to a loaded DeepSpeed)
import torch
from deepspeed.utils import safe_get_full_fp32_param

import microadam_dist  # noqa: F401
from microadam_dist.integrations import ds_partitions
from microadam_dist.teardown import finish
from ds_common import (batch, ds_config, init_gloo, full_params, make_model, optimizer_tensors, param_groups,
                       rank_env, same, snapshot, train_steps)


def engine_for(cfg: dict, seed: int):
    model = make_model(seed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=cfg)
    return engine


def done(engine) -> None:
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    gc.collect()


def state_info(engine) -> list[dict]:
    state = engine.basic_optimizer.state
    out = []
    for t in optimizer_tensors(engine):
        st = state.get(t, {})
        out.append({"numel": t.numel(), "dtype": str(t.dtype),
                    "bytes": sum(v.numel() * v.element_size() for v in st.values()),
                    "step": int(st["step"]) if st else 0, "layout": st["layout"].tolist() if st else None})
    out_keys = {id(t) for t in optimizer_tensors(engine)}
    # Every state entry must belong to a tensor the engine handed us.
    stray = sum(1 for k in state if id(k) not in out_keys)
    return [{"tensors": out, "stray_entries": stray}]


def scenario_train(seed: int, rank: int) -> dict:
    res = {}
    for stage in (0, 1, 2, 3):
        for dtype in ("fp32", "bf16"):
            engine = engine_for(ds_config(stage, dtype, accum=2, clip=1.0, scheduler=True), seed)
            before = full_params(engine)
            losses = train_steps(engine, seed, range(3), rank, accum=2)
            res[(stage, dtype)] = {
                "losses": losses, "before": before, "after": full_params(engine),
                "lr": [g["lr"] for g in engine.basic_optimizer.param_groups], "sched_lr": engine.get_lr(),
                "meta": ds_partitions.partition_metadata(engine), "state": state_info(engine)[0],
                "basic": type(engine.basic_optimizer).__name__, "wrapper": type(engine.optimizer).__name__,
                "global_steps": engine.global_steps}
            done(engine)
    return res


def scenario_equiv(seed: int, rank: int) -> dict:
    """ZeRO-1/2, fp32, accumulation 2, clipping 0.3: record what MicroAdam gets and returns."""
    res = {}
    for stage in (1, 2):
        engine = engine_for(ds_config(stage, "fp32", accum=2, clip=0.3), seed)
        opt = engine.basic_optimizer
        # ZeRO-1/2 step one param group at a time (param_groups narrowed to it), so the hooks
        # file what they see under the tensor's index; lists are regrouped per step below.
        tensors = optimizer_tensors(engine)
        index = {id(t): i for i, t in enumerate(tensors)}
        per = {k: [[] for _ in tensors] for k in ("pre", "grad", "post", "lr")}

        def pre(o, args, kwargs):
            for g in o.param_groups:
                for p in g["params"]:
                    i = index[id(p)]
                    per["pre"][i].append(p.detach().clone())
                    per["grad"][i].append(p.grad.detach().clone())
                    per["lr"][i].append(g["lr"])

        def post(o, args, kwargs):
            for g in o.param_groups:
                for p in g["params"]:
                    per["post"][index[id(p)]].append(p.detach().clone())

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
        train_steps(engine, seed, range(4), rank, accum=2)
        log = {k: [list(step) for step in zip(*v)] for k, v in per.items()}  # [step][tensor]
        log["meta"] = ds_partitions.partition_metadata(engine)
        log["final_params"] = full_params(engine)
        res[stage] = log
        done(engine)
    return res


def scenario_resume(seed: int, rank: int, ckpt_root: str) -> dict:
    res = {}
    for stage in (0, 1, 2, 3):
        cfg = ds_config(stage, "bf16", clip=1.0, scheduler=True)
        path = os.path.join(ckpt_root, f"stage{stage}")
        a = engine_for(cfg, seed)
        train_steps(a, seed, range(2), rank)
        a.save_checkpoint(path, tag="t2")
        at_save = snapshot(a)
        # What the exporter must reproduce, gathered by DeepSpeed into fresh tensors (collectives:
        # every rank calls; None where no fp32 master exists).
        fp32_at_save = {n: safe_get_full_fp32_param(p) for n, p in a.module.named_parameters()}
        module_at_save = full_params(a)
        losses_a = train_steps(a, seed, range(2, 4), rank)
        end_a = snapshot(a)
        done(a)
        b = engine_for(cfg, seed + 1)  # other initial weights: the load must restore everything
        load_path, _ = b.load_checkpoint(path)
        after_load = snapshot(b)
        losses_b = train_steps(b, seed, range(2, 4), rank)
        end_b = snapshot(b)
        res[stage] = {"loaded": load_path is not None, "load_equal": same(at_save, after_load),
                      "end_equal": same(end_a, end_b), "losses": (losses_a, losses_b),
                      "steps": (a.global_steps, b.global_steps), "lr": (a.get_lr(), b.get_lr()),
                      "files": sorted(os.listdir(os.path.join(path, "t2"))),
                      "fp32_at_save": fp32_at_save, "module_at_save": module_at_save}
        if stage == 2:
            res["ckpt_state"] = at_save["state"]
        done(b)
    return res


def scenario_refuse(seed: int, rank: int, ckpt_root: str) -> dict:
    """Load the stage-2 checkpoint at stage 3 and the stage-1 one at stage 0 (refused); stage 1 <- 2 loads."""
    res = {}
    for name, stage, src in (("3<-2", 3, 2), ("0<-1", 0, 1), ("1<-2", 1, 2)):
        engine = engine_for(ds_config(stage, "bf16", clip=1.0, scheduler=True), seed + 7)
        before = snapshot(engine)
        err = None
        try:
            engine.load_checkpoint(os.path.join(ckpt_root, f"stage{src}"))
        except ValueError as exc:
            err = str(exc)
        res[name] = {"error": err, "untouched": same(before, snapshot(engine)), "state": snapshot(engine)["state"]}
        done(engine)
    return res


def scenario_skip(seed: int, rank: int) -> dict:
    """bf16: a step with an infinite loss on rank 0 must be skipped by DeepSpeed, not by MicroAdam."""
    res = {}
    for stage in (0, 1, 2, 3):
        engine = engine_for(ds_config(stage, "bf16", nonfinite="off"), seed)
        train_steps(engine, seed, range(1), rank)
        before = snapshot(engine)
        skipped0 = engine.skipped_steps
        x, y = batch(seed, 1, rank, dtype=torch.bfloat16)
        if rank == 0:
            y[0, 0] = float("inf")
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        after = snapshot(engine)
        train_steps(engine, seed, range(2, 3), rank)
        res[stage] = {"untouched": same(before, after), "skipped": engine.skipped_steps - skipped0,
                      "ms_skips": engine.basic_optimizer.nonfinite_skips,
                      "steps_after": [int(s["step"]) for s in snapshot(engine)["state"] if s]}
        done(engine)
    return res


def main() -> None:
    out_dir, seed = sys.argv[1], int(sys.argv[2])
    init_gloo()
    rank, world = rank_env()
    ckpt_root = os.path.join(out_dir, "ckpt")
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    results = {"world": world, "registered_after_deepspeed": True}
    for name, fn in (("train", lambda: scenario_train(seed, rank)),
                     ("equiv", lambda: scenario_equiv(seed, rank)),
                     ("resume", lambda: scenario_resume(seed, rank, ckpt_root)),
                     ("refuse", lambda: scenario_refuse(seed, rank, ckpt_root)),
                     ("skip", lambda: scenario_skip(seed, rank))):
        if only is None or name in only:
            results[name] = fn()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finish()


if __name__ == "__main__":
    main()
