"""Where the convergence campaign's fine-tunes run: in this process, or in worker processes
that share the device (convergence_campaign.py, --workers).

At the campaign's model sizes one training step is bound by the host (Python, kernel
launches), and the GPU idles most of the time; independent runs in several processes fill
it. `Workers` spawns them (torch.multiprocessing, spawn context: CUDA does not survive a
fork); each builds its Runner and model once, loads a start's weights from the file the
campaign saved (once per start and process), and returns each run's row. `Inline` runs the
same `execute` in the calling process. A run's result depends on its job only (seeded,
batches by step, `--threads` per process), not on where or after what it ran.

`Gate` resolves, in a thread beside the pre-training, what the runs need built: our
kernels (`select_backend`) and the authors' extensions (authors_microadam.load). A worker is
given a job of such a kind only once its gate has passed: a worker then loads the finished
build (torch's extension lock makes a process wait for a build in progress), and no
worker compiles after a failed build.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
import warnings

import torch

import authors_microadam
import convergence
from examples_import import examples_module

common = examples_module("common")


def kind(name: str) -> str:
    """The optimizer of a run's name: adamw, microadam, microadam_sr or ista."""
    return name.split("/")[0]


def skipped(name: str, why: str, **extra) -> dict:
    """The row of a run of `name` that did not run or did not finish, saying why."""
    return {"label": convergence.optimizer_spec(name)["label"], "skipped": why, **extra}


def build(cargs, threads: int, phases: tuple[str, ...] = ("finetune",)):
    """(runner, model) of one process; the model is rebuilt from the seed, then each run loads a start."""
    torch.set_num_threads(threads)
    runner = convergence.Runner(cargs, phases)
    model = common.build_model(None, cargs.size, runner.tok.vocab_size, seed=cargs.seed,
                               max_len=max(2048, cargs.seq_len)).to(runner.device)
    return runner, model


def probe(runner, model, start: dict, name: str, lr: float, warm: int, steps: int) -> dict:
    """Seconds per step of `name` after `warm` steps, over `steps` steps that end on one evaluation
    (as a run's every eval_every steps do)."""
    convergence.cast_weights(model, runner.dtype)
    model.load_state_dict(start)
    opt = convergence.make_optimizer(name, model, lr, runner.args.backend)
    runner.train(model, opt, "finetune", warm, "warm-up")
    every = runner.args.eval_every
    return {"seconds_per_step": runner.train(model, opt, "finetune", steps, "probe", first=every + 1,
                                             lr_at=lambda step: 1.0)["seconds_per_step"]}


