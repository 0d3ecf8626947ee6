"""Worker for tests/test_step_in_backward_dist.py: run under `torchrun --nproc_per_node 2` (gloo, CPU).

FSDP2 (fp32, and bf16 compute with fp32 reduction): the same model and data trained by
MicroAdam's ordinary step and by step_in_backward=True (one group per tensor, and one
group per backward), with an accumulate() step; records per step whether every local
shard and state is bitwise equal, and whether every gradient was released by backward.
DDP: step_in_backward=True must refuse at the first backward; records the error.
Each rank writes OUT/rank<R>.json. With --device cuda (one GPU, NCCL, a world of one; run
by tests/test_step_in_backward_cuda.py) the FSDP2 scenarios run on the CUDA backend, where
FSDP2 runs the hooks on its reduce-scatter stream.
"""

import argparse
import contextlib
import json
import os

import torch
import torch.distributed as dist

from microadam_dist import MicroAdam
from microadam_dist.optim import local_tensor
from microadam_dist.teardown import finish

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, m=3, density=0.1, topk_block=64, quant_block=32,
             backend="reference")
DEVICE = torch.device("cpu")
STEPS = 4
ACCUMULATE_AT = 3  # this step sums two micro-batches


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 33 rows over 2 ranks: uneven shards (17/16); 5 rows: 3/2.
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 33),
                               torch.nn.Tanh(), torch.nn.Linear(33, 5))


def fsdp2(mesh, mixed: bool) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed \
        else MixedPrecisionPolicy()
    model = make_model().to(DEVICE)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def batches(step: int, rank: int) -> list:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [(torch.randn(8, 7, generator=g).to(DEVICE), torch.randn(8, 5, generator=g).to(DEVICE))
            for _ in range(2 if step == ACCUMULATE_AT else 1)]


def backward(model, xy) -> None:
    x, y = xy
    torch.nn.functional.mse_loss(model(x).float(), y).backward()


def same(ma, oa, mb, ob) -> bool:
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        if not torch.equal(local_tensor(pa), local_tensor(pb)):
            return False
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        if sa.keys() != sb.keys() or not all(torch.equal(local_tensor(sa[k]), local_tensor(sb[k])) for k in sa):
            return False
    return True


def fsdp2_scenario(mesh, rank: int, mixed: bool, bucket_mb: float) -> dict:
    ma, mb = fsdp2(mesh, mixed), fsdp2(mesh, mixed)
    oa = MicroAdam(ma.parameters(), **HYPER)
    ob = MicroAdam(mb.parameters(), step_in_backward=True, backward_bucket_mb=bucket_mb, **HYPER)
    res = {"equal": [], "released": [], "flushes": []}
    for step in range(1, STEPS + 1):
        micro = batches(step, rank)
        oa.zero_grad()
        for xy in micro:
            backward(ma, xy)
        oa.step()
        with ob.accumulate():
            for xy in micro[:-1]:
                backward(mb, xy)
        before = ob._backward.flushes
        backward(mb, micro[-1])
        res["released"].append(all(p.grad is None for p in mb.parameters()))
        res["flushes"].append(ob._backward.flushes - before)
        ob.step()
        res["equal"].append(same(ma, oa, mb, ob))
    init = fsdp2(mesh, mixed)
    res["moved"] = all(not torch.equal(local_tensor(p), local_tensor(q)) for p, q in zip(init.parameters(), mb.parameters()))
    res["stepped"] = sorted({int(st["step"]) for st in ob.state.values()})
    return res


def ddp_scenario(rank: int) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = MicroAdam(model.parameters(), step_in_backward=True, **HYPER)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        backward(model, batches(1, rank)[0])
        error = None
    except RuntimeError as exc:
        error = str(exc)
    untouched = all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state
    return {"error": error, "untouched": untouched}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    global DEVICE
    if args.device == "cuda":
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(DEVICE)
        HYPER["backend"] = "cuda"
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(args.device, (world,))
    result = {"rank": rank}
    for name, mixed, bucket in (("fsdp2_per_tensor", False, 1e-9), ("fsdp2_one_group", False, 1e3),
                                ("fsdp2_mp", True, 1e-3)):
        result[name] = fsdp2_scenario(mesh, rank, mixed, bucket)
    if args.device == "cpu":
        result["ddp"] = ddp_scenario(rank)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    finish()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
