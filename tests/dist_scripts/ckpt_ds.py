"""DeepSpeed ZeRO (gloo, CPU) training with "type": "MicroAdam" and DeepSpeed's own
checkpoints; launched by torchrun from tests/test_reshard_engines.py.

The global batch at step t depends on t only and is split evenly across ranks (its
size divides by 1, 2, 3 and 4), and DeepSpeed averages gradients over ranks, so runs
of any world size see the same gradients up to summation order.
Writes {"step", "loss"} lines to --loss-file (rank 0, appended).
"""

import argparse

import torch

import microadam_dist  # noqa: F401  (registers "type": "MicroAdam")
from microadam_dist.teardown import finish
import ckpt_task  # this folder is sys.path[0]

HYPER = {**ckpt_task.HYPER, "backend": "reference"}
BATCH, build_model, batch = ckpt_task.BATCH, ckpt_task.build_model, ckpt_task.batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--sub-group-size", type=int, default=0, help="ZeRO-3 sub_group_size (0: DeepSpeed's default)")
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--resume", default="", help="a checkpoint dir (DeepSpeed save_dir) to load")
    ap.add_argument("--loss-file", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    import deepspeed
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip an ~80 s JIT build
    deepspeed.init_distributed(dist_backend="gloo")
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")]},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "MicroAdam", "params": HYPER},
              "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}
    if args.stage == 3:
        # Partition every parameter (none kept whole as "persistent"); small sub-groups so
        # that a rank's optimizer holds several tensors per param group.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if args.sub_group_size:
            config["zero_optimization"]["sub_group_size"] = args.sub_group_size
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    start = 0
    if args.resume:
        _, client = engine.load_checkpoint(args.resume)
        start = client["step"]
        if rank == 0:
            print(f"resumed from {args.resume} at step {start}", flush=True)
    per = BATCH // world
    for t in range(start + 1, args.steps + 1):
        x, y = batch(t)
        part = ((engine(x[rank * per:(rank + 1) * per]) - y[rank * per:(rank + 1) * per]) ** 2).mean()
        engine.backward(part)
        engine.step()
        ckpt_task.log_loss(args.loss_file, t, part / world, world)
        if t == args.save_at:
            engine.save_checkpoint(args.ckpt, client_state={"step": t})
    finish()


if __name__ == "__main__":
    main()
