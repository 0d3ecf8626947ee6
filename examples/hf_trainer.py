"""Fine-tune a causal LM with the Hugging Face `Trainer` and `--deepspeed ds.json` naming MicroAdam.

    # 2 CPU processes, tiny Llama, byte tokens, Python stdlib corpus (about two minutes):
    torchrun --standalone --nproc_per_node 2 examples/hf_trainer.py \\
        --deepspeed examples/configs/ds_zero2_microadam.json --out runs/hf
    # the AdamW twin into the same folder: the table and the plot then compare both
    torchrun --standalone --nproc_per_node 2 examples/hf_trainer.py \\
        --deepspeed examples/configs/ds_zero2_adamw.json --out runs/hf
    # one process, no launcher (a world of one):
    python examples/hf_trainer.py --deepspeed examples/configs/ds_zero3_microadam.json --max_steps 50
    # GPUs, a real model and corpus (any TrainingArguments flag works):
    deepspeed --num_gpus 8 examples/hf_trainer.py --deepspeed examples/configs/ds_zero3_microadam.json \\
        --model meta-llama/Llama-3.2-1B --data my_corpus/ --seq_len 2048 --max_steps 2000

The script is an ordinary Trainer script: the optimizer comes from the JSON's
`"optimizer": {"type": "MicroAdam", ...}`, which `import microadam_dist` (below) makes
valid. Without --model the model is a small Llama (`--size`) with a byte-level
vocabulary and the corpus is --data (a corpus named in examples/common.py, such as
`python`, or a path), so the run needs no download.

The JSON's values are the run's defaults: the micro-batch, accumulation, clipping,
lr, betas, eps, weight decay, bf16 and the scheduler's length and warm-up become the
matching TrainingArguments defaults, and the JSON gets "auto" there, so a flag such as
`--learning_rate 1e-4` or `--max_steps 500` overrides the JSON instead of clashing with
it. On a CPU the JSON is adapted (and the script says so): bf16 off, `torch_adam` for
Adam/AdamW, `--use_cpu`.

Rank 0 shows the Trainer's progress bar, writes one JSON line per logged step to
OUT/LABEL.jsonl (LABEL: the JSON's file name without `ds_`) and a summary line at the
end, then prints a table of every run found in OUT (held-out loss, ratio to AdamW,
optimizer bytes/param) and writes OUT/loss_curves.png comparing them.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import common  # examples/common.py: this script's folder is first on sys.path
import microadam_dist  # noqa: F401  makes "type": "MicroAdam" valid in the DeepSpeed JSON
from microadam_dist.teardown import finish


@dataclasses.dataclass
class ScriptArguments:
    """This script's own flags; every other flag is a `transformers.TrainingArguments` field."""

    model: str | None = dataclasses.field(
        default=None, metadata={"help": "hub id or local path; default: a fresh Llama of --size"})
    size: str = dataclasses.field(default="tiny", metadata={"help": f"one of {', '.join(common.SIZES)}"})
    data: str = dataclasses.field(default="python", metadata={"help": f"{', '.join(common.CORPORA)}, or a file/folder"})
    seq_len: int = dataclasses.field(default=128, metadata={"help": "tokens per training window"})
    max_tokens: int = dataclasses.field(default=4_000_000, metadata={"help": "train tokens read"})
    eval_windows: int = dataclasses.field(default=32, metadata={"help": "held-out windows per evaluation"})
    out: str = dataclasses.field(default="runs/hf_trainer", metadata={"help": "folder for metrics and plot"})
    label: str | None = dataclasses.field(default=None, metadata={"help": "run name (default: JSON name)"})


