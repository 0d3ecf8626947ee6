"""An ordinary DeepSpeed training script: it never imports microadam_dist.

Launched by tests/test_launch.py through launch/*.sh, which run it via
`microadam_dist.run`; its JSON names "type": "MicroAdam". Rank 0 writes a JSON
report to --out: the optimizer DeepSpeed built, world size, losses.
"""

import argparse
import json
import os
import sys

import deepspeed
import deepspeed.ops
import torch

from ds_common import batch, make_model, param_groups  # its folder is sys.path[0], as for any script


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    rank_from_launcher = "RANK" in os.environ  # False under mpirun: DeepSpeed asks MPI
    # Test speed only: skip the JIT build of DeepSpeed's CPU shared-memory all-reduce (~80 s).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Ranks come from torchrun/deepspeed env, else from MPI (DeepSpeed's mpi4py discovery on this port).
    deepspeed.init_distributed(dist_backend="gloo", distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = make_model(0)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=param_groups(model))
    losses = []
    for step in range(args.steps):
        x, y = batch(1, step, rank, dtype=next(engine.module.parameters()).dtype)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    state_steps = sorted({int(s["step"]) for s in engine.basic_optimizer.state.values()})
    report = {"optimizer": type(engine.basic_optimizer).__name__, "world": world, "rank": rank,
              "losses": losses, "state_steps": state_steps, "argv0": sys.argv[0], "name": __name__,
              "local_rank_arg": args.local_rank,
              "rank_from_launcher": rank_from_launcher}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
