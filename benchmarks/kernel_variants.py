"""Step time of compile-time kernel variants, measured side by side in one process (one GPU).

Each variant is the extension of csrc/ built with extra nvcc defines: the launch-shape
constants (MICROADAM_THREADS in csrc/common.cuh, MICROADAM_CHUNK2 in csrc/microadam.cuh,
the MICROADAM_* block at the top of csrc/microadam_kernels.cu and microadam_kernels_wide.cu),
or, with MICROADAM_CSRC naming a patched copy of csrc/, any define that copy reads. The
builds run in parallel, then every variant times the same Llama-shaped step as step_bench.py.

    python benchmarks/kernel_variants.py --variants "base:,p2x8:-DMICROADAM_P2_MIN_BLOCKS=8" \
        --quant-blocks 64,100000 --out variants.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

from step_bench import host_ms, kernel_ms, llama_shapes, make_params, step_times
from microadam_dist import MicroAdam
from microadam_dist.ops import builder


def build(name: str, flags: list[str]):
    from torch.utils import cpp_extension
    src = builder.source_dir()
    return cpp_extension.load(
        name=f"{builder.EXT_NAME}_{builder._sources_digest(src)}_{name}",
        sources=[str(src / s) for s in builder.SOURCES], extra_include_paths=[str(src)],
        # The flags reach the C++ binding too: it exports constants (CHUNK2) that the host reads.
        extra_cflags=builder.CXX_FLAGS + flags, extra_cuda_cflags=builder.NVCC_FLAGS + flags, verbose=False)


def use_variant(name: str, flags: list[str]) -> None:
    """Build variant `name` (if not cached) and make it the module every MicroAdam step uses."""
    mod = build(name, flags)
    builder.reset()
    builder._cache.update(module=mod, how=f"variant {name}")


def time_steps(params, quant_block: int, steps: int, wd: float, kernels: bool = False,
               nonfinite: str = "off", topk_block: int = 4096):
    """Median step ms, and with kernels=True the device ms of each kernel in one more step."""
    opt = MicroAdam(params, lr=1e-4, m=10, density=0.01, topk_block=topk_block, quant_block=quant_block,
                    weight_decay=wd, backend="cuda", nonfinite=nonfinite)
    for _ in range(3):
        opt.step()
    ms = statistics.median(step_times(opt, steps))
    return ms, (kernel_ms(opt) if kernels else None), host_ms(opt)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base:")
    ap.add_argument("--quant-blocks", default="64,100000", help="'B': the top-k block's own size")
    ap.add_argument("--topk-blocks", default="4096")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2, help="rounds over the variants, interleaved")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--nonfinite", default="off", help="'skip': the kernels read the gradient check's flag")
    ap.add_argument("--kernels", action="store_true", help="also the device time of each kernel (torch.profiler)")
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = [(v.split(":", 1)[0], v.split(":", 1)[1].split()) for v in args.variants.split(",")]
    if args.build_only:
        build(args.build_only, dict(variants)[args.build_only])
        return
    procs = [subprocess.Popen([sys.executable, __file__, "--variants", args.variants, "--build-only", n])
             for n, _ in variants]
    if any(p.wait() for p in procs):
        raise SystemExit("a variant failed to build")
    params = make_params(llama_shapes(4096, 11008, args.layers, 32000), torch.bfloat16)
    rows = []
    for rep in range(args.reps):  # interleaved: the spread between repeats is the noise
        for name, flags in variants:
            use_variant(name, flags)
            for tb, qs in ((int(t), q) for t in args.topk_blocks.split(",") for q in args.quant_blocks.split(",")):
                q = tb if qs == "B" else int(qs)
                ms, kms, hms = time_steps(params, q, args.steps, args.weight_decay, args.kernels, args.nonfinite, tb)
                rows.append(dict(variant=name, flags=flags, topk_block=tb, quant_block=q, rep=rep, median_ms=ms,
                                 host_ms=hms, **({"kernels_ms": kms} if kms is not None else {})))
                ks = "  " + ", ".join(f"{k.split('::')[-1]} {v:.2f}" for k, v in kms.items() if v >= 0.01) if kms else ""
                print(f"{name:<12} B={tb:<6} q={q:<7} rep {rep}: {ms:8.2f} ms, host {hms:.2f}{ks}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), layers=args.layers, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
