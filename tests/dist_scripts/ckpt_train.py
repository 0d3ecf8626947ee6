"""Sharded MicroAdam training on gloo with our checkpoints (launched by torchrun from tests).

Every rank holds the full model for forward/backward; gradients are summed with
all_reduce; each rank steps MicroAdam on its flat range (`even_ranges`) of every
param and the ranges are summed back into the full params (others add exact zeros).
The global batch at step t depends on (seed, t) only and is split across ranks, so a
run's losses do not depend on the world size except through MicroAdam's blocks.

Fault injection: --kill-rank R with --kill-at-step S (SIGKILL itself before step S)
or --kill-in-save S (SIGKILL itself while writing the checkpoint of step S).
Writes {"step": t, "loss": ...} lines to --loss-file (rank 0, appended).
"""

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from microadam_dist import MicroAdam, MicroAdamConfig
from microadam_dist.checkpoint import io as ckio
from microadam_dist.checkpoint import sharded
from microadam_dist.checkpoint.reshard import even_ranges
from microadam_dist.teardown import finish

HYPER = dict(lr=1e-2, m=4, density=0.1, topk_block=64, quant_block=48, weight_decay=0.01)
BATCH = 96


def build_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 96), torch.nn.Tanh(), torch.nn.Linear(96, 48),
                               torch.nn.Tanh(), torch.nn.Linear(48, 1))


def batch(seed, step):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randn(BATCH, 24, generator=g)
    w = torch.linspace(-1, 1, 24)
    y = torch.sin(x @ w).unsqueeze(1) + 0.3 * (x[:, :1] * x[:, 1:2]) + 0.05 * torch.randn(BATCH, 1, generator=g)
    return x, y


def kill_self():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="checkpoint root (ROOT/step_XXXXXX)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, default=0)
    ap.add_argument("--resume", default="auto", help="'auto' (latest complete under root), 'none' or a path")
    ap.add_argument("--loss-file", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-at-step", type=int, default=-1)
    ap.add_argument("--kill-in-save", type=int, default=-1)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.seed)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    ranges = [even_ranges(p.numel(), world)[rank] for p in params]
    shards = [p.detach().reshape(-1)[o:o + k].clone() for p, (o, k) in zip(params, ranges)]
    opt = MicroAdam(shards, backend="reference", **HYPER)

    start = 0
    path = None
    if args.resume == "auto":
        path = ckio.latest_complete(args.root) if rank == 0 else None
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    elif args.resume != "none":
        path = args.resume
    if path is not None:
        meta, payload = sharded.load_sharded(path)
        start = meta["step"]
        sd = opt.state_dict()
        for i, (name, shard, (o, k)) in enumerate(zip(names, shards, ranges)):
            entry = payload["tensors"][name]
            assert (entry["offset"], entry["numel"]) == (o, k), (name, entry["offset"], o)
            shard.copy_(entry["param"])
            if entry["state"]:
                sd["state"][i] = entry["state"]
        opt.load_state_dict(sd)
        sync_params(params, shards, ranges)
        if rank == 0:
            print(f"resumed from {path} at step {start}", flush=True)

    for t in range(start + 1, args.steps + 1):
        if rank == args.kill_rank and t == args.kill_at_step:
            kill_self()
        x, y = batch(args.seed, t)
        lo, k = even_ranges(BATCH, world)[rank]
        out = model(x[lo:lo + k])
        loss = ((out - y[lo:lo + k]) ** 2).sum() / BATCH  # this rank's part of the global mean
        model.zero_grad(set_to_none=False)
        loss.backward()
        for p in params:
            dist.all_reduce(p.grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        for p, s, (o, k) in zip(params, shards, ranges):
            s.grad = p.grad.reshape(-1)[o:o + k].clone()
        opt.step()
        sync_params(params, shards, ranges)
        if rank == 0:
            with open(args.loss_file, "a") as f:
                f.write(json.dumps({"step": t, "loss": float(total), "world": world}) + "\n")
        if args.every and t % args.every == 0:
            if rank == args.kill_rank and t == args.kill_in_save:
                orig = ckio.save_file
                ckio.save_file = lambda obj, p, **kw: orig(obj, p, _chunk_hook=lambda n: kill_self())
            local = [sharded.LocalShard(n, tuple(p.shape), 0, o, k, s, opt.state.get(s, {}))
                     for n, p, s, (o, k) in zip(names, params, shards, ranges)]
            sharded.save_sharded(args.root, f"step_{t:06d}", local, [MicroAdamConfig(**HYPER)], step=t,
                                 extra={"seed": args.seed})
    finish()


@torch.no_grad()
def sync_params(params, shards, ranges):
    """Full params from every rank's shard: each rank adds its range into zeros, then all_reduce."""
    for p, s, (o, k) in zip(params, shards, ranges):
        full = torch.zeros(p.numel(), dtype=p.dtype)
        full[o:o + k] = s
        dist.all_reduce(full)
        p.copy_(full.view_as(p))


if __name__ == "__main__":
    main()
