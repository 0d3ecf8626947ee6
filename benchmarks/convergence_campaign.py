"""The regime table: where MicroAdam is close to AdamW, where it trails, and what buys quality.

    OUT=dir bash benchmarks/convergence_campaign.sh          # one H100, about 9 minutes
    python benchmarks/convergence_campaign.py --tiny         # CPU: the same plan in miniature

A 26 M byte-level Llama (examples/common.py, size 25m) is pre-trained with AdamW on Python
sources twice from one initialisation: a well-trained start (a warm-up + cosine schedule of
--pretrain-steps, then steps at its final LR until the held-out loss improves by less than 1%
over the last 20% of all steps, or --pretrain-cap) and a weakly trained one (--weak-steps).
Each start is fine-tuned on C/C++ headers with pure bf16 weights and with fp32 weights under
bf16 autocast: four regimes, every run on the same batches and schedule. In each regime:

  1. AdamW and our MicroAdam (nearest EF) over the LR grid (--lrs, a factor 2 apart);
  2. ours with stochastic EF at ours' best LR, and the authors' MicroAdam (bf16 regimes;
     at every grid LR from the well-trained start, at ours' best from the weak one), and
     ours with the authors' top-k block (sized by their code to the GPU) at ours' best LR;
  3. alpha (--alphas) at ours' best LR in the weak regimes, where it is meant to help;
  4. where a best LR lies at an edge of its grid, the next LR beyond it (twice at most);
  5. the quality-memory dial (DIAL) at ours' best LR, well-trained start, fp32 weights.

With --deadline-s, the fine-tunes are shortened (fit_steps) where the plan at the
pre-training's pace would not fit, and a run that would still end past the deadline is
recorded as skipped.

AdamW goes first, so that the kernel builds started beside this process (the .sh) end
meanwhile. Writes, under --out:
campaign.json (every run with its held-out curve, the starts, the tables), campaign.md (the
tables), campaign_regimes.png (held-out loss per regime) and campaign_dial.png (loss gap
against optimizer bytes per parameter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
import warnings

import torch

import convergence
from examples_import import examples_module

HERE = os.path.dirname(os.path.abspath(__file__))
common = examples_module("common")

REGIMES = (("bf16", "well"), ("fp32", "well"), ("fp32", "weak"), ("bf16", "weak"))
DIAL = ("microadam/quant_block=64", "microadam/density=0.02", "microadam/m=20", "microadam/density=0.05")
# Seconds per step before a kind has run, as multiples of the pre-training's (AdamW, fp32).
PACE_GUESS = {"adamw": 1.0, "microadam": 1.3, "microadam_sr": 1.3, "ista": 2.0}
# Runs of the plan by kind, two LR-edge steps included (fit_steps sizes the fine-tunes for them).
PLANNED = {"adamw": 14, "microadam": 12 + 2 + 1 + 3 + len(DIAL), "microadam_sr": 4, "ista": 4}
TINY = dict(size="tiny", batch=4, seq_len=64, pretrain_steps=40, pretrain_cap=60, weak_steps=8,
            finetune_steps=16, eval_every=8, eval_windows=8, max_tokens=300_000, lrs="1e-3,2e-3,4e-3",
            alphas="0.1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU run of the same plan: " + json.dumps(TINY))
    ap.add_argument("--size", default="25m", choices=tuple(common.SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pretrain-steps", type=int, default=2000, help="the well-trained start's cosine schedule")
    ap.add_argument("--pretrain-cap", type=int, default=4000, help="its steps at most, the tail included")
    ap.add_argument("--weak-steps", type=int, default=300, help="the weakly trained start's schedule")
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3", help="the fine-tuning LR grid, every optimizer")
    ap.add_argument("--alphas", default="0.01,0.1")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16_000_000, help="train tokens read per corpus")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="skip runs that would end later (0: none)")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "cuda"))
    ap.add_argument("--ista-src", default=None, help="see benchmarks/authors_microadam.py")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "convergence"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            if k == "size" or getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.lrs = sorted(float(x) for x in args.lrs.split(","))
    args.alphas = [float(x) for x in args.alphas.split(",") if x]
    return args


# -- the plan's arithmetic (pure functions of finished rows) -----------------------------

def done(row: dict | None) -> bool:
    return bool(row) and "final_eval_loss" in row and math.isfinite(row["final_eval_loss"])


def best_lr(rows: dict[float, dict]) -> float | None:
    """The LR of the lowest final held-out loss among finished rows (None: none finished)."""
    ok = {lr: r["final_eval_loss"] for lr, r in rows.items() if done(r)}
    return min(ok, key=ok.get) if ok else None


def beyond_edge(rows: dict[float, dict]) -> float | None:
    """The LR to try next when the best finished LR is the smallest or largest tried (x/2 or
    x2), else None."""
    lr = best_lr(rows)
    tried = sorted(rows)
    if lr is None or len(tried) < 2:
        return None
    return lr / 2 if lr == tried[0] else lr * 2 if lr == tried[-1] else None


def last_fifth_gain(curve: list[dict]) -> float | None:
    """Relative held-out improvement over the last 20% of the steps: (L(0.8 T) - L(T)) / L(0.8 T),
    L(0.8 T) read at the last evaluation at or before step 0.8 T."""
    ev = [(r["step"], r["eval_loss"]) for r in curve if "eval_loss" in r]
    if len(ev) < 2:
        return None
    end_step, end = ev[-1]
    before = [loss for step, loss in ev if step <= 0.8 * end_step]
    return (before[-1] - end) / before[-1] if before else None


def fitted_steps(steps: int, eval_every: int, seconds: float, pace: float, floor: int = 100) -> int:
    """Fine-tuning steps for the PLANNED runs to fit in `seconds` at `pace` seconds per
    pre-training step (PACE_GUESS per kind, 10% for evaluations): `steps` where they fit,
    else fewer, a multiple of eval_every, but not below `floor` (nor above `steps`)."""
    per_step = sum(n * PACE_GUESS[k] * pace * 1.1 for k, n in PLANNED.items())
    fit = int(seconds / per_step) // eval_every * eval_every
    return min(steps, max(floor, fit))


def their_topk_block(rows: dict[float, dict]) -> int | None:
    """The authors' top-k block in these rows (recorded per run), if it is one ours can take."""
    blocks = {r["authors_topk_block"] for r in rows.values() if done(r)}
    return next((b for b in blocks if b <= 32768), None)


