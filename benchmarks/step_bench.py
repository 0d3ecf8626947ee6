"""Optimizer step time and memory on a Llama-shaped parameter set (one GPU).

Rows: torch AdamW (fused, foreach) and MicroAdam (CUDA kernels) with quant_block 64
and 100000 (m=10, density 1%), bf16 params, and fp32 params too. Each row builds its
params and gradients, takes warm-up steps (state allocated, kernels built), then
times `opt.step()` with CUDA events and reports the median. Ratios are to torch fused
AdamW of the same param dtype measured in the same run.

    python benchmarks/step_bench.py --out benchmarks/results/step_bench/h100.json

Columns: median step ms; GPU ms (the step's kernels, torch.profiler, one more step);
host ms (until step() returns, started on an idle GPU; MicroAdam's first launch goes out
before that, so step ms - GPU ms is the host time the GPU waited for, plus gaps between
launches); state bytes per param (all optimizer state tensors); transient MiB (peak
memory during a step above the memory held before it). Rows `microadam_q<Q>_fl0` make one
launch per step after every record is built (no early first launch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]
        shapes += [(hidden,), (hidden,)]
    shapes += [(hidden,), (vocab, hidden)]
    return shapes


def make_params(shapes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device="cuda").normal_(0, 0.02, generator=gen))
        p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=gen)
        params.append(p)
    return params


def make_opt(kind: str, params, args):
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=args.weight_decay, fused=True)
    if kind == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=args.weight_decay, foreach=True)
    from microadam_dist import MicroAdam
    from microadam_dist.ops import cuda as cuda_ops
    # microadam_q<quant_block>[_skip|_skipsync][_fl<N>]: _skip turns on the default non-finite
    # gradient check; _skipsync too, with the host waiting for the check before the launches
    # (time_row); _fl<N> sets FIRST_LAUNCH_BLOCKS (0: one launch after all records are built).
    spec = kind.split("_q")[1].split("_")
    nonfinite = "skip" if any(s.startswith("skip") for s in spec[1:]) else args.nonfinite
    fl = [s[2:] for s in spec[1:] if s.startswith("fl")]
    default = make_opt.__dict__.setdefault("first_launch_blocks", cuda_ops.FIRST_LAUNCH_BLOCKS)
    cuda_ops.FIRST_LAUNCH_BLOCKS = int(fl[0]) if fl else default
    return MicroAdam(params, lr=1e-4, weight_decay=args.weight_decay, m=10, density=0.01,
                     quant_block=int(spec[0]), backend="cuda", nonfinite=nonfinite)


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def step_times(opt, steps: int) -> list[float]:
    """Milliseconds of each of `steps` calls of opt.step(), timed with CUDA events."""
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        opt.step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def kernel_ms(opt) -> dict[str, float]:
    """Device milliseconds per kernel (name up to its template arguments) of one step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.replace("(anonymous namespace)::", "").replace("void ", "")
            name = name.split("<")[0].split("(")[0].strip()
            out[name] = out.get(name, 0.0) + e.time_range.elapsed_us() / 1e3
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def host_ms(opt, steps: int = 7) -> float:
    """Median host milliseconds until opt.step() returns, started on an idle GPU."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        times.append(1e3 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return statistics.median(times)


@contextlib.contextmanager
def host_waits_for_check(on: bool):
    """With `on`, the gradient check gives the kernels no flag: the host reads the check back
    before it launches anything (the path for several devices or the reference backend)."""
    if not on:
        yield
        return
    from microadam_dist import optim

    class HostWaits(optim._GradientCheck):
        def __init__(self, *a):
            super().__init__(*a)
            self.go = None

    real, optim._GradientCheck = optim._GradientCheck, HostWaits
    try:
        yield
    finally:
        optim._GradientCheck = real


def time_row(kind, dtype, shapes, args):
    with host_waits_for_check("skipsync" in kind.split("_")):
        return _time_row(kind, dtype, shapes, args)


def _time_row(kind, dtype, shapes, args):
    params = make_params(shapes, dtype)
    nparams = sum(p.numel() for p in params)
    opt = make_opt(kind, params, args)
    for _ in range(args.warmup):
        opt.step()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = step_times(opt, args.steps)
    transient = torch.cuda.max_memory_allocated() - held
    kms = kernel_ms(opt)
    row = dict(optimizer=kind, param_dtype=str(dtype).replace("torch.", ""), params=nparams,
               median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
               gpu_ms=sum(v for k, v in kms.items() if not k.startswith("Memcpy")), kernels_ms=kms,
               host_ms=host_ms(opt),
               state_bytes_per_param=state_bytes(opt) / nparams,
               transient_mib=transient / 2**20)
    del opt, params
    torch.cuda.empty_cache()
    return row


def copy_bandwidth() -> float:
    """Device-to-device copy rate (bytes read + written per second), the memory ceiling."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        y.copy_(x)
    b.record()
    b.synchronize()
    return 2 * x.numel() * 20 / (a.elapsed_time(b) / 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--nonfinite", default="off", help="MicroAdam's gradient check ('skip' adds a pass)")
    ap.add_argument("--rows", default="bf16:adamw_fused,bf16:adamw_foreach,bf16:microadam_q64,"
                    "bf16:microadam_q100000,bf16:microadam_q4096,bf16:microadam_q64_skip,bf16:microadam_q64_skipsync,"
                    "bf16:microadam_q4096_skip,"
                    "bf16:microadam_q64_fl0,"
                    "bf16:microadam_q100000_fl0,fp32:adamw_fused,fp32:microadam_q64,fp32:microadam_q100000")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    rows = []
    for spec in args.rows.split(","):
        d, kind = spec.split(":")
        t0 = time.time()
        rows.append(time_row(kind, dtypes[d], shapes, args))
        print(f"  {spec}: {rows[-1]['median_ms']:.2f} ms ({time.time() - t0:.0f} s)", flush=True)
    for r in rows:
        base = [x for x in rows if x["optimizer"] == "adamw_fused" and x["param_dtype"] == r["param_dtype"]]
        r["ratio_to_adamw_fused"] = r["median_ms"] / base[0]["median_ms"] if base else None
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                  host=platform.node(), copy_bytes_per_s=copy_bandwidth(), shapes=dict(
                      hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                      vocab=args.vocab, tensors=len(shapes)),
                  steps=args.steps, weight_decay=args.weight_decay, nonfinite=args.nonfinite, rows=rows)
    print(f"\n{result['device']}, {rows[0]['params'] / 1e9:.3f} B params, copy "
          f"{result['copy_bytes_per_s'] / 1e12:.2f} TB/s, wd={args.weight_decay}")
    print(f"{'optimizer':<24}{'dtype':<10}{'median ms':>10}{'x fused':>9}{'GPU ms':>8}{'host ms':>9}"
          f"{'state B/p':>11}{'transient MiB':>15}")
    for r in rows:
        ratio = f"{r['ratio_to_adamw_fused']:.3f}" if r["ratio_to_adamw_fused"] else "-"
        print(f"{r['optimizer']:<24}{r['param_dtype']:<10}{r['median_ms']:>10.2f}{ratio:>9}{r['gpu_ms']:>8.2f}"
              f"{r['host_ms']:>9.2f}{r['state_bytes_per_param']:>11.3f}{r['transient_mib']:>15.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
