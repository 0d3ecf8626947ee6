"""Host time of MicroAdam's CUDA step() (the GPU idles until its launches): cProfile's top lines.

    python benchmarks/host_profile.py [--quant-block 4096] [--steps 20] [--variant NAME:FLAGS]

Prints the median host time of step() started on an idle GPU, the kernels' device time, and
the functions that take the host time (cProfile, sorted by own time and by cumulative time).
--variant times a compile-time variant built as benchmarks/kernel_variants.py does.
"""
import argparse
import cProfile
import pstats

import torch

from kernel_variants import use_variant
from step_bench import host_ms, kernel_ms, llama_shapes, make_params
from microadam_dist import MicroAdam


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant-block", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--variant", default=None, help="NAME:FLAGS, a kernel_variants.py build")
    args = ap.parse_args()
    if args.variant:
        name, flags = args.variant.split(":", 1)
        use_variant(name, flags.split())
    params = make_params(llama_shapes(4096, 11008, args.layers, 32000), torch.bfloat16)
    opt = MicroAdam(params, lr=1e-4, quant_block=args.quant_block, backend="cuda", nonfinite="off")
    for _ in range(3):
        opt.step()
    print(f"{len(params)} tensors, quant block {args.quant_block}: host {host_ms(opt):.3f} ms a step, "
          f"kernels {kernel_ms(opt)}")
    prof = cProfile.Profile()
    for _ in range(args.steps):
        torch.cuda.synchronize()
        prof.enable()
        opt.step()
        prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    print(f"cProfile over {args.steps} steps (times are totals):")
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