def gap(row: dict | None, base: dict | None) -> float | None:
    """Final held-out loss relative to the base row's, minus 1 (0.05: 5% higher)."""
    if not (done(row) and done(base)):
        return None
    return row["final_eval_loss"] / base["final_eval_loss"] - 1


# -- the campaign ----------------------------------------------------------------------------

class Campaign:
    """Runs and records the plan (see the module docstring)."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.cargs = convergence.parse_args(["--size", args.size, "--optimizers", "adamw"])
        for k in ("batch", "seq_len", "eval_every", "eval_windows", "max_tokens", "backend", "ista_src",
                  "no_progress"):
            setattr(self.cargs, k, getattr(args, k))
        self.runner = convergence.Runner(self.cargs)
        self.model = common.build_model(None, args.size, self.runner.tok.vocab_size, seed=self.cargs.seed,
                                        max_len=max(2048, args.seq_len)).to(self.runner.device)
        self.init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.starts: dict[str, dict] = {}
        self.pace: dict[str, float] = {}
        self.results = {"args": {k: v for k, v in vars(args).items()}, "params": self.n_params,
                        "device": torch.cuda.get_device_name() if self.runner.cuda else "cpu",
                        "torch": torch.__version__, "finetune_corpus": self.cargs.finetune_corpus,
                        "pretrain_corpus": self.cargs.pretrain_corpus, "starts": {}, "runs": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        self.results["elapsed_s"] = self.elapsed()
        with open(os.path.join(self.args.out, "campaign.json"), "w") as f:
            json.dump(self.results, f, indent=1)

    # -- starts --------------------------------------------------------------------------
    def pretrain(self, kind: str) -> None:
        """The well-trained or weak start, fp32 weights, AdamW; kept in memory for every run."""
        a, model = self.args, self.model
        model.to(torch.float32)
        model.load_state_dict(self.init)
        opt = convergence.make_optimizer("adamw", model, self.cargs.pretrain_lr, a.backend)
        steps = a.pretrain_steps if kind == "well" else a.weak_steps
        run = self.runner.train(model, opt, "pretrain", steps, f"pretrain {kind}")
        self.pace["pretrain"] = run["seconds_per_step"]
        curve, total = run["curve"], steps
        if kind == "well":
            # At the schedule's final LR in chunks of a tenth, until the last fifth gains < 1%.
            chunk = max(1, steps // 10)
            while (last_fifth_gain(curve) or 0.0) >= 0.01 and total + chunk <= a.pretrain_cap:
                tail = self.runner.train(model, opt, "pretrain", chunk, "pretrain tail", first=total + 1,
                                         lr_at=lambda step: common.lr_factor(steps, 1, steps))
                curve, total = curve + tail["curve"], total + chunk
        gain = last_fifth_gain(curve)
        self.starts[kind] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.results["starts"][kind] = {
            "steps": total, "schedule_steps": steps, "last_fifth_gain": gain,
            "plateau": gain is not None and gain < 0.01,
            "pretrain_eval_loss": curve[-1]["eval_loss"],
            "eval_loss_on_finetune_corpus": self.runner.evaluate(model, "finetune"),
            "checksum": convergence.weights_checksum(self.starts[kind]),
            "curve": [r for r in curve if "eval_loss" in r], "seconds": time.monotonic() - self.t0}
        del opt
        self.save()

    # -- runs ----------------------------------------------------------------------------
    def run(self, regime: tuple[str, str], name: str, lr: float) -> dict:
        """One fine-tuning row (cached by regime, name and LR)."""
        weights, start = regime
        key = f"{weights}/{start}/{name}@{lr:g}"
        rows = self.results["runs"]
        if key in rows:
            return rows[key]
        kind = name.split("/")[0]
        pace = self.pace.get(kind, PACE_GUESS[kind] * self.pace.get("pretrain", 0.0))
        cost = pace * self.args.finetune_steps * 1.1  # and its evaluations
        if self.args.deadline_s and self.elapsed() + cost > self.args.deadline_s:
            row = {"label": convergence.optimizer_spec(name)["label"], "skipped": "deadline"}
        else:
            self.cargs.weights = weights
            try:
                row = convergence.finetune(self.runner, self.model, self.starts[start], name,
                                           self.args.finetune_steps, lr=lr)
            except Exception as exc:  # one failed row (e.g. the authors' kernels) ends no campaign
                traceback.print_exc()
                row = {"label": convergence.optimizer_spec(name)["label"], "skipped": f"failed: {exc!r}"[:400]}
            if done(row):
                self.pace[kind] = row["seconds_per_step"]
                row["curve"] = [r for r in row["curve"] if "eval_loss" in r or r["step"] % 10 == 0]
            if self.runner.cuda:
                row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        row.update(weights=weights, start=start, name=name, lr=lr)
        rows[key] = row
        print(f"[{self.elapsed():6.0f} s] {key}: "
              + (f"{row['final_eval_loss']:.4f}" if done(row) else f"skipped ({row.get('skipped')})"), flush=True)
        self.save()
        return row

    def grid(self, regime, name: str) -> dict[float, dict]:
        """Every row of `name` in `regime` so far, by LR."""
        w, s = regime
        return {r["lr"]: r for r in self.results["runs"].values()
                if (r["weights"], r["start"], r["name"]) == (w, s, name)}

    def best(self, regime, name: str) -> tuple[float | None, dict | None]:
        rows = self.grid(regime, name)
        lr = best_lr(rows)
        return lr, rows.get(lr)

    def fit_steps(self) -> None:
        """With a deadline: fewer fine-tuning steps where the plan would not fit (fitted_steps)."""
        a = self.args
        if not a.deadline_s:
            return
        steps = fitted_steps(a.finetune_steps, a.eval_every, a.deadline_s - self.elapsed(), self.pace["pretrain"])
        if steps != a.finetune_steps:
            print(f"fine-tuning steps {a.finetune_steps} -> {steps}: the plan fits before the deadline", flush=True)
        self.results["finetune_steps"] = a.finetune_steps = steps

    def plan(self) -> None:
        a = self.args
        self.pretrain("well")
        self.pretrain("weak")
        self.fit_steps()
        for name in ("adamw", "microadam"):
            for regime in REGIMES:
                for lr in a.lrs:
                    self.run(regime, name, lr)
        for regime in REGIMES:
            lr = self.best(regime, "microadam")[0] or a.lrs[len(a.lrs) // 2]
            self.run(regime, "microadam_sr", lr)
            if regime[0] == "bf16":
                for ista_lr in a.lrs if regime[1] == "well" else [lr]:
                    self.run(regime, "ista", ista_lr)
                if regime[1] == "well":  # ours with the authors' top-k block (theirs is sized to the GPU)
                    block = their_topk_block(self.grid(regime, "ista"))
                    if block:
                        self.run(regime, f"microadam/topk_block={block}", lr)
        for regime in REGIMES:
            if regime[1] == "weak":
                lr = self.best(regime, "microadam")[0] or a.lrs[len(a.lrs) // 2]
                for alpha in a.alphas if regime[0] == "fp32" else a.alphas[-1:]:
                    self.run(regime, f"microadam/alpha={alpha:g}", lr)
        for _ in range(2):  # twice at most: a factor of 4 beyond the grid
            for regime in REGIMES:
                for name in ("adamw", "microadam"):
                    nxt = beyond_edge(self.grid(regime, name))
                    if nxt is not None:
                        self.run(regime, name, nxt)
        regime = ("fp32", "well")
        lr = self.best(regime, "microadam")[0] or a.lrs[len(a.lrs) // 2]
        for name in DIAL:
            self.run(regime, name, lr)


def main(argv=None) -> dict:
    import convergence_report  # imports this module's arithmetic
    args = parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        camp = Campaign(args)
        print(f"model {args.size}: {camp.n_params / 1e6:.1f} M params on {camp.results['device']}", flush=True)
        camp.plan()
        # Asked after the runs: on a GPU the first ask waits for the kernels' build, which the
        # AdamW runs overlap (convergence_campaign.sh starts it beside this process).
        camp.results["microadam_backend"] = convergence.select_backend(args.backend, camp.runner.device)[0]
        camp.results["tables"] = t = convergence_report.tables(camp)
        camp.results["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:400] for w in caught})
    camp.save()
    md = convergence_report.markdown(camp, t)
    with open(os.path.join(args.out, "campaign.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    for path in convergence_report.plots(camp, t):
        print("plot:", path)
    print(f"done in {camp.elapsed():.0f} s")
    return camp.results


if __name__ == "__main__":
    main()
