"""Convergence evidence: does MicroAdam fine-tune as well as AdamW, with 1/9 of the state?

    python benchmarks/convergence.py --tiny                       # CPU smoke run, < 1 minute
    python benchmarks/convergence.py                              # one H100: 125M Llama, ~6 minutes
    python benchmarks/convergence_campaign.py                     # the regime table (see there)

1. Pre-train a Llama-architecture model (byte vocabulary, `--size`) with AdamW on
   corpus A (`--pretrain-corpus`, default the Python standard library's sources).
2. From that checkpoint, fine-tune on a different corpus B (`--finetune-corpus`,
   default PyTorch's C++ headers) for `--finetune-steps` steps with each optimizer of
   `--optimizers` (default AdamW; MicroAdam m=10, density 1%; the same with stochastic
   EF rounding; `ista`, the authors' MicroAdam, bf16 weights only; variants as
   `microadam/density=0.02/m=20/alpha=0.1` or `adamw/lr=1e-4`): same initial weights,
   same batches, same LR schedule and clipping.
3. Report each run's held-out loss on corpus B (files never trained on), its curve,
   and its optimizer state in bytes per parameter, measured from the state tensors.

Writes OUT/convergence_TAG.json (after every run, so a cut-off run keeps what it
finished) and OUT/convergence_TAG.png. `--weights fp32` (default): fp32 weights, with bf16
autocast on CUDA; `--weights bf16`: the weights themselves are bf16 (no master copy). On
CUDA: TF32, no torch.compile; MicroAdam's backend is "auto" (the fused kernels when
`python -m microadam_dist.env` says they load, else the PyTorch reference). A row that
cannot run here (`ista` without CUDA, the package or bf16 weights) is kept as a row that
says why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
from typing import Callable

import torch
from tqdm import tqdm

import authors_microadam
from examples_import import examples_module
from microadam_dist import MicroAdam
from microadam_dist.ops import select_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
common = examples_module("common")

OPTIMIZERS = {
    "adamw": dict(),
    "microadam": dict(m=10, density=0.01, ef_rounding="nearest"),
    "microadam_sr": dict(m=10, density=0.01, ef_rounding="stochastic"),
    "ista": dict(m=10, density=0.01, quant_block=4096),  # the authors' package: bf16 weights only
}
# Overrides allowed after a name, "/"-separated: microadam/density=0.02/m=20, adamw/lr=1e-4.
VARIANT_KEYS = {"lr": float, "m": int, "density": float, "ef_rounding": str, "quant_block": int,
                "topk_block": int, "alpha": float}
# The keys each optimizer takes (the authors' chooses its own top-k block and rounds to nearest).
ALLOWED_KEYS = {"adamw": ("lr",), "ista": ("lr", "m", "density", "quant_block", "alpha")}
TINY = dict(size="tiny", pretrain_steps=40, finetune_steps=40, batch=4, seq_len=64, eval_every=10,
            eval_windows=8, max_tokens=400_000, tag="tiny")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: " + json.dumps(TINY))
    ap.add_argument("--size", default="125m", choices=tuple(common.SIZES))
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=1500,
                    help="0: pre-train only (with --save-pretrained: a start for later runs' --pretrained)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=3e-4, help="fine-tuning peak LR, the same for every optimizer")
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--pretrain-corpus", default="python")
    ap.add_argument("--finetune-corpus", default="cpp")
    ap.add_argument("--max-tokens", type=int, default=40_000_000, help="train tokens read per corpus")
    ap.add_argument("--optimizers", default="adamw,microadam,microadam_sr",
                    help=f"comma list of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "cuda"))
    ap.add_argument("--weights", default="fp32", choices=("fp32", "bf16"),
                    help="fine-tuning weights: fp32 (bf16 autocast on CUDA) or pure bf16 (the start rounded "
                         "to bf16); pre-training always uses fp32 weights")
    ap.add_argument("--ista-src", default=None,
                    help="folder of the unpacked authors' wheel and CUDA sdist (benchmarks/authors_microadam.py)")
    ap.add_argument("--pretrained", default=None, help="load this pre-trained state_dict instead of pre-training")
    ap.add_argument("--save-pretrained", default=None, help="save the pre-trained state_dict here")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "convergence"))
    ap.add_argument("--tag", default=None, help="file names: convergence_TAG.json/png (default: the size)")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and pre-training batches")
    ap.add_argument("--finetune-seed", type=int, default=None,
                    help="fine-tuning batches (default: --seed); vary it alone to repeat a row from one pre-trained model")
    ap.add_argument("--deterministic", nargs="?", const="all", default="off", choices=("off", "pretrain", "all"),
                    help="reproducible across processes on one kind of GPU, for the pre-training only or for all: "
                         "torch.use_deterministic_algorithms (warn only; the warnings are recorded in the JSON), a "
                         "fixed cuBLAS workspace and the math attention kernel (flash and memory-efficient attention "
                         "accumulate their backward with atomics); slower. Compare pretrained_checksum before "
                         "comparing rows of two runs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():  # flags given explicitly win over the --tiny preset
            if k == "size" or getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.tag = args.tag or args.size
    for name in args.optimizers.split(","):
        try:
            optimizer_spec(name)
        except ValueError as e:
            ap.error(f"--optimizers: {e}")
    return args


def optimizer_spec(name: str) -> dict:
    """The label and hyper-parameters of one --optimizers entry: a name of OPTIMIZERS, then
    optional "/key=value" overrides (VARIANT_KEYS; ALLOWED_KEYS for adamw and ista)."""
    base, *mods = name.split("/")
    if base not in OPTIMIZERS:
        raise ValueError(f"unknown {base!r}; expected a comma list of {', '.join(OPTIMIZERS)}, "
                         f"each optionally followed by /key=value ({', '.join(VARIANT_KEYS)})")
    spec = dict(OPTIMIZERS[base])
    for mod in mods:
        key, eq, value = mod.partition("=")
        allowed = ALLOWED_KEYS.get(base, tuple(VARIANT_KEYS))
        if not eq or key not in allowed:
            allowed = ", ".join(allowed)
            raise ValueError(f"{name!r}: override {mod!r} is not key=value with key one of {allowed}")
        try:
            spec[key] = VARIANT_KEYS[key](value)
        except ValueError:
            raise ValueError(f"{name!r}: {key}={value!r} is not a {VARIANT_KEYS[key].__name__}") from None
    if base == "adamw":
        label = "AdamW"
    else:
        name = "authors' MicroAdam" if base == "ista" else "MicroAdam"
        label = f"{name} (m={spec['m']}, {100 * spec['density']:g}%"
        label += ", stochastic EF)" if spec.get("ef_rounding") == "stochastic" else ")"
        label += "".join(f", {k} {spec[k]}" for k in ("quant_block", "topk_block", "alpha")
                         if k in spec and (k, spec[k]) != ("quant_block", 4096))
    spec["label"] = label + (f", LR {spec['lr']:g}" if "lr" in spec else "")
    return spec


def is_adamw(name: str) -> bool:
    return name.split("/")[0] == "adamw"


def adamw_baseline(runs: dict) -> dict | None:
    """The first AdamW run of results["finetune"], the one the others are compared with."""
    return next((r for n, r in runs.items() if is_adamw(n)), None)


class Runner:
    """Everything one training run needs: device, precision, data, evaluation."""

    def __init__(self, args, phases: tuple[str, ...] = ("pretrain", "finetune")):
        """`phases`: the corpora to load (a fine-tuning worker needs "finetune" only)."""
        self.args = args
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if args.deterministic != "off":
            # cuBLAS needs a fixed workspace for reproducible results (set before its first use).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            self.set_deterministic(True)
        self.tok = common.ByteTokenizer()
        eval_tokens = max(args.eval_windows * (args.seq_len + 1) * 4, 200_000)
        self.data = {}
        for phase, corpus in (("pretrain", args.pretrain_corpus), ("finetune", args.finetune_corpus)):
            if phase not in phases:
                continue
            train, ev = common.load_corpus(corpus, self.tok, args.max_tokens, eval_tokens)
            self.data[phase] = (train, common.eval_windows(ev, args.eval_windows, args.seq_len))

    def set_deterministic(self, on: bool) -> None:
        torch.use_deterministic_algorithms(on, warn_only=True)  # an op without a deterministic kernel warns
        if self.cuda:
            torch.backends.cuda.enable_flash_sdp(not on)
            torch.backends.cuda.enable_mem_efficient_sdp(not on)
            torch.backends.cuda.enable_cudnn_sdp(not on)

    def autocast(self, model):
        """bf16 autocast for fp32 weights on CUDA; bf16 weights compute in bf16 as they are."""
        on = self.cuda and next(model.parameters()).dtype == torch.float32
        return torch.autocast("cuda" if self.cuda else "cpu", dtype=torch.bfloat16, enabled=on)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (--weights)."""
        return torch.bfloat16 if self.args.weights == "bf16" else torch.float32

    @torch.no_grad()
    def evaluate(self, model, phase: str) -> float:
        model.eval()
        windows = self.data[phase][1]
        total = 0.0
        for i in range(0, windows.shape[0], self.args.batch):
            x = windows[i:i + self.args.batch].to(self.device)
            with self.autocast(model):
                total += float(model(input_ids=x, labels=x).loss) * x.shape[0]
        model.train()
        return total / windows.shape[0]

    def train(self, model, opt, phase: str, steps: int, desc: str, first: int = 1,
              lr_at: Callable[[int], float] | None = None) -> dict:
        """Steps first .. first+steps-1 with clipping, eval every --eval-every steps; returns the curve.

        The LR is the optimizer's times lr_at(step), by default a warm-up + cosine schedule
        over these steps; batches depend on the phase and the step only.
        """
        a = self.args
        tokens = self.data[phase][0]
        # The LR the optimizer was built with (a second call, continuing a run, finds it here).
        base = [g.setdefault("initial_lr", g["lr"]) for g in opt.param_groups]
        warmup = max(1, int(a.warmup_frac * steps))
        lr_at = lr_at or (lambda step: common.lr_factor(step, warmup, steps))
        rows, t0 = [], time.perf_counter()
        bar = tqdm(range(first, first + steps), desc=desc, disable=a.no_progress, dynamic_ncols=True, mininterval=2)
        # Seeded by the phase and step only: every optimizer sees the same batches.
        seed = a.seed if phase == "pretrain" else finetune_seed(a) + 1
        for step in bar:
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * lr_at(step)
            x = common.batch_at(tokens, step, seed, a.batch, a.seq_len).to(self.device, non_blocking=True)
            with self.autocast(model):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip) if a.clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            # Loss and norm stay on the device until the next evaluation: no sync per step.
            row = {"step": step, "loss": loss.detach(), "lr": opt.param_groups[0]["lr"]}
            if norm is not None:
                row["grad_norm"] = norm.detach()
            rows.append(row)
            if step % a.eval_every == 0 or step == first + steps - 1:
                for r in rows[-a.eval_every:]:
                    r.update({k: float(r[k]) for k in ("loss", "grad_norm") if torch.is_tensor(r.get(k))})
                row["eval_loss"] = self.evaluate(model, phase)
                bar.set_postfix(loss=f"{row['loss']:.3f}", eval=f"{row['eval_loss']:.3f}")
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return {"curve": rows, "final_eval_loss": rows[-1]["eval_loss"], "seconds": seconds,
                "seconds_per_step": seconds / steps}