# (JSON key, TrainingArguments field): the Trainer fills these "auto" keys from its arguments.
JSON_TO_ARGS = [
    ("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("gradient_clipping", "max_grad_norm"),
    ("optimizer.params.lr", "learning_rate"),
    ("optimizer.params.eps", "adam_epsilon"),
    ("optimizer.params.weight_decay", "weight_decay"),
    ("scheduler.params.warmup_max_lr", "learning_rate"),
    ("scheduler.params.total_num_steps", "max_steps"),
    ("scheduler.params.warmup_num_steps", "warmup_steps"),
    ("bf16.enabled", "bf16"),
    ("fp16.enabled", "fp16"),
]


def _node(cfg: dict, key: str) -> tuple[dict | None, str]:
    *path, leaf = key.split(".")
    for part in path:
        cfg = cfg.get(part)
        if not isinstance(cfg, dict):
            return None, leaf
    return cfg, leaf


def adapt_config(path: str, cuda: bool) -> tuple[dict, dict, list[str]]:
    """(JSON with "auto" where the Trainer fills it, TrainingArguments defaults taken from it, notes)."""
    with open(path) as f:
        cfg = json.load(f)
    notes = []
    if not cuda:
        notes += common.adapt_ds_config_for_cpu(cfg)
    defaults: dict = {}
    for key, field in JSON_TO_ARGS:
        node, leaf = _node(cfg, key)
        if node is None or leaf not in node:
            continue
        if node[leaf] != "auto":
            defaults.setdefault(field, node[leaf])
        node[leaf] = "auto"
    params = cfg.get("optimizer", {}).get("params", {})
    if isinstance(params.get("betas"), (list, tuple)):
        defaults["adam_beta1"], defaults["adam_beta2"] = map(float, params["betas"])
        params["betas"] = "auto"
    cfg.pop("train_batch_size", None)  # micro x accumulation x world, derived by the Trainer
    return cfg, defaults, notes


def parse_args(argv: list[str] | None, cuda: bool):
    """(ScriptArguments, TrainingArguments, JSON path, notes): the JSON's values as defaults, the
    command line on top, the adapted JSON (a dict) as TrainingArguments.deepspeed."""
    from transformers import HfArgumentParser, TrainingArguments
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--deepspeed", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser((ScriptArguments, TrainingArguments), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    notes: list[str] = []
    defaults = {}
    if known.deepspeed:
        if not os.path.isfile(known.deepspeed):
            parser.error(f"--deepspeed {known.deepspeed}: no such file (see examples/configs/)")
        cfg, defaults, notes = adapt_config(known.deepspeed, cuda)
        defaults["deepspeed"] = cfg
    defaults.setdefault("max_steps", 200)
    defaults.setdefault("per_device_eval_batch_size", defaults.get("per_device_train_batch_size", 8))
    defaults.update(output_dir=None, logging_steps=1, eval_strategy="steps", save_strategy="no",
                    report_to="none", seed=0, use_cpu=not cuda, ddp_backend=None if cuda else "gloo")
    parser.set_defaults(**defaults)
    # The adapted dict replaces the path (the Trainer reads the JSON when the arguments are built).
    rest = list(sys.argv[1:] if argv is None else argv)
    if known.deepspeed:
        i = next(i for i, a in enumerate(rest) if a == "--deepspeed" or a.startswith("--deepspeed="))
        del rest[i:i + (1 if "=" in rest[i] else 2)]
    script, targs = parser.parse_args_into_dataclasses(rest)
    if not targs.deepspeed:
        parser.error("--deepspeed JSON is required (see examples/configs/)")
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in rest if a.startswith("--")}
    # The Trainer reads these two when training starts, so they can still follow --max_steps here.
    if "eval_steps" not in given:
        targs.eval_steps = max(1, targs.max_steps // 4)
    if "warmup_steps" not in given and targs.warmup_steps >= targs.max_steps:
        targs.warmup_steps = max(1, targs.max_steps // 10)
    if targs.output_dir is None:
        targs.output_dir = os.path.join(script.out, "trainer")
    return script, targs, known.deepspeed, notes


class TextWindows(torch.utils.data.Dataset):
    """Item i: the window common.batch_at draws for (seed, i), a pure function of i (inputs = labels;
    the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, length: int, seq: int, seed: int):
        self.tokens, self.length, self.seq, self.seed = tokens, length, seq, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        x = common.batch_at(self.tokens, i, self.seed, 1, self.seq)[0]
        return {"input_ids": x, "labels": x}


class FixedWindows(torch.utils.data.Dataset):
    """The held-out windows of common.eval_windows (the same for every run)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def metrics_callback(metrics: common.Metrics, tokens_per_step: int):
    """A TrainerCallback writing the Trainer's logs as the examples' JSONL rows (rank 0)."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def __init__(self):
            self.last_eval_step, self.eval_loss, self.t_last = -1, float("nan"), time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            row = {"step": state.global_step}
            if "loss" in logs:
                now = time.perf_counter()
                row.update(loss=float(logs["loss"]), lr=float(logs.get("learning_rate", float("nan"))),
                           tokens_per_s=tokens_per_step * args.logging_steps / (now - self.t_last))
                self.t_last = now
                if logs.get("grad_norm") is not None:
                    row["grad_norm"] = float(logs["grad_norm"])
            if "eval_loss" in logs:
                row["eval_loss"] = float(logs["eval_loss"])
                self.last_eval_step = state.global_step
                self.eval_loss = row["eval_loss"]
            if len(row) > 1 and state.is_world_process_zero:
                metrics.write(**row)

    return MetricsCallback()


def main(argv: list[str] | None = None) -> None:
    """Parse, build data and model, train with the Trainer, then write the summary, table and plot."""
    import deepspeed
    from transformers import Trainer
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed would otherwise compile its shared-memory CPU all-reduce (~80 s); gloo is enough here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if not any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        # `python examples/hf_trainer.py ...` without a launcher: a world of one process,
        # instead of DeepSpeed's search for an MPI launcher.
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(29500 + os.getpid() % 1000)).items():
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    script, targs, json_path, notes = parse_args(argv, cuda)
    rank, world = targs.process_index, targs.world_size
    if notes and rank == 0:
        print(f"[hf_trainer] CPU run: {', '.join(notes + ['use_cpu'])} (the JSON is meant for GPUs)", flush=True)
    label = script.label or os.path.splitext(os.path.basename(json_path))[0].removeprefix("ds_")

    tokenizer = common.make_tokenizer(script.model)
    train_tokens, eval_tokens = common.load_corpus(script.data, tokenizer, script.max_tokens)
    global_batch = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world
    train_set = TextWindows(train_tokens, targs.max_steps * global_batch, script.seq_len, targs.seed)
    eval_set = FixedWindows(common.eval_windows(eval_tokens, script.eval_windows, script.seq_len))
    # Built after the TrainingArguments, so that a ZeRO-3 from_pretrained loads straight into partitions.
    model = common.build_model(script.model, script.size, tokenizer.vocab_size, seed=targs.seed,
                               max_len=max(2048, script.seq_len))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    metrics = common.Metrics(os.path.join(script.out, f"{label}.jsonl") if rank == 0 else None)
    callback = metrics_callback(metrics, global_batch * script.seq_len)
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                      callbacks=[callback])
    t0 = time.perf_counter()
    trainer.train()
    if callback.last_eval_step != trainer.state.global_step:
        trainer.evaluate()  # the summary's held-out loss is always that of the final weights
    seconds = time.perf_counter() - t0

    engine = trainer.model_wrapped
    state = torch.tensor([common.optimizer_state_bytes(engine.basic_optimizer)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(state)
    if rank == 0:
        summary = {"label": label, "optimizer": type(engine.basic_optimizer).__name__,
                   "zero_stage": engine.zero_optimization_stage(), "world_size": world, "params": n_params,
                   "steps": trainer.state.global_step, "final_eval_loss": callback.eval_loss,
                   "seconds": seconds, "state_bytes_total": int(state.item()),
                   "state_bytes_per_param": state.item() / n_params, "device": "cuda" if cuda else "cpu",
                   "data": script.data, "model": script.model or script.size, "trainer": "hf"}
        metrics.write(summary=summary)
        metrics.close()
        print(json.dumps(summary), flush=True)
        report(script.out, f"{script.model or script.size} on {script.data}, HF Trainer, {world} processes")
    finish()  # barrier, destroy the group, leave without racing gloo's threads (teardown.py)


def report(out: str, title: str) -> None:
    """Comparison table of every run in `out` (this one included) and the loss-curve plot."""
    from finetune_deepspeed import print_comparison
    runs, summaries = {}, []
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        rows, summary = common.read_metrics(path)
        runs[os.path.splitext(os.path.basename(path))[0]] = rows
        if summary:
            summaries.append(summary)
    png = common.plot_runs(runs, os.path.join(out, "loss_curves.png"), title=title)
    print_comparison(summaries)
    print(f"metrics: {out}/*.jsonl  plot: {png}", flush=True)


if __name__ == "__main__":
    main()
