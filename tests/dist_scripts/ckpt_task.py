"""The training task shared by the engine checkpoint scripts (ckpt_ds.py, ckpt_fsdp.py).

A small MLP whose global batch at step t depends on t only; BATCH divides by 1, 2, 3
and 4, so runs of any world size see the same data.
"""

import json

import torch
import torch.distributed as dist

HYPER = dict(lr=1e-2, weight_decay=0.01, m=4, density=0.1, topk_block=64, quant_block=48)
BATCH = 96


def build_model():
    torch.manual_seed(0)
    # 37 and 21 rows: uneven dim-0 shards over 2 and 3 ranks.
    return torch.nn.Sequential(torch.nn.Linear(24, 37), torch.nn.Tanh(), torch.nn.Linear(37, 21),
                               torch.nn.Tanh(), torch.nn.Linear(21, 1))


def batch(step):
    g = torch.Generator().manual_seed(7 * 100003 + step)
    x = torch.randn(BATCH, 24, generator=g)
    w = torch.linspace(-1, 1, 24)
    y = torch.sin(x @ w).unsqueeze(1) + 0.3 * (x[:, :1] * x[:, 1:2]) + 0.05 * torch.randn(BATCH, 1, generator=g)
    return x, y


def log_loss(path, step, part, world):
    """All-reduce this rank's share `part` of the global loss; rank 0 appends a JSONL line."""
    total = part.detach().clone()
    dist.all_reduce(total)
    if dist.get_rank() == 0:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "loss": float(total), "world": world}) + "\n")