def make_optimizer(name: str, model, lr: float, backend: str, spec: dict | None = None, ista_src: str | None = None):
    """The optimizer of an --optimizers entry (spec: its optimizer_spec, if already parsed);
    its "/lr=" override wins over lr. `ista` raises authors_microadam.Unavailable where it
    cannot run (it takes bf16 CUDA params only)."""
    groups = common.decay_groups(model, 0.0)
    hyper = {k: v for k, v in (spec or optimizer_spec(name)).items() if k != "label"}
    lr = hyper.pop("lr", lr)
    if is_adamw(name):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=torch.cuda.is_available() or None)
    if name.split("/")[0] == "ista":
        p = next(model.parameters())
        if p.dtype != torch.bfloat16 or not p.is_cuda:
            raise authors_microadam.Unavailable(f"its kernels take bf16 CUDA params, these are {p.dtype} on {p.device}")
        return authors_microadam.make(authors_microadam.load(ista_src), groups, lr=lr, **hyper)
    return MicroAdam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, backend=backend, **hyper)


def weights_checksum(state: dict) -> str:
    """A hash of the exact bytes of every tensor: equal across processes iff the weights are."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write_results(args, results: dict) -> tuple[str, str]:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"convergence_{args.tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    runs = {r["label"]: r["curve"] for r in results["finetune"].values() if "curve" in r}
    if not runs:  # pre-training only
        return path, None
    png = common.plot_runs(runs, os.path.join(args.out, f"convergence_{args.tag}.png"),
                           title=f"Fine-tuning a {results['params'] / 1e6:.0f}M Llama ({args.size}) on "
                                 f"'{args.finetune_corpus}' after pre-training on '{args.pretrain_corpus}'")
    return path, png


def summarize(results: dict) -> None:
    runs = results["finetune"]
    base = adamw_baseline(runs)
    print(f"\n{'optimizer':<38} {'final eval loss':>15} {'vs AdamW':>9} {'state B/param':>14} {'s/step':>7}")
    for r in runs.values():
        if "skipped" in r:
            print(f"{r['label']:<38} skipped: {r['skipped']}")
            continue
        rel = f"{100 * (r['final_eval_loss'] / base['final_eval_loss'] - 1):+.2f}%" if base else "-"
        print(f"{r['label']:<38} {r['final_eval_loss']:>15.4f} {rel:>9} {r['state_bytes_per_param']:>14.3f} "
              f"{r['seconds_per_step']:>7.3f}")


def finetune_seed(args) -> int:
    """The seed of the fine-tuning batches and of a fine-tune's RNG (--finetune-seed, else --seed)."""
    return args.seed if args.finetune_seed is None else args.finetune_seed


