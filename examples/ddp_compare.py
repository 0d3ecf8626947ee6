"""Train one small model with MicroAdam and with AdamW under DDP, and compare the losses.

    torchrun --nproc_per_node 2 examples/ddp_compare.py --steps 300

Runs on the CPU with gloo (NCCL on GPUs). The task is a student MLP learning a random
teacher MLP's classes on generated data, so it needs no download. Rank 0 prints both
loss curves' ends; with --out, every rank writes its final parameters and the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from microadam_dist import MicroAdam, state_bytes
from microadam_dist.teardown import finish  # noqa: E402


class Teacher:
    """A fixed random teacher network that labels fresh inputs (same on every rank).

    Labels are drawn from the teacher's softmax, so the best achievable loss is the
    labels' entropy, not zero: like real data, the task has a noise floor, and
    every batch is new data, so no optimizer wins by memorizing.
    """

    def __init__(self, dim: int, classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, 128), nn.Tanh(), nn.Linear(128, classes))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p.shape[-1]) ** 0.5)

    @torch.no_grad()
    def sample(self, n: int, gen: torch.Generator):
        x = torch.randn(n, self.dim, generator=gen)
        probs = torch.softmax(self.net(x) * 3.0, dim=1)
        return x, torch.multinomial(probs, 1, generator=gen).squeeze(1)


def build_model(dim: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, classes))


def build_optimizer(name: str, params, lr: float):
    if name == "microadam":
        return MicroAdam(params, lr=lr, weight_decay=0.0, m=10, density=0.01)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train(name: str, args, rank: int, world: int, device: torch.device):
    teacher = Teacher(args.dim, args.classes, args.seed)
    x_eval, y_eval = teacher.sample(args.eval_samples, torch.Generator().manual_seed(args.seed + 3))
    model = build_model(args.dim, args.classes, args.seed + 1).to(device)
    ddp = DDP(model) if world > 1 else model
    opt = build_optimizer(name, model.parameters(), args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.1, 1 - s / args.steps))
    gen = torch.Generator().manual_seed(args.seed + 2)
    losses = []
    for step in range(args.steps):
        # every rank draws the same global batch and takes its own slice of it
        x, y = teacher.sample(args.batch * world, gen)
        x, y = x[rank * args.batch:(rank + 1) * args.batch], y[rank * args.batch:(rank + 1) * args.batch]
        loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        reduced = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reduced)
        losses.append(reduced.item() / world)
    with torch.no_grad():
        held_out = nn.functional.cross_entropy(model(x_eval.to(device)), y_eval.to(device)).item()
    return model, opt, losses, held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=["microadam", "adamw", "both"], default="both")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-samples", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for params and metrics")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(world, 1)))

    names = ["microadam", "adamw"] if args.optimizer == "both" else [args.optimizer]
    results = {}
    for name in names:
        t0 = time.perf_counter()
        model, opt, losses, eval_loss = train(name, args, rank, world, device)
        nparams = sum(p.numel() for p in model.parameters())
        state = sum(t.numel() * t.element_size() for s in opt.state.values()
                    for t in s.values() if isinstance(t, torch.Tensor))
        results[name] = {"loss_curve": losses, "eval_loss": eval_loss, "seconds": time.perf_counter() - t0,
                         "state_bytes_per_param": state / nparams}
        if name == "microadam":
            assert state == state_bytes([p.numel() for p in model.parameters()], m=10, density=0.01)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                       os.path.join(args.out, f"{name}_rank{rank}.pt"))
    if rank == 0:
        print(f"{'optimizer':<10} {'loss@10%':>9} {'loss@50%':>9} {'last-20 mean':>13} "
              f"{'held-out loss':>15} {'state B/param':>14} {'seconds':>8}")
        for name, r in results.items():
            c = r["loss_curve"]
            tail = sum(c[-20:]) / len(c[-20:])
            print(f"{name:<10} {c[len(c) // 10]:>9.4f} {c[len(c) // 2]:>9.4f} {tail:>13.4f} "
                  f"{r['eval_loss']:>15.4f} {r['state_bytes_per_param']:>14.3f} {r['seconds']:>8.1f}")
        if len(results) == 2:
            ratio = results["microadam"]["eval_loss"] / results["adamw"]["eval_loss"]
            print(f"MicroAdam / AdamW held-out loss: {ratio:.3f} ({world} processes, "
                  f"{'cuda' if use_cuda else 'cpu'})")
        if args.out:
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump({"world_size": world, "args": vars(args), "results": results}, f)
    finish()  # barrier, destroy the group, leave without racing gloo's threads (teardown.py)


if __name__ == "__main__":
    main()
