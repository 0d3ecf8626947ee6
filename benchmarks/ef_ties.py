"""How often the fused kernels' nearest EF rounding takes its exact-division path (CPU, seconds).

quant_unit (csrc/common.cuh) rounds q = (a - lo) * (1 / scale) and redoes by the exact division
the elements whose q lies within 1e-5 of a half (a warp runs that path when any of its lanes
needs it). This replays the reference's compress step on one Llama-row-sized tensor and counts
those elements, the units of 8 and the warps of 32 units that would take it: with the same
bf16 gradient every step (as benchmarks/step_bench.py feeds) and with a fresh one each step (as
training does).

    python benchmarks/ef_ties.py --out ef_ties.json
"""

from __future__ import annotations

import argparse
import json

import torch

from microadam_dist.config import MicroAdamConfig
from microadam_dist.layout import Layout
from microadam_dist.ops import reference as ref


def near_half_rates(a: torch.Tensor, quant_block: int) -> dict:
    blocks = a.view(-1, quant_block)
    lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    q = (blocks - lo) / ((hi - lo) / 15)
    near = ((q - q.round()).abs() - 0.5).abs() < 1e-5
    units = near.reshape(-1, 8).any(1)
    return {"elements": near.float().mean().item(), "units": units.float().mean().item(),
            "warps": units.reshape(-1, 32).any(1).float().mean().item()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=256, help="top-k blocks of 4096 in the tensor")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    n, qb = 4096 * args.blocks, 4096
    lay = Layout.for_numel(n, MicroAdamConfig(lr=1e-4, m=10, density=0.01, quant_block=qb))
    res = {}
    for case in ("same_gradient", "fresh_gradient"):
        st = lay.new_state(torch.device("cpu"))
        g = torch.empty(n).normal_(0, 1e-3).to(torch.bfloat16)
        rows = []
        for step in range(1, args.steps + 1):
            if case == "fresh_gradient":
                g = torch.empty(n).normal_(0, 1e-3).to(torch.bfloat16)
            a = g.float() + ref.dequantize_ef(st["ef"], st["ef_min"], st["ef_max"], n, qb)
            glob, _ = ref.select_topk(a, lay)
            a[glob] = 0.0
            rows.append({"step": step, **near_half_rates(a, qb)})
            ref.compress_(g, st, lay, step, "nearest")
            r = rows[-1]
            print(f"{case:15s} step {step}: elements {r['elements']:.2e}  units {r['units']:.4f}  warps {r['warps']:.3f}")
        res[case] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), **res}, f, indent=1)
    return res


if __name__ == "__main__":
    main()