def cast_weights(model, dtype: torch.dtype) -> None:
    """model.to(dtype), with the buffers that no state_dict carries (the rotary frequencies) set
    from their values at the first call: a run in fp32 after one in bf16 must not inherit
    bf16-rounded frequencies."""
    kept = model.__dict__.setdefault("_buffers_first_seen", {n: b.detach().clone() for n, b in model.named_buffers()})
    model.to(dtype)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(kept[n])


def finetune(runner: Runner, model, start: dict, name: str, steps: int, lr: float | None = None) -> dict:
    """One fine-tuning row from `start` (weights in runner.dtype): its curve, final held-out
    loss and state bytes, or {"label", "skipped": why} where the optimizer cannot run here."""
    a = runner.args
    spec = optimizer_spec(name)
    cast_weights(model, runner.dtype)
    model.load_state_dict(start)
    try:
        opt = make_optimizer(name, model, a.lr if lr is None else lr, a.backend, spec, a.ista_src)
    except authors_microadam.Unavailable as exc:
        print(f"{spec['label']}: skipped ({exc})", flush=True)
        return {"label": spec["label"], "skipped": str(exc)}
    run = runner.train(model, opt, "finetune", steps, spec["label"])
    n_params = sum(p.numel() for p in model.parameters())
    run.update(label=spec["label"], weights=a.weights, state_bytes=common.optimizer_state_bytes(opt),
               nonfinite_skips=getattr(opt, "nonfinite_skips", 0))
    run["state_bytes_per_param"] = run["state_bytes"] / n_params
    if name.split("/")[0] == "ista":
        run["authors_topk_block"] = max(int(st["d_block_size"]) for st in opt.state.values())
    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Warnings raised while training are kept in the JSON: under --deterministic they name
    # any op that ran without a deterministic kernel.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        return experiment(args, caught)


