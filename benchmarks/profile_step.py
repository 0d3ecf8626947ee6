"""Where a MicroAdam step's time goes: host time of opt.step(), kernel times (torch.profiler).

    python benchmarks/profile_step.py [--quant-block 64] [--dtype bf16]
"""
import argparse
import time

import torch

from step_bench import llama_shapes, make_params
from microadam_dist import MicroAdam

ap = argparse.ArgumentParser()
ap.add_argument("--quant-block", type=int, default=64)
ap.add_argument("--dtype", default="bf16")
ap.add_argument("--layers", type=int, default=8)
args = ap.parse_args()
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
params = make_params(llama_shapes(4096, 11008, args.layers, 32000), dtype)
opt = MicroAdam(params, lr=1e-4, quant_block=args.quant_block, backend="cuda", nonfinite="off")
for _ in range(3):
    opt.step()
torch.cuda.synchronize()
t0 = time.perf_counter()
opt.step()
t1 = time.perf_counter()
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"host time of step() {1e3 * (t1 - t0):.2f} ms, until synchronized {1e3 * (t2 - t0):.2f} ms")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
    opt.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
