"""Optimizer peers in one process on one device: step time, state bytes and peak memory.

Every row times `opt.step()` on the same Llama-shaped parameter set (step_bench.py's shapes,
1.9 B params) with fresh random gradients before each step: torch AdamW (fused, foreach),
DeepSpeed FusedAdam, bitsandbytes AdamW8bit and PagedAdamW8bit, torchao AdamW8bit and
AdamW4bit, the authors' MicroAdam (ista-daslab-optimizers, bf16 params only) and ours
(microadam_dist.MicroAdam); both MicroAdams at m=10, density 1% and quant block 64, 4096 and
100000. bf16 params, and fp32 params for the peers that take them. A peer that cannot be
imported, does not run on the device or fails is a row that says why; the run goes on.

    bash benchmarks/peers_gpu.sh        # on the GPU machine: installs the peers, then this
    python benchmarks/peers.py --tiny --device cpu    # the rows that run on a CPU, small shapes

Columns: median step ms (CUDA events; each step starts on an idle GPU, so host time that the
GPU waits for counts), x fused AdamW of the same param dtype in the same run, state bytes
per param (every tensor in optimizer.state, the inner tensors of quantized tensor subclasses,
a tensor shared by several params once), peak GB (torch's allocator over the row: params,
grads, state and the step's temporaries; bitsandbytes' paged state lives in CUDA managed
memory, reported apart as managed GB), setup s (construction and warm-up steps, which hold
just-in-time builds and torch.compile). Writes JSON and a PNG bar plot, prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import authors_microadam
from step_bench import llama_shapes

LR, M, DENSITY = 1e-4, 10, 0.01
QUANT_BLOCKS = (64, 4096, 100000)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "peers", "peers.json")


@dataclass(frozen=True)
class Peer:
    name: str
    dist: str                                   # distribution whose version its rows record
    load: Callable[[], Callable]                # imports; returns build(params, weight_decay)
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    devices: tuple[str, ...] = ("cuda",)


def _torch_adamw(mode: str):
    return lambda: lambda params, wd: torch.optim.AdamW(params, lr=LR, weight_decay=wd, **{mode: True})


def _deepspeed():
    from deepspeed.ops.adam import FusedAdam
    return lambda params, wd: FusedAdam(params, lr=LR, weight_decay=wd, adam_w_mode=True)


def _bitsandbytes(cls: str):
    def load():
        import bitsandbytes
        return lambda params, wd: getattr(bitsandbytes.optim, cls)(params, lr=LR, weight_decay=wd)
    return load


def _torchao(cls: str):
    def load():
        from torchao import optim
        return lambda params, wd: getattr(optim, cls)(params, lr=LR, weight_decay=wd)
    return load


def _authors(quant_block: int):
    def load():
        with authors_microadam.stand_ins("wandb", "gpustat"):  # imported only to log
            from ista_daslab_optimizers import MicroAdam
        return lambda params, wd: MicroAdam(params, m=M, lr=LR, quant_block_size=quant_block,
                                            k_init=DENSITY, weight_decay=wd)
    return load


def _ours(quant_block: int):
    def load():
        from microadam_dist import MicroAdam
        # nonfinite="off": no peer checks the gradients for inf/NaN ("skip" adds a pass).
        return lambda params, wd: MicroAdam(
            params, lr=LR, weight_decay=wd, m=M, density=DENSITY, quant_block=quant_block,
            backend="cuda" if params[0].is_cuda else "reference", nonfinite="off")
    return load


PEERS = [
    Peer("adamw_fused", "torch", _torch_adamw("fused"), devices=("cuda", "cpu")),
    Peer("adamw_foreach", "torch", _torch_adamw("foreach"), devices=("cuda", "cpu")),
    Peer("ds_fusedadam", "deepspeed", _deepspeed),
    Peer("bnb_adamw8bit", "bitsandbytes", _bitsandbytes("AdamW8bit"), devices=("cuda", "cpu")),
    Peer("torchao_adamw8bit", "torchao", _torchao("AdamW8bit"), devices=("cuda", "cpu")),
    Peer("torchao_adamw4bit", "torchao", _torchao("AdamW4bit"), devices=("cuda", "cpu")),
    *[Peer(f"authors_microadam_q{q}", "ista-daslab-optimizers", _authors(q), dtypes=("bf16",))
      for q in QUANT_BLOCKS],
    *[Peer(f"microadam_q{q}", "microadam_dist", _ours(q), devices=("cuda", "cpu")) for q in QUANT_BLOCKS],
    # Last: its managed memory is never given back to the process.
    Peer("bnb_paged_adamw8bit", "bitsandbytes", _bitsandbytes("PagedAdamW8bit")),
]
BY_NAME = {p.name: p for p in PEERS}
# One fp32 row of the authors' says that their kernels take bf16 alone.
DEFAULT_ROWS = [f"{d}:{p.name}" for d in DTYPES for p in PEERS
                if d in p.dtypes or p.name == "authors_microadam_q100000"]


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes, managed bytes) of every tensor in opt.state. A quantized tensor subclass counts
    its inner tensors (__tensor_flatten__); a tensor held by several params counts once."""
    seen: set = set()
    total = managed = 0

    def visit(t: torch.Tensor) -> None:
        nonlocal total, managed
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                visit(getattr(t, name))
            return
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()
        if getattr(t, "is_paged", False):
            managed += t.numel() * t.element_size()

    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                visit(v)
    return total, managed