def experiment(args, caught: list) -> dict:
    runner = Runner(args)
    dev = runner.device
    model = common.build_model(None, args.size, runner.tok.vocab_size, seed=args.seed,
                               max_len=max(2048, args.seq_len)).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_total = (args.pretrain_steps + len(args.optimizers.split(",")) * args.finetune_steps) * args.batch * args.seq_len
    est = 6 * n_params * tokens_total / 4e14
    backend = "-" if all(is_adamw(n) for n in args.optimizers.split(",")) else select_backend(args.backend, dev)[0]
    print(f"model {args.size}: {n_params / 1e6:.1f} M params; {tokens_total / 1e6:.0f} M tokens in all; "
          f"~{est / 60:.1f} min of matmuls at 400 TFLOP/s; device {dev}; MicroAdam backend {backend}", flush=True)
    results = {"args": vars(args), "params": n_params, "device": torch.cuda.get_device_name() if runner.cuda else "cpu",
               "torch": torch.__version__, "microadam_backend": backend,
               "corpora": {p: {"train_tokens": runner.data[p][0].numel(), "eval_windows": runner.data[p][1].shape[0]}
                           for p in runner.data},
               "finetune": {}}

    if args.pretrained:
        model.load_state_dict(torch.load(args.pretrained, map_location=dev))
        results["pretrain"] = {"loaded": args.pretrained}
    else:
        opt = make_optimizer("adamw", model, args.pretrain_lr, args.backend)
        results["pretrain"] = runner.train(model, opt, "pretrain", args.pretrain_steps, "pretrain AdamW")
        del opt
        if args.save_pretrained:
            torch.save(model.state_dict(), args.save_pretrained)
    if args.deterministic == "pretrain":
        runner.set_deterministic(False)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results["pretrained_checksum"] = weights_checksum(start)
    results["pretrained_eval_loss_on_finetune_corpus"] = runner.evaluate(model, "finetune")

    def save():
        results["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:400] for w in caught})
        return write_results(args, results)

    for name in args.optimizers.split(",") if args.finetune_steps > 0 else ():
        results["finetune"][name] = finetune(runner, model, start, name, args.finetune_steps)
        if runner.cuda:
            results.setdefault("peak_gpu_memory_gib", {})[name] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        save()  # after every run: a cut-off run keeps what it finished

    base = adamw_baseline(results["finetune"])
    if base:
        for name, r in results["finetune"].items():
            if "skipped" in r:
                continue
            r["eval_loss_vs_adamw"] = r["final_eval_loss"] / base["final_eval_loss"]
            r["within_2pct_of_adamw"] = bool(r["eval_loss_vs_adamw"] <= 1.02)
    path, png = save()
    summarize(results)
    print(f"\nresults: {path}" + (f"\nplot:    {png}" if png else ""))
    return results


if __name__ == "__main__":
    main()
