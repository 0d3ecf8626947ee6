"""Where the iteration time of MicroAdam(step_in_backward=True) goes, beside the ordinary step,
on the LLaMA-2-7B shape of benchmarks/memory_7b.py (one model, built once; one optimizer per
variant, each freed before the next).

    python benchmarks/backward_profile.py --out /tmp/bp.json            # one GPU, ~2 minutes
    python benchmarks/backward_profile.py --layers 4 --variants microadam,sib

Per variant: median iteration (forward + backward + step + zero_grad, synchronized), the host
time until each phase returned (forward, backward, step: how far the host runs ahead of the
GPU), the host time spent inside the groups' flushes, the peak memory, and from one profiled
iteration the GPU's busy time (union of kernel intervals), the kernel time of the optimizer's
kernels and of the rest, and the kernels' count.

Variants (comma list): microadam (ordinary step), sib (step_in_backward, default buckets),
sib_b64 / sib_b256 / sib_b512 / sib_b1024 (bucket MB), sib_off / microadam_off
(nonfinite="off"), adamw (torch AdamW fused).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import time

import torch
from memory_7b import build_model

from microadam_dist import MicroAdam

VARIANTS = {
    "microadam": dict(),
    "microadam_off": dict(nonfinite="off"),
    "sib": dict(step_in_backward=True),
    "sib_b64": dict(step_in_backward=True, backward_bucket_mb=64.0),
    "sib_b256": dict(step_in_backward=True, backward_bucket_mb=256.0),
    "sib_b512": dict(step_in_backward=True, backward_bucket_mb=512.0),
    "sib_b1024": dict(step_in_backward=True, backward_bucket_mb=1024.0),
    "sib_off": dict(step_in_backward=True, nonfinite="off"),
    "adamw": None,
}
OPT_KERNELS = ("microadam", "multi_tensor_apply")


def make(name, model):
    spec = VARIANTS[name]
    if spec is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    return MicroAdam(model.parameters(), lr=1e-5, **spec)


def drop(opt):
    sib = getattr(opt, "_backward", None)
    if sib is not None:
        for _, handle in sib._hooks.values():
            handle.remove()
        sib._hooks.clear()


def gpu_summary(prof) -> dict:
    spans, opt_ms, other_ms, count = [], 0.0, 0.0, 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = e.time_range.start, e.time_range.end
        spans.append((start, end))
        ms = (end - start) / 1e3
        count += 1
        if any(k in e.name for k in OPT_KERNELS):
            opt_ms += ms
        else:
            other_ms += ms
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    first, last = (spans[0][0], max(e for _, e in spans)) if spans else (0, 0)
    return {"gpu_busy_ms": busy / 1e3, "gpu_span_ms": (last - first) / 1e3, "optimizer_kernels_ms": opt_ms,
            "other_kernels_ms": other_ms, "kernels": count}


def run_variant(name, model, config, args):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    opt = make(name, model)
    sib = getattr(opt, "_backward", None)
    flush_s = [0.0]
    if sib is not None:
        inner = sib.flush
        # cProfile of the flushes alone: they run on autograd's device thread, where the
        # profiler must be enabled.
        profiler = cProfile.Profile() if name in args.cprofile.split(",") else None

        def timed_flush():
            t = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            inner()
            if profiler is not None:
                profiler.disable()
            flush_s[0] += time.perf_counter() - t

        sib.flush = timed_flush
    gen = torch.Generator().manual_seed(1234)
    rows = []

    def iteration():
        batch = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=gen).cuda()
        torch.cuda.synchronize()
        flush_s[0] = 0.0
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        return {"iter": t4 - t0, "forward_host": t1 - t0, "backward_host": t2 - t1, "step_host": t3 - t2,
                "flush_host": flush_s[0], "groups": None}

    mallocs = None
    for it in range(args.warmup + args.steps):
        if it == args.warmup:
            mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
        before = sib.flushes if sib is not None else 0
        r = iteration()
        r["groups"] = sib.flushes - before if sib is not None else None
        if it >= args.warmup:
            rows.append(r)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        iteration()
    res = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "groups"}
    res["groups"] = rows[-1]["groups"]
    res["iters_s"] = [r["iter"] for r in rows]
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    # cudaMalloc calls during the timed iterations (each may synchronize the device).
    res["device_allocs"] = torch.cuda.memory_stats().get("num_device_alloc", 0) - mallocs
    if sib is not None and profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.cprofile_lines)
        res["flush_cprofile"] = text.getvalue()
        print(f"-- {name}: flushes' host time by function (cProfile, own time) --\n" + text.getvalue(), flush=True)
    res.update(gpu_summary(prof))
    drop(opt)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--variants", default="microadam,sib,sib_b256,sib_b1024,sib_b64,sib_off,microadam_off,adamw")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--cprofile", default="", help="comma list of variants whose flushes cProfile profiles")
    ap.add_argument("--cprofile-lines", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    margs = argparse.Namespace(tiny=False, layers=args.layers, seq_len=args.seq_len)
    model, config = build_model(margs, torch.device("cuda"))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": {}}
    for name in args.variants.split(","):
        key = name
        while key in out["rows"]:  # a variant named twice is measured twice
            key += "+"
        r = out["rows"][key] = run_variant(name, model, config, args)
        print(f"{key:14s} iter {r['iter'] * 1e3:7.1f} ms | host: fwd {r['forward_host'] * 1e3:6.1f} "
              f"bwd {r['backward_host'] * 1e3:6.1f} (flush {r['flush_host'] * 1e3:5.1f}) step {r['step_host'] * 1e3:6.1f} "
              f"| gpu busy {r['gpu_busy_ms']:6.1f} span {r['gpu_span_ms']:6.1f} opt {r['optimizer_kernels_ms']:5.1f} "
              f"other {r['other_kernels_ms']:6.1f} n {r['kernels']} | peak {r['peak_gb']:.1f} GB groups {r['groups']}",
              flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
