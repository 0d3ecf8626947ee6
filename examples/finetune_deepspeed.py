"""Fine-tune a causal LM with DeepSpeed ZeRO, the optimizer named in the DeepSpeed JSON.

    # 2 CPU processes, tiny Llama, byte tokens, Python stdlib corpus (what scripts/demo.sh runs):
    torchrun --standalone --nproc_per_node 2 examples/finetune_deepspeed.py \\
        --deepspeed_config examples/configs/ds_zero2_microadam.json --out runs/ds
    # the AdamW twin into the same folder: the plot then compares both
    torchrun --standalone --nproc_per_node 2 examples/finetune_deepspeed.py \\
        --deepspeed_config examples/configs/ds_zero2_adamw.json --out runs/ds
    # what scripts/demo.sh runs: a brief AdamW pre-training on --pretrain-data, then both
    # optimizers fine-tune from that start on --data
    torchrun --standalone --nproc_per_node 2 examples/finetune_deepspeed.py --pretrain-steps 150 \
        --deepspeed_config examples/configs/ds_zero2_microadam.json \
        --compare examples/configs/ds_zero2_adamw.json --data cpp --out runs/demo
    # GPUs, a real model and corpus:
    deepspeed --num_gpus 8 examples/finetune_deepspeed.py --deepspeed_config \\
        examples/configs/ds_zero3_microadam.json --model meta-llama/Llama-3.2-1B --data my_corpus/ \\
        --seq-len 2048 --steps 2000

The JSON says `"optimizer": {"type": "MicroAdam", "params": {...}}`; importing
microadam_dist (done below) is all it takes for DeepSpeed to accept that type. The
script itself does not know which optimizer it trains with.

Without --model the model is a small Llama (`--size`) with a byte-level vocabulary and
the corpus is --data (a corpus named in examples/common.py, such as `python`, or a
path), so the run needs no download. Rank 0 shows a progress bar, writes one JSON line per step
to OUT/LABEL.jsonl (LABEL: the JSON's file name without `ds_`), a summary line at the
end, and OUT/loss_curves.png with every run found in OUT. `--compare OTHER.json ...`
trains the other JSONs afterwards in the same processes (same seed, same batches)
and prints a comparison table: held-out loss ratio and optimizer bytes per parameter.

`--pretrain-steps N` first trains the model for N steps under --pretrain-config (the AdamW
JSON by default) on --pretrain-data, into OUT/pretrain/; every run then starts from those
weights (MicroAdam's intended use is fine-tuning a trained model). `--save-start F` keeps
them, `--start F` loads them instead of pre-training.

On a CPU the script adapts the JSON (and says so): bf16 off, and `torch_adam` for
Adam/AdamW, since DeepSpeed's fused Adam needs a compiler step made for GPUs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import common  # examples/common.py: this script's folder is first on sys.path
import microadam_dist  # noqa: F401  makes "type": "MicroAdam" valid in the DeepSpeed JSON
from microadam_dist.teardown import finish

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    import deepspeed
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("--model", default=None, help="hub id or local path; default: a fresh Llama of --size")
    ap.add_argument("--size", default="tiny", choices=tuple(common.SIZES), help="model size without --model")
    ap.add_argument("--data", default="python", help=f"corpus: {', '.join(common.CORPORA)}, or a file/folder path")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps (the JSON scheduler's total)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4_000_000, help="train tokens read from the corpus")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out windows per evaluation")
    ap.add_argument("--out", default="runs/finetune_deepspeed", help="folder for metrics and the plot")
    ap.add_argument("--label", default=None, help="name of the first run (default: the JSON's file name)")
    ap.add_argument("--compare", nargs="*", default=[], metavar="JSON",
                    help="more DeepSpeed JSONs to train afterwards in the same processes, same seed and data "
                         "(e.g. the AdamW twin); a comparison table is printed at the end")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="first pre-train this many steps under --pretrain-config on --pretrain-data (0: none)")
    ap.add_argument("--pretrain-data", default="python", help="the pre-training corpus (as --data)")
    ap.add_argument("--pretrain-config", default=os.path.join(HERE, "configs", "ds_zero2_adamw.json"),
                    help="DeepSpeed JSON of the pre-training")
    ap.add_argument("--start", default=None, help="start every run from this state_dict (skips pre-training)")
    ap.add_argument("--save-start", default=None, help="save the pre-trained state_dict here (rank 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap = deepspeed.add_config_arguments(ap)
    args = ap.parse_args(argv)
    if not args.deepspeed_config:
        ap.error("--deepspeed_config JSON is required (see examples/configs/)")
    return args


def load_config(path: str, steps: int, cuda: bool, rank: int) -> dict:
    """The JSON at path, with the schedule's length set to `steps` and CPU adjustments."""
    with open(path) as f:
        cfg = json.load(f)
    notes = []
    sched = cfg.get("scheduler", {}).get("params")
    if sched is not None and "total_num_steps" in sched:
        sched["total_num_steps"] = steps
        if sched.get("warmup_num_steps", 0) >= steps:
            sched["warmup_num_steps"] = max(1, steps // 10)
    if not cuda:
        notes += common.adapt_ds_config_for_cpu(cfg)
    if notes and rank == 0:
        print(f"[finetune_deepspeed] CPU run: {', '.join(notes)} (the JSON is meant for GPUs)", flush=True)
    return cfg


@torch.no_grad()
def evaluate(engine, windows: torch.Tensor, rank: int, world: int, micro: int) -> float:
    """Mean held-out loss over all windows; every rank runs the forward (ZeRO-3 gathers need all)."""
    engine.eval()
    mine = windows[rank::world]
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, mine.shape[0], micro):
        x = mine[i:i + micro].to(engine.device)
        total[0] += float(engine(input_ids=x, labels=x).loss) * x.shape[0]
        total[1] += x.shape[0]
    if world > 1:
        dist.all_reduce(total)
    engine.train()
    return float(total[0] / total[1])


