"""The regime table: where MicroAdam is close to AdamW, where it trails, and what buys quality.

    OUT=dir DEADLINE=540 bash benchmarks/convergence_campaign.sh [arguments]   # one GPU
    python benchmarks/convergence_campaign.py --tiny                          # CPU: the plan in miniature

A byte-level Llama (examples/common.py, --size) is pre-trained with AdamW on Python sources
twice from one initialisation: a well-trained start (a warm-up + cosine schedule of
--pretrain-steps at --pretrain-batch sequences, then steps at its final LR, a tenth of the
schedule at a time, until the held-out loss improves by less than 1% over the last 20% of
all steps (the plateau), --pretrain-cap steps or --pretrain-share of the deadline) and a
weakly trained one (--weak-steps at the fine-tuning batch). Each start is fine-tuned on
C/C++ headers with pure bf16 weights and with fp32 weights under bf16 autocast: up to four
regimes (--regimes), every run on the same batches and schedule. In each regime:

  1. AdamW and our MicroAdam (nearest EF) over the LR grid (--lrs, a factor 2 apart); where
     a best LR lies at an edge of its grid, the next LR beyond it (twice at most);
  2. at ours' best LR: ours with stochastic EF; alpha (--alphas) in the weak regimes, where
     it is meant to help; the authors' MicroAdam in the bf16 regimes (at every grid LR from
     the well-trained start, at ours' best from the weak one) and ours with the authors'
     top-k block (sized by their code to the GPU);
  3. the quality-memory dial (--dial, in --dial-regime): each setting at ours' best LR times
     each of --dial-lr-factors (1 and 2); a setting counts with its best.

A run starts once what it depends on has finished (ours' best LR is final once its grid and
edge steps are). Independent runs go to --workers processes sharing the GPU
(convergence_workers.py): at these sizes a step is bound by the host, so runs side by side
fill the GPU. The runs and their results are those of --workers 1: each run is seeded, sees
the same batches and depends on finished rows only.

With --deadline-s, a probe times AdamW and MicroAdam steps with every worker busy (AdamW
alone while our kernels still build), the fine-tunes are shortened (fitted_steps) where the
plan would not fit at that pace, and a run that would still end past the deadline is
recorded as skipped; one still running GRACE_S after it is cut off. When time runs short,
what goes first: the well-trained start's grids, the weak start's grids, the dial,
stochastic EF and the authors', then the top-k block and alpha. Kernel builds started beside this process (the .sh) end meanwhile:
a run that needs one waits for it (convergence_workers.Gate).

Writes, under --out (names with _TAG after "campaign" given --tag): campaign.json (every
run with its held-out curve, the starts, the probe, the tables), campaign.md (the tables),
campaign_regimes.png (held-out loss per regime) and campaign_dial.png (loss gap against
optimizer bytes per parameter).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import shutil
import tempfile
import time
import warnings

import torch

import convergence
import convergence_workers as workers
from convergence_workers import kind
from examples_import import examples_module

HERE = os.path.dirname(os.path.abspath(__file__))
common = examples_module("common")

REGIMES = (("bf16", "well"), ("fp32", "well"), ("fp32", "weak"), ("bf16", "weak"))
# The quality-memory dial: density and window (m) traded for state bytes, then the knobs
# that cost no bytes or few (stochastic EF, a finer EF quantization block, alpha).
DIAL = ("microadam/density=0.02", "microadam/density=0.05", "microadam/density=0.1",
        "microadam/m=5/density=0.02", "microadam/m=5/density=0.05", "microadam/m=5/density=0.1",
        "microadam/m=3/density=0.1", "microadam/m=3/density=0.2",
        "microadam_sr", "microadam/quant_block=64", "microadam/alpha=0.1")
DIAL_LR_FACTORS = "1,2"  # times ours' best LR (--dial-lr-factors)
EDGE_STEPS = 2  # LRs tried beyond a grid's edge, at most (a factor 4)
# Seconds per step before a kind has run, as multiples of AdamW's (or of the pre-training's).
PACE_GUESS = {"adamw": 1.0, "microadam": 1.3, "microadam_sr": 1.3, "ista": 2.0}
GRACE_S = 10.0  # a run still going this long after the deadline is cut off
TINY = dict(size="tiny", batch=4, seq_len=64, pretrain_steps=40, pretrain_cap=60, weak_steps=8,
            finetune_steps=16, eval_every=8, eval_windows=8, max_tokens=300_000, lrs="1e-3,2e-3,4e-3",
            alphas="0.1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU run of the same plan: " + json.dumps(TINY))
    ap.add_argument("--size", default="25m", choices=tuple(common.SIZES))
    ap.add_argument("--batch", type=int, default=16, help="sequences per fine-tuning step (and the weak start's)")
    ap.add_argument("--pretrain-batch", type=int, default=None,
                    help="sequences per step of the well-trained start (default: --batch)")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3, help="peak LR of both starts")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pretrain-steps", type=int, default=2000, help="the well-trained start's cosine schedule")
    ap.add_argument("--pretrain-cap", type=int, default=4000, help="its steps at most, the tail included")
    ap.add_argument("--pretrain-share", type=float, default=0.5,
                    help="with --deadline-s: no tail step of the well-trained start past this share of it")
    ap.add_argument("--weak-steps", type=int, default=300, help="the weakly trained start's schedule")
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--finetune-seed", type=int, default=0,
                    help="the fine-tuning batches' seed; the starts keep theirs, so a second value repeats "
                         "every row from the same starts on other data")
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3", help="the fine-tuning LR grid, every optimizer")
    ap.add_argument("--alphas", default="0.01,0.1")
    ap.add_argument("--regimes", default=",".join(f"{w}/{s}" for w, s in REGIMES),
                    help="weights/start pairs: weights bf16 or fp32, start well or weak")
    ap.add_argument("--dial", default=",".join(DIAL),
                    help="the dial's settings: microadam or microadam_sr entries of convergence.py, without lr")
    ap.add_argument("--dial-regime", default="fp32/well", help="the regime of the dial (one of --regimes)")
    ap.add_argument("--dial-lr-factors", default=DIAL_LR_FACTORS,
                    help="the dial's LRs, as multiples of ours' best LR in its regime")
    ap.add_argument("--starts", default=None,
                    help="a folder keeping the starts: each found there (START.pt and its record in starts.json, "
                         "made by an earlier run with the same --size and --seq-len) is loaded instead of "
                         "pre-trained; each pre-trained is saved there")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16_000_000, help="train tokens read per corpus")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="skip runs that would end later (0: none)")
    ap.add_argument("--workers", type=int, default=None,
                    help="fine-tuning processes sharing the device (default: min(8, CPUs) with CUDA, else 1; "
                         "1: in this process)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per fine-tuning process (default: CPUs / (workers + 1), at least 1; "
                         "torch's default with 1 worker)")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "cuda"))
    ap.add_argument("--ista-src", default=None, help="see benchmarks/authors_microadam.py")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "convergence"))
    ap.add_argument("--tag", default="", help="file names: campaign_TAG.json, ... (default: campaign.json, ...)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            if k == "size" or getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.lrs = sorted(float(x) for x in args.lrs.split(","))
    args.alphas = [float(x) for x in args.alphas.split(",") if x]
    regimes = []
    for r in args.regimes.split(","):
        if tuple(r.split("/")) not in REGIMES:
            ap.error(f"--regimes: {r!r} is not one of {', '.join(f'{w}/{s}' for w, s in REGIMES)}")
        regimes.append(tuple(r.split("/")))
    args.regimes = list(dict.fromkeys(regimes))
    if tuple(args.dial_regime.split("/")) not in args.regimes:
        ap.error(f"--dial-regime: {args.dial_regime!r} is not one of --regimes "
                 f"({', '.join(map('/'.join, args.regimes))})")
    args.dial_regime = tuple(args.dial_regime.split("/"))
    args.dial = [d for d in args.dial.split(",") if d]
    try:
        args.dial_lr_factors = sorted({float(x) for x in args.dial_lr_factors.split(",")})
    except ValueError:
        ap.error(f"--dial-lr-factors: {args.dial_lr_factors!r} is not a list of numbers")
    if not args.dial_lr_factors or min(args.dial_lr_factors) <= 0:
        ap.error(f"--dial-lr-factors: {args.dial_lr_factors} must hold positive numbers")
    for d in args.dial:
        try:
            spec = convergence.optimizer_spec(d)
        except ValueError as e:
            ap.error(f"--dial: {e}")
        if kind(d) not in ("microadam", "microadam_sr") or "lr" in spec:
            ap.error(f"--dial: {d!r} is not a microadam or microadam_sr entry without lr (the dial sets the LR)")
    cuda = torch.cuda.is_available()
    args.workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1) if cuda else 1
    if args.workers < 1:
        ap.error(f"--workers: {args.workers} is below 1")
    if args.threads is None:
        cpus = os.cpu_count() or 1
        args.threads = torch.get_num_threads() if args.workers == 1 else max(1, cpus // (args.workers + 1))
    if args.threads < 1:
        ap.error(f"--threads: {args.threads} is below 1")
    if not 0 < args.pretrain_share <= 1:
        ap.error(f"--pretrain-share: {args.pretrain_share} is not in (0, 1]")
    args.pretrain_batch = args.pretrain_batch or args.batch
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


def plan_counts(regimes, n_lrs: int, alphas: int, dial, lr_factors) -> dict[str, int]:
    """Runs of the plan by kind, with EDGE_STEPS runs beyond an edge per grid optimizer (the
    dial's microadam_sr at ours' best LR is the regime's stochastic-EF row)."""
    n = dict.fromkeys(PACE_GUESS, 0)
    n["adamw"] = n["microadam"] = EDGE_STEPS
    for w, s in regimes:
        n["adamw"] += n_lrs
        n["microadam"] += n_lrs + (w == "bf16" and s == "well") + (s == "weak") * (alphas if w == "fp32" else
                                                                                    min(1, alphas))
        n["microadam_sr"] += 1
        n["ista"] += (n_lrs if s == "well" else 1) if w == "bf16" else 0
    for name in dial:
        n[kind(name)] += len(lr_factors) - (name == "microadam_sr" and 1 in lr_factors)
    return n


def side_by_side(runs: float, workers: int, alone: float) -> float:
    """A run's pace with `runs` side by side, relative to its pace with `workers`: a run alone
    takes `alone` of that (bound by the host); more share the GPU's time, up to `workers`."""
    return max(alone, min(runs, workers) / workers)


def fitted_steps(steps: int, eval_every: int, seconds: float, paces: dict[str, float], counts: dict[str, int],
                 workers: int, alone: float = 1.0, floor: int = 100) -> int:
    """Fine-tuning steps for the plan's runs (`counts` by kind) to fit in `seconds`, at `paces`
    (seconds per step, evaluations included, with `workers` runs side by side), plus two runs
    of the slowest kind alone (side_by_side) for runs that wait for others: `steps` where they
    fit, else fewer, a multiple of eval_every, but not below `floor` (nor above `steps`)."""
    used = [k for k, n in counts.items() if n]
    per_step = (sum(counts[k] * paces[k] for k in used) / workers
                + 2 * max(paces[k] for k in used) * side_by_side(1, workers, alone))
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


def save_state(state: dict, path: str) -> None:
    """A start's weights, on the CPU (any process, with or without CUDA, can load them)."""
    torch.save({k: v.cpu() for k, v in state.items()}, path)


# -- the campaign ----------------------------------------------------------------------------

class Campaign:
    """Runs and records the plan (see the module docstring)."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.cargs = convergence.parse_args(["--size", args.size, "--optimizers", "adamw"])
        for k in ("batch", "seq_len", "eval_every", "eval_windows", "max_tokens", "backend", "ista_src",
                  "no_progress", "pretrain_lr", "finetune_seed"):
            setattr(self.cargs, k, getattr(args, k))
        cuda = torch.cuda.is_available()
        self.gate = workers.Gate(args.backend, torch.device("cuda" if cuda else "cpu"), args.ista_src)
        # The workers set up (imports, corpus, model, CUDA context) while this process pre-trains.
        self.pool = workers.Workers(args.workers, self.cargs, args.threads) if args.workers > 1 else None
        self.runner, self.model = workers.build(self.cargs, torch.get_num_threads(), ("pretrain", "finetune"))
        self.init = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.starts: dict[str, dict] = {}
        self.start_paths: dict[str, str] = {}
        self.tmp: str | None = None
        # Seconds per step by kind with `width` runs side by side; a run alone takes `alone` of it.
        self.pace: dict[str, float] = {}
        self.width, self.alone = args.workers, 1.0
        self.load = [time.monotonic(), 0.0, 0]  # when, runs x seconds so far, runs in flight since
        self.since: dict[str, tuple[float, float]] = {}  # by run in flight: account() at its start
        self.warnings: set[str] = set()
        self.results = {"args": {k: v for k, v in vars(args).items()}, "params": self.n_params,
                        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                        "finetune_corpus": self.cargs.finetune_corpus, "pretrain_corpus": self.cargs.pretrain_corpus,
                        "workers": args.workers, "threads": args.threads, "finetune_steps": args.finetune_steps,
                        "starts": {}, "runs": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def path(self, suffix: str) -> str:
        """--out/campaign[_TAG]SUFFIX."""
        return os.path.join(self.args.out, "campaign" + (f"_{self.args.tag}" if self.args.tag else "") + suffix)

    def past(self, seconds: float = 0.0) -> bool:
        """Whether the deadline (if any) is less than `seconds` away."""
        return bool(self.args.deadline_s) and self.elapsed() + seconds > self.args.deadline_s

    def save(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        self.results["elapsed_s"] = self.elapsed()
        with open(self.path(".json"), "w") as f:
            json.dump(self.results, f, indent=1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- starts --------------------------------------------------------------------------
    def pretrain(self, start: str) -> None:
        """The well-trained or weak start, fp32 weights, AdamW."""
        a, model = self.args, self.model
        convergence.cast_weights(model, torch.float32)
        model.load_state_dict(self.init)
        opt = convergence.make_optimizer("adamw", model, a.pretrain_lr, a.backend)
        steps = a.pretrain_steps if start == "well" else a.weak_steps
        self.cargs.batch = a.pretrain_batch if start == "well" else a.batch
        try:
            run = self.runner.train(model, opt, "pretrain", steps, f"pretrain {start}")
            curve, total, stopped = run["curve"], steps, "schedule"
            self.pace["pretrain"] = pace = run["seconds_per_step"]
            chunk = max(1, steps // 10)
            while start == "well":  # at the schedule's final LR, until the last fifth gains < 1%
                gain = last_fifth_gain(curve)
                stopped = ("too few evaluations" if gain is None else "plateau" if gain < 0.01 else
                           "cap" if total + chunk > a.pretrain_cap else
                           "deadline share" if self.past(chunk * pace + (1 - a.pretrain_share) * a.deadline_s)
                           else None)
                if stopped:
                    break
                tail = self.runner.train(model, opt, "pretrain", chunk, "pretrain tail", first=total + 1,
                                         lr_at=lambda step: common.lr_factor(steps, 1, steps))
                curve, total, pace = curve + tail["curve"], total + chunk, tail["seconds_per_step"]
        finally:
            self.cargs.batch = a.batch
        gain = last_fifth_gain(curve)
        self.starts[start] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.results["starts"][start] = {
            "steps": total, "schedule_steps": steps, "batch": a.pretrain_batch if start == "well" else a.batch,
            "last_fifth_gain": gain, "plateau": gain is not None and gain < 0.01, "stopped": stopped,
            "seconds_per_step": run["seconds_per_step"], "pretrain_eval_loss": curve[-1]["eval_loss"],
            "eval_loss_on_finetune_corpus": self.runner.evaluate(model, "finetune"),
            "checksum": convergence.weights_checksum(self.starts[start]),
            "curve": [r for r in curve if "eval_loss" in r], "seconds": self.elapsed()}
        del opt
        self.save()

    def load_start(self, start: str) -> bool:
        """The start from --starts, if kept there (its record must match this model)."""
        folder = self.args.starts
        path = folder and os.path.join(folder, f"{start}.pt")
        if not (path and os.path.exists(path)):
            return False
        with open(os.path.join(folder, "starts.json")) as f:
            record = json.load(f)[start]
        made = {k: record.get(k) for k in ("size", "seq_len")}
        if made != {"size": self.args.size, "seq_len": self.args.seq_len}:
            raise SystemExit(f"--starts: {path} was made with {made}, not --size {self.args.size} "
                             f"--seq-len {self.args.seq_len}")
        state = torch.load(path, map_location="cpu")
        if convergence.weights_checksum(state) != record["checksum"]:
            raise SystemExit(f"--starts: {path} does not hold the weights its record names (checksum "
                             f"{record['checksum']})")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise SystemExit(f"--starts: {path} is not a start of --size {self.args.size}: {e}") from None
        self.starts[start], self.start_paths[start] = state, path
        self.results["starts"][start] = {**record, "loaded": path}
        print(f"[{self.elapsed():6.0f} s] {start} start loaded from {path}", flush=True)
        return True

    def keep_start(self, start: str) -> None:
        """Saves a start just pre-trained into --starts (its weights, and its record in starts.json)."""
        folder = self.args.starts
        if not folder:
            return
        os.makedirs(folder, exist_ok=True)
        self.start_paths[start] = os.path.join(folder, f"{start}.pt")
        save_state(self.starts[start], self.start_paths[start])
        index = os.path.join(folder, "starts.json")
        records = {}
        if os.path.exists(index):
            with open(index) as f:
                records = json.load(f)
        records[start] = {**self.results["starts"][start], "size": self.args.size, "seq_len": self.args.seq_len,
                          "pretrain_corpus": self.cargs.pretrain_corpus, "max_tokens": self.args.max_tokens}
        with open(index, "w") as f:
            json.dump(records, f, indent=1)

    def fine_tuning_pool(self):
        """Inline over this process's model, or the workers, given the starts through files
        (those of --starts, else a temporary folder's)."""
        if self.pool is None:
            return workers.Inline(self.runner, self.model, self.starts, self.args.threads)
        for name, state in self.starts.items():
            if name not in self.start_paths:
                self.tmp = self.tmp or tempfile.mkdtemp(prefix="campaign_starts_")
                self.start_paths[name] = os.path.join(self.tmp, f"{name}.pt")
                save_state(state, self.start_paths[name])
        self.starts.clear()
        self.model = self.init = None  # the workers have their own
        if self.runner.cuda:
            torch.cuda.empty_cache()
        return self.pool

    # -- runs ----------------------------------------------------------------------------
    def job(self, regime: tuple[str, str], name: str, lr: float, **extra) -> dict:
        w, s = regime
        return {"key": f"{w}/{s}/{name}@{lr:g}", "weights": w, "start": s, "name": name, "lr": lr,
                "steps": self.args.finetune_steps, "backend": self.gate.backend or self.args.backend,
                "start_path": self.start_paths.get(s), **extra}

    def pace_of(self, k: str, runs: float | None = None) -> float:
        """Seconds per step of kind k with `runs` side by side (default: width), measured (probe
        or a finished run) or guessed."""
        pace = self.pace.get(k) or PACE_GUESS[k] * self.pace.get("adamw", self.pace.get("pretrain", 0.0))
        return pace * side_by_side(self.width if runs is None else runs, self.width, self.alone)

    def account(self, pool) -> tuple[float, float]:
        """(now, runs x seconds in flight so far), counting pool.busy() runs from now on."""
        now = time.monotonic()
        self.load[1] += self.load[2] * (now - self.load[0])
        self.load[0], self.load[2] = now, pool.busy()
        return now, self.load[1]

    def submit(self, pool, job: dict) -> None:
        pool.submit(job)
        self.since[job["key"]] = self.account(pool)

    def collect(self, pool, timeout: float) -> None:
        """Records the runs that end within `timeout`, and their pace as if width ran side by side."""
        rows = pool.collect(timeout)
        now, area = self.account(pool)
        for job, row in rows:
            t0, area0 = self.since.pop(job["key"], (now, area))
            if done(row) and now > t0:
                runs = max(1.0, (area - area0) / (now - t0))  # side by side on average while it ran
                self.pace[kind(job["name"])] = row["seconds_per_step"] / side_by_side(runs, self.width, self.alone)
            self.record(job, row)

    def record(self, job: dict, row: dict) -> None:
        row.pop("failed", None)
        self.warnings.update(row.pop("warnings", ()))
        row.update(weights=job["weights"], start=job["start"], name=job["name"], lr=job["lr"])
        self.results["runs"][job["key"]] = row
        print(f"[{self.elapsed():6.0f} s] {job['key']}: "
              + (f"{row['final_eval_loss']:.4f}" if done(row) else f"skipped ({row.get('skipped')})"), flush=True)
        self.save()

    def grid(self, regime, name: str) -> dict[float, dict]:
        """Every row of `name` in `regime` so far, by LR."""
        w, s = regime
        return {r["lr"]: r for r in self.results["runs"].values()
                if (r["weights"], r["start"], r["name"]) == (w, s, name)}

    def best(self, regime, name: str) -> tuple[float | None, dict | None]:
        rows = self.grid(regime, name)
        lr = best_lr(rows)
        return lr, rows.get(lr)

    def next_edge(self, regime, name: str) -> float | None:
        """The LR beyond an edge of the grid to run next, once the grid's rows are in."""
        rows = self.grid(regime, name)
        if any(lr not in rows for lr in self.args.lrs) or len(set(rows) - set(self.args.lrs)) >= EDGE_STEPS:
            return None
        return beyond_edge(rows)

    def settled_lr(self, regime, name: str) -> float | None:
        """The grid's best LR once final (None before), the middle LR where no row finished."""
        rows = self.grid(regime, name)
        if any(lr not in rows for lr in self.args.lrs) or self.next_edge(regime, name) is not None:
            return None
        return best_lr(rows) or self.args.lrs[len(self.args.lrs) // 2]

    def wanted(self):
        """(priority, regime, name, lr) of every run the plan needs given the rows so far; a
        run waiting on an unfinished one is yielded by a later call."""
        a = self.args
        for regime in a.regimes:
            w, s = regime
            first = 0 if s == "well" else 1
            for name in ("adamw", "microadam"):
                for lr in a.lrs + [self.next_edge(regime, name)]:
                    if lr is not None:
                        yield first, regime, name, lr
            if regime == ("bf16", "well"):
                for lr in a.lrs:
                    yield 3, regime, "ista", lr
            lr = self.settled_lr(regime, "microadam")
            if lr is None:
                continue
            yield 3, regime, "microadam_sr", lr
            if regime == ("bf16", "weak"):
                yield 3, regime, "ista", lr
            ista = self.grid(regime, "ista")
            if regime == ("bf16", "well") and all(x in ista for x in a.lrs) and their_topk_block(ista):
                yield 4, regime, f"microadam/topk_block={their_topk_block(ista)}", lr
            if s == "weak":
                for alpha in a.alphas if w == "fp32" else a.alphas[-1:]:
                    yield 4, regime, f"microadam/alpha={alpha:g}", lr
            if regime == a.dial_regime:
                for name in a.dial:
                    for f in a.dial_lr_factors:
                        yield 2, regime, name, lr * f

    def timed(self, pool, jobs: list[dict]) -> dict[str, list[float]]:
        """Seconds per step by kind of probe jobs, as many side by side as the pool takes."""
        times: dict[str, list[float]] = {}
        while (jobs or pool.busy()) and not self.past():
            while jobs and pool.free():
                pool.submit(jobs.pop())
            for job, row in pool.collect(1.0):
                if "seconds_per_step" in row:
                    times.setdefault(kind(job["name"]), []).append(row["seconds_per_step"])
        pool.cut()  # probes still running at the deadline
        return times

    def probe(self, pool) -> None:
        """Seconds per step of AdamW and MicroAdam (AdamW alone while our kernels still build)
        with every worker busy (into pace), and of AdamW alone (alone, relative to that)."""
        a = self.args
        while not pool.ready():
            if self.past() or not pool.live():
                return
            pool.collect(0.5)
        self.width = max(1, pool.live())
        ours = not (self.gate.pending("microadam") or self.gate.refusal("microadam"))
        names = ("adamw", "microadam") if ours else ("adamw",)

        def probe(name):
            return self.job(a.dial_regime, name, a.lrs[len(a.lrs) // 2], probe=True, warm=min(5, a.eval_every),
                            steps=a.eval_every)
        alone = self.timed(pool, [probe("adamw")]) if self.width > 1 else {}
        times = self.timed(pool, [probe(names[i % len(names)]) for i in range(max(2, self.width))])
        self.pace.update({k: sum(v) / len(v) for k, v in times.items()})
        if alone and "adamw" in times:
            self.alone = min(1.0, alone["adamw"][0] / self.pace["adamw"])
        self.results["probe"] = {"runs_side_by_side": self.width, "seconds_per_step": times, "adamw_alone": alone.get(
            "adamw"), "alone_ratio": self.alone, "seconds": self.elapsed()}
        print(f"[{self.elapsed():6.0f} s] probe, {self.width} runs side by side: "
              + ", ".join(f"{k} {sum(v) / len(v):.4f} s/step" for k, v in times.items())
              + f"; a run alone at {self.alone:.2f} of that", flush=True)

    def fit_steps(self) -> None:
        """With a deadline: fewer fine-tuning steps where the plan would not fit (fitted_steps)."""
        a = self.args
        counts = plan_counts(a.regimes, len(a.lrs), len(a.alphas), a.dial, a.dial_lr_factors)
        steps = fitted_steps(a.finetune_steps, a.eval_every, a.deadline_s - self.elapsed(),
                             {k: self.pace_of(k) for k in counts}, counts, self.width, self.alone)
        if steps != a.finetune_steps:
            print(f"fine-tuning steps {a.finetune_steps} -> {steps}: the plan fits before the deadline", flush=True)
        self.results["finetune_steps"] = a.finetune_steps = steps

    def dispatch(self, queued: list, pool) -> None:
        """Queued runs to free workers by priority; one that cannot run is recorded as skipped
        (its pace: with the runs in flight and those queued side by side)."""
        while queued:
            job = queued[0][2]
            pace = self.pace_of(kind(job["name"]), min(self.width, pool.busy() + len(queued)))
            why = ("deadline" if self.past(pace * job["steps"] * 1.05) else
                   self.gate.refusal(job["name"]) or ("no worker process left" if not pool.live() else ""))
            if not why and not pool.free():
                return
            heapq.heappop(queued)
            if why:
                self.record(job, workers.skipped(job["name"], why))
            else:
                self.submit(pool, job)

    def queue(self, queued: list, seen: set) -> bool:
        """Queues the plan's runs not queued yet; returns whether some wait for a build."""
        waiting = False
        for prio, regime, name, lr in self.wanted():
            if self.gate.pending(name) and not self.past():
                waiting = True
                continue
            job = self.job(regime, name, lr)
            if job["key"] not in seen:
                seen.add(job["key"])
                heapq.heappush(queued, (prio, len(seen), job))
        return waiting

    def finetunes(self, pool) -> None:
        queued: list = []
        seen: set = set()
        while True:
            waiting = self.queue(queued, seen)
            self.dispatch(queued, pool)
            if not queued and not pool.busy():
                waiting = self.queue(queued, seen)  # rows skipped just now may let others start
                if not (queued or waiting):
                    return
                if queued:
                    continue
            self.collect(pool, 1.0)
            if self.past(-GRACE_S):
                for job, row in pool.cut():
                    self.record(job, row)

    def plan(self) -> None:
        for start in ("well", "weak")[:1 + any(s == "weak" for _, s in self.args.regimes)]:
            if not self.load_start(start):
                self.pretrain(start)
                self.keep_start(start)
        pool = self.fine_tuning_pool()
        if self.args.deadline_s:
            if not self.past():
                self.probe(pool)
            self.fit_steps()
        self.finetunes(pool)
        order = {r: i for i, r in enumerate(self.args.regimes)}
        self.results["runs"] = dict(sorted(self.results["runs"].items(), key=lambda kv: (
            order[kv[1]["weights"], kv[1]["start"]], kv[1]["name"], kv[1]["lr"])))


def main(argv=None) -> dict:
    import convergence_report  # imports this module's arithmetic
    args = parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        camp = Campaign(args)
        print(f"model {args.size}: {camp.n_params / 1e6:.1f} M params on {camp.results['device']}; "
              f"{args.workers} fine-tuning process(es), {args.threads} thread(s) each", flush=True)
        try:
            camp.plan()
        finally:
            camp.close()
        camp.results["microadam_backend"] = camp.gate.backend or camp.gate.backend_error or "not resolved"
        camp.results["tables"] = t = convergence_report.tables(camp)
    camp.results["warnings"] = sorted(camp.warnings | {f"{w.category.__name__}: {w.message}"[:400] for w in caught})
    camp.save()
    md = convergence_report.markdown(camp, t)
    with open(camp.path(".md"), "w") as f:
        f.write(md)
    print("\n" + md)
    for path in convergence_report.plots(camp, t):
        print("plot:", path)
    print(f"done in {camp.elapsed():.0f} s")
    return camp.results


if __name__ == "__main__":
    main()