def make_params(shapes, dtype, device, gen) -> list[torch.nn.Parameter]:
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device).normal_(0, 0.02, generator=gen))
        p.grad = torch.empty_like(p)
        params.append(p)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(opt, params, gen, device, steps: int, min_steps: int, seconds: float) -> list[float]:
    """Milliseconds of each timed opt.step(), fresh gradients before each (not timed); stops
    after `steps`, or after `seconds` once `min_steps` are in."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < steps and (len(times) < min_steps or time.perf_counter() < deadline):
        for p in params:
            p.grad.normal_(0, 1e-3, generator=gen)
        _sync(device)
        times.append(_elapsed_ms(opt.step, device))
    return times


def _elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of fn(): CUDA events on a GPU (waits for the end), else the host clock."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:240]}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_row(spec: str, shapes, device: torch.device, args) -> dict:
    dname, name = spec.split(":")
    peer = BY_NAME[name]
    row = dict(optimizer=name, param_dtype=dname, version=_version(peer.dist), status="failed", reason=None)
    if dname not in peer.dtypes:
        return dict(row, status="unsupported", reason=f"takes {'/'.join(peer.dtypes)} params only")
    try:
        build = peer.load()
    except Exception as e:
        return dict(row, reason=f"not importable: {_reason(e)}")
    if device.type not in peer.devices:
        return dict(row, status="unsupported", reason=f"runs on {'/'.join(peer.devices)} only")
    _free(device)
    gen = torch.Generator(device=device).manual_seed(0)
    opt = params = None
    try:
        params = make_params(shapes, DTYPES[dname], device, gen)
        nparams = sum(p.numel() for p in params)
        t0 = time.perf_counter()
        opt = build(params, args.weight_decay)
        for _ in range(args.warmup):
            for p in params:
                p.grad.normal_(0, 1e-3, generator=gen)
            opt.step()
        _sync(device)
        setup_s = time.perf_counter() - t0
        times = step_ms(opt, params, gen, device, args.steps, args.min_steps, args.row_seconds)
        held, managed = state_bytes(opt)
        row.update(status="ok", params=nparams, steps=len(times), median_ms=statistics.median(times),
                   min_ms=min(times), max_ms=max(times), state_bytes=held,
                   state_bytes_per_param=held / nparams, setup_s=setup_s,
                   peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                   managed_gb=managed / 1e9)
    except Exception as e:
        row["reason"] = _reason(e)
    del opt, params
    _free(device)
    return row


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown_table(result: dict) -> str:
    lines = ["| optimizer | params | step ms | × fused AdamW | state B/param | peak GB | setup s | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        note = r["reason"] or ""
        if r.get("managed_gb"):
            note = f"+{r['managed_gb']:.2f} GB managed (paged) memory"
        lines.append(f"| {r['optimizer']} | {r['param_dtype']} | {_fmt(r.get('median_ms'), '.2f')} | "
                     f"{_fmt(r.get('ratio_to_adamw_fused'), '.2f')} | {_fmt(r.get('state_bytes_per_param'), '.3f')} | "
                     f"{_fmt(r.get('peak_gb'), '.1f')} | {_fmt(r.get('setup_s'), '.1f')} | {note} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['optimizer']} ({r['param_dtype']})" for r in rows]
    colors = ["tab:red" if r["optimizer"].startswith("microadam") else "tab:orange"
              if r["optimizer"].startswith("authors") else "tab:blue" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.6), sharey=True)
    for ax, key, title in ((axes[0], "median_ms", "median step ms (log)"),
                           (axes[1], "state_bytes_per_param", "optimizer state bytes / param")):
        vals = [r.get(key) or 0.0 for r in rows]
        ax.barh(range(len(rows)), vals, color=colors)
        for i, r in enumerate(rows):
            if r["status"] == "ok":
                ax.text(vals[i], i, f" {vals[i]:.3g}", va="center", fontsize=7)
            elif key == "median_ms":
                ax.text(0.01, i, "n/a: " + (r["reason"] or "")[:60], va="center", fontsize=7,
                        transform=ax.get_yaxis_transform())
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    if any(r.get("median_ms") for r in rows):
        axes[0].set_xscale("log")
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"{result['device']}, {result['params']:,} params, one process "
                 f"(blue: torch, DeepSpeed, bitsandbytes, torchao; orange: the authors'; red: ours)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes and few steps (tests, CPU)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per row, at most")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--row-seconds", type=float, default=6.0, help="timed steps stop past this, once min-steps are in")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma list of dtype:name")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON; the plot goes beside it as .png")
    args = ap.parse_args(argv)
    if args.tiny:
        args.hidden, args.intermediate, args.layers, args.vocab = 64, 176, 2, 512
        args.steps, args.min_steps, args.warmup = 3, 3, 1
    rows = args.rows.split(",")
    for spec in rows:
        d, _, name = spec.partition(":")
        if d not in DTYPES or name not in BY_NAME:
            raise SystemExit(f"--rows: {spec!r} is not dtype:name with dtype in {sorted(DTYPES)} "
                             f"and name in {sorted(BY_NAME)}")
    device = torch.device(args.device)
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.perf_counter()
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        versions={p.dist: _version(p.dist) for p in PEERS}, params=sum(torch.Size(s).numel() for s in shapes),
        shapes=dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                    vocab=args.vocab, tensors=len(shapes)),
        hyper=dict(lr=LR, weight_decay=args.weight_decay, m=M, density=DENSITY),
        steps=args.steps, min_steps=args.min_steps, row_seconds=args.row_seconds, warmup=args.warmup,
        elapsed_s=0.0, rows=[])
    for spec in rows:
        r = time_row(spec, shapes, device, args)
        result["rows"].append(r)
        result["elapsed_s"] = time.perf_counter() - start
        what = f"{r['median_ms']:.2f} ms" if r["status"] == "ok" else r["reason"]
        print(f"  {spec}: {what} ({result['elapsed_s']:.0f} s)", flush=True)
        for x in result["rows"]:
            base = [b for b in result["rows"] if b["optimizer"] == "adamw_fused" and b["status"] == "ok"
                    and b["param_dtype"] == x["param_dtype"]]
            x["ratio_to_adamw_fused"] = x["median_ms"] / base[0]["median_ms"] if base and x["status"] == "ok" else None
        if args.out:  # after every row: a peer that kills the process leaves the rows before it
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    if args.out:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"\n{result['device']}, {result['params']:,} params, torch {result['torch']}, "
          f"{result['elapsed_s']:.0f} s\n")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