def train(args, config_path: str, data, rank: int, world: int, cuda: bool, steps: int, out: str,
          label: str | None = None, start: dict | None = None) -> tuple[dict | None, dict]:
    """One run of `steps` steps under the JSON at `config_path`, from the weights `start` (a
    state_dict) or fresh ones; returns rank 0's summary (None elsewhere) and the final weights."""
    import deepspeed
    tokenizer, train_tokens, windows, corpus = data
    args.deepspeed_config = config_path
    cfg = load_config(config_path, steps, cuda, rank)
    label = label or os.path.splitext(os.path.basename(config_path))[0].removeprefix("ds_")
    micro = int(cfg.get("train_micro_batch_size_per_gpu", 1))
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    # Same seed for every run: every optimizer starts from the same weights and sees the same batches.
    model = common.build_model(args.model, args.size, tokenizer.vocab_size, seed=args.seed,
                               max_len=max(2048, args.seq_len))
    if start is not None:
        model.load_state_dict(start)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    # Weight decay comes from the JSON's optimizer.params; norms and biases are exempt.
    groups = common.decay_groups(model, 0.0)
    del groups[0]["weight_decay"]
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, model_parameters=groups)

    metrics = common.Metrics(os.path.join(out, f"{label}.jsonl") if rank == 0 else None)
    bar = tqdm(total=steps, desc=label, disable=rank != 0 or args.no_progress, dynamic_ncols=True)
    eval_loss = float("nan")
    if start is not None:  # where the curve starts
        eval_loss = evaluate(engine, windows, rank, world, micro)
        metrics.write(step=0, eval_loss=eval_loss)
    t0 = t_last = time.perf_counter()
    for step in range(1, steps + 1):
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for micro_step in range(accum):
            x = common.batch_at(train_tokens, step * accum + micro_step, args.seed, micro, args.seq_len,
                                rank, world).to(engine.device)
            loss = engine(input_ids=x, labels=x).loss  # HF shifts the labels inside the model
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += float(loss.detach())
        if world > 1:
            dist.all_reduce(loss_sum)
        row = {"step": step, "loss": float(loss_sum) / (accum * world), "lr": engine.get_lr()[0]}
        norm = engine.get_global_grad_norm()
        if norm is not None:
            row["grad_norm"] = float(norm)
        now = time.perf_counter()
        row["tokens_per_s"] = micro * accum * world * args.seq_len / (now - t_last)
        t_last = now
        if step % args.eval_every == 0 or step == steps:
            eval_loss = row["eval_loss"] = evaluate(engine, windows, rank, world, micro)
        metrics.write(**row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", eval=f"{eval_loss:.3f}")
        bar.update(1)
    bar.close()

    state = torch.tensor([common.optimizer_state_bytes(engine.basic_optimizer)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(state)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                           enabled=engine.zero_optimization_stage() == 3):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    summary = None
    if rank == 0:
        summary = {"label": label, "optimizer": type(engine.basic_optimizer).__name__,
                   "zero_stage": engine.zero_optimization_stage(), "world_size": world, "params": n_params,
                   "steps": steps, "final_eval_loss": eval_loss, "seconds": time.perf_counter() - t0,
                   "state_bytes_total": int(state.item()), "state_bytes_per_param": state.item() / n_params,
                   "device": "cuda" if cuda else "cpu", "data": corpus, "model": args.model or args.size}
        metrics.write(summary=summary)
        metrics.close()
        print(json.dumps(summary), flush=True)
    engine.destroy()
    return summary, weights


def print_comparison(summaries: list[dict]) -> None:
    print(f"{'run':<22} {'optimizer':<20} {'final eval loss':>15} {'state B/param':>14} {'seconds':>8}")
    for s in summaries:
        print(f"{s['label']:<22} {s['optimizer']:<20} {s['final_eval_loss']:>15.4f} "
              f"{s['state_bytes_per_param']:>14.3f} {s['seconds']:>8.1f}")
    base = next((s for s in summaries if "adam" in s["optimizer"].lower() and "micro" not in s["optimizer"].lower()),
                None)
    if base is not None:
        for s in summaries:
            if s is not base:
                ratio = s["final_eval_loss"] / base["final_eval_loss"]
                print(f"{s['label']} / {base['label']} held-out loss: {ratio:.4f} ({100 * (ratio - 1):+.2f}%); "
                      f"optimizer state {s['state_bytes_per_param']:.3f} vs {base['state_bytes_per_param']:.3f} "
                      f"bytes/param")


def main(argv=None) -> None:
    import deepspeed
    args = parse_args(argv)
    args.configs = [args.deepspeed_config] + list(args.compare)
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed would otherwise compile its shared-memory CPU all-reduce (~80 s); gloo is enough here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    tokenizer = common.make_tokenizer(args.model)

    def corpus(name: str):
        train_tokens, eval_tokens = common.load_corpus(name, tokenizer, args.max_tokens)
        return tokenizer, train_tokens, common.eval_windows(eval_tokens, args.eval_windows, args.seq_len), name

    start = None
    if args.start:
        start = torch.load(args.start, map_location="cpu")
    elif args.pretrain_steps > 0:
        pre, start = train(args, args.pretrain_config, corpus(args.pretrain_data), rank, world, cuda,
                           args.pretrain_steps, os.path.join(args.out, "pretrain"), label="pretrain")
        if rank == 0:
            print(f"start: {args.pretrain_steps} steps of {pre['optimizer']} on {args.pretrain_data}, "
                  f"held-out loss there {pre['final_eval_loss']:.4f}", flush=True)
            if args.save_start:
                torch.save(start, args.save_start)
    data = corpus(args.data)
    summaries = [train(args, path, data, rank, world, cuda, args.steps, args.out,
                       label=args.label if i == 0 else None, start=start)[0]
                 for i, path in enumerate(args.configs)]

    if rank == 0:
        runs = {os.path.splitext(os.path.basename(p))[0]: common.read_metrics(p)[0]
                for p in sorted(glob.glob(os.path.join(args.out, "*.jsonl")))}
        began = (f", from {args.pretrain_steps} pre-training steps on {args.pretrain_data}"
                 if start is not None and not args.start else f", from {args.start}" if args.start else "")
        png = common.plot_runs(runs, os.path.join(args.out, "loss_curves.png"),
                               title=f"{args.model or args.size} on {args.data}, {world} processes{began}")
        print_comparison(summaries)
        print(f"metrics: {args.out}/*.jsonl  plot: {png}")
    finish()  # barrier, destroy the group, leave without racing gloo's threads (teardown.py)


if __name__ == "__main__":
    main()
