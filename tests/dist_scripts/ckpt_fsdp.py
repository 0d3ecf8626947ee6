"""FSDP2 (fully_shard, gloo, CPU) training with MicroAdam and the FSDP integration's DCP
checkpoints; launched by torchrun from tests/test_reshard_engines.py.

The global batch at step t depends on t only and is split across ranks; the loss is
scaled so that FSDP2's mean over ranks yields the global-batch gradient, so runs of
any world size see the same gradients up to summation order.
Writes {"step", "loss"} lines to --loss-file (rank 0, appended).
"""

import argparse

import torch
import torch.distributed as dist

from microadam_dist import MicroAdam
from microadam_dist.checkpoint.reshard import even_ranges
from microadam_dist.integrations import fsdp
from microadam_dist.teardown import finish
import ckpt_task  # this folder is sys.path[0]

HYPER = ckpt_task.HYPER
BATCH, build_model, batch = ckpt_task.BATCH, ckpt_task.build_model, ckpt_task.batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--resume", default="")
    ap.add_argument("--loss-file", required=True)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = MicroAdam(model.parameters(), backend="reference", **HYPER)
    start = 0
    if args.resume:
        start = fsdp.load_checkpoint(args.resume, model, opt)["step"]
        if rank == 0:
            print(f"resumed from {args.resume} at step {start}", flush=True)
    for t in range(start + 1, args.steps + 1):
        x, y = batch(t)
        lo, k = even_ranges(BATCH, world)[rank]
        part = ((model(x[lo:lo + k]) - y[lo:lo + k]) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        (part * world / BATCH).backward()  # FSDP2 averages over ranks: this yields the global mean
        opt.step()
        ckpt_task.log_loss(args.loss_file, t, part / BATCH, world)
        if t == args.save_at:
            fsdp.save_checkpoint(args.ckpt, model, opt, extra={"step": t})
    finish()


if __name__ == "__main__":
    main()