def execute(runner, model, starts: dict, job: dict) -> dict:
    """One job in this process: a fine-tuning row (convergence.finetune), or a probe's pace.

    `starts` caches the starts' weights by name, read from job["start_path"] on first use. A
    failure becomes a row {"label", "skipped": "failed: ..."} with `failed` set."""
    a = runner.args
    a.weights, a.backend = job["weights"], job["backend"]
    name = job["name"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            if job["start"] not in starts:
                starts[job["start"]] = torch.load(job["start_path"], map_location=runner.device)
            torch.manual_seed(convergence.finetune_seed(a))
            if job.get("probe"):
                row = probe(runner, model, starts[job["start"]], name, job["lr"], job["warm"], job["steps"])
            else:
                row = convergence.finetune(runner, model, starts[job["start"]], name, job["steps"], lr=job["lr"])
        except Exception as exc:  # one failed row (e.g. the authors' kernels) ends no campaign
            traceback.print_exc()
            row = skipped(name, f"failed: {exc!r}"[:400], failed=True)
    if "curve" in row:
        row["curve"] = [r for r in row["curve"] if "eval_loss" in r or r["step"] % 10 == 0]
    if caught:
        row["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:400] for w in caught})
    if runner.cuda:
        row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def worker_main(slot: int, cargs, threads: int, tasks, events) -> None:
    """A worker process: build once, then run jobs from `tasks` until None. Leaves after a
    failed run, whose CUDA context may be broken (the pool starts a fresh process)."""
    try:
        runner, model = build(cargs, threads)
    except BaseException:
        events.put((slot, "setup failed", traceback.format_exc()))
        return
    events.put((slot, "ready", None))
    starts: dict = {}
    while (job := tasks.get()) is not None:
        row = execute(runner, model, starts, job)
        events.put((slot, "row", row))
        if row.get("failed"):
            return


class Inline:
    """The pool interface (free, submit, collect, busy, live, cut, close) over this process."""

    def __init__(self, runner, model, starts: dict, threads: int):
        torch.set_num_threads(threads)
        self.runner, self.model, self.starts, self.job = runner, model, starts, None

    def ready(self) -> bool:
        return True

    def free(self) -> int:
        return int(self.job is None)

    def busy(self) -> int:
        return int(self.job is not None)

    def live(self) -> int:
        return 1

    def submit(self, job: dict) -> None:
        self.job = job

    def collect(self, timeout: float) -> list[tuple[dict, dict]]:
        """Runs the job given, if any (else waits `timeout`): [(job, row)]."""
        job, self.job = self.job, None
        if job is None:
            time.sleep(timeout)
            return []
        return [(job, execute(self.runner, self.model, self.starts, job))]

    def cut(self) -> list[tuple[dict, dict]]:
        return []

    def close(self) -> None:
        pass


class Workers:
    """`n` spawned worker processes (worker_main) behind the pool interface of Inline.

    A worker that dies, or leaves after a failed run, is replaced (n replacements at most);
    its run, if any, is returned as failed. One that fails to set up is not replaced."""

    def __init__(self, n: int, cargs, threads: int):
        self.ctx = torch.multiprocessing.get_context("spawn")
        self.cargs, self.threads, self.spares = cargs, threads, n
        self.events = self.ctx.Queue()
        self.procs: list = [None] * n
        self.tasks: list = [None] * n
        self.jobs: list[dict | None] = [None] * n
        self.up = [False] * n
        self.leaving: set[int] = set()  # workers that sent a failed run's row: they exit
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        self.tasks[i] = self.ctx.Queue()
        self.procs[i] = self.ctx.Process(target=worker_main, args=(i, self.cargs, self.threads, self.tasks[i],
                                                                   self.events), daemon=True)
        self.procs[i].start()
        self.jobs[i], self.up[i] = None, False
        self.leaving.discard(i)

    def ready(self) -> bool:
        """Whether every live worker has set up."""
        return all(self.up[i] for i, p in enumerate(self.procs) if p is not None)

    def _free(self) -> list[int]:
        return [i for i, p in enumerate(self.procs)
                if p is not None and self.up[i] and self.jobs[i] is None and i not in self.leaving]

    def free(self) -> int:
        return len(self._free())

    def busy(self) -> int:
        return sum(j is not None for j in self.jobs)

    def live(self) -> int:
        return sum(p is not None for p in self.procs)

    def submit(self, job: dict) -> None:
        i = self._free()[0]
        self.jobs[i] = job
        self.tasks[i].put(job)

    def collect(self, timeout: float) -> list[tuple[dict, dict]]:
        """Rows finished within `timeout` (at least one, unless none came): [(job, row)]."""
        # Dead processes first: what one sent before it died is in the queue by now.
        dead = [i for i, p in enumerate(self.procs) if p is not None and not p.is_alive()]
        msgs = []
        try:
            msgs.append(self.events.get(timeout=timeout))
            while True:
                msgs.append(self.events.get_nowait())
        except queue.Empty:
            pass
        out = []
        for i, what, data in msgs:
            if what == "ready":
                self.up[i] = True
            elif what == "row" and self.jobs[i] is not None:
                out.append((self.jobs[i], data))
                self.jobs[i] = None
                if data.get("failed"):
                    self.leaving.add(i)
            elif what == "setup failed":
                print(f"worker {i} failed to set up:\n{data}", flush=True)
        for i in dead:
            code, job = self.procs[i].exitcode, self.jobs[i]
            if job is not None:
                out.append((job, skipped(job["name"], f"failed: its worker process exited ({code})")))
            replace = self.up[i] and self.spares > 0
            self.procs[i], self.jobs[i] = None, None
            if replace:
                self.spares -= 1
                self._start(i)
        return out

    def cut(self) -> list[tuple[dict, dict]]:
        """Ends the workers' runs in flight: [(job, row saying so)]."""
        out = []
        for i, job in enumerate(self.jobs):
            if job is not None:
                self.procs[i].terminate()
                self.procs[i].join(5)
                self.procs[i], self.jobs[i] = None, None
                out.append((job, skipped(job["name"], "cut off at the deadline")))
        return out

    def close(self) -> None:
        """Asks every worker to leave; ends those still running 10 s later."""
        for i, p in enumerate(self.procs):
            if p is not None:
                self.tasks[i].put(None)
        end = time.monotonic() + 10
        for p in self.procs:
            if p is not None:
                p.join(max(0.0, end - time.monotonic()))
                if p.is_alive():
                    p.terminate()
                    p.join(5)


class Gate:
    """Our kernels' backend and the authors' MicroAdam, resolved in a thread (see the module
    docstring): `backend` (None while pending) and `authors` (None while pending, "" once
    loaded, else why not)."""

    def __init__(self, backend: str, device: torch.device, ista_src: str | None):
        self.backend: str | None = None
        self.backend_error = ""
        self.authors: str | None = None
        self.thread = threading.Thread(target=self._resolve, args=(backend, device, ista_src), daemon=True)
        self.thread.start()

    def _resolve(self, backend: str, device: torch.device, ista_src: str | None) -> None:
        try:
            self.backend = convergence.select_backend(backend, device)[0]
        except Exception as exc:  # backend="cuda" without kernels
            self.backend_error = str(exc)[:400]
            self.backend = ""
        try:
            authors_microadam.load(ista_src)
            self.authors = ""
        except authors_microadam.Unavailable as exc:
            self.authors = str(exc)[:400]

    def pending(self, name: str) -> bool:
        """Whether runs of `name` must wait for a build."""
        k = kind(name)
        return (self.authors is None) if k == "ista" else (k != "adamw" and self.backend is None)

    def refusal(self, name: str) -> str:
        """Why runs of `name` cannot run here ("" where they can)."""
        k = kind(name)
        if k == "ista":
            return self.authors or ""
        return "" if k == "adamw" else self.backend_error
