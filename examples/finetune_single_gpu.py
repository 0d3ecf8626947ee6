"""Full fine-tuning of a causal LM on one device, optionally stepping MicroAdam inside backward.

    python examples/finetune_single_gpu.py --steps 20                      # tiny Llama, CPU ok
    python examples/finetune_single_gpu.py --step-in-backward --steps 20   # the same, stepped in backward
    # a 7B model on one 24 GB GPU: bf16 weights, activation checkpointing, step inside backward
    python examples/finetune_single_gpu.py --model meta-llama/Llama-2-7b-hf --data my_corpus/ \\
        --seq-len 512 --batch-size 1 --steps 1000 --lr 1e-5 --step-in-backward

Without --model the model is a fresh Llama of --size built from a LlamaConfig with a
byte-level vocabulary, and the corpus is --data (a corpus named in examples/common.py, or
a file or folder), so the run needs no download; with --model the weights and tokenizer
are loaded (hub id or local path). Activation checkpointing is on per decoder layer
(--no-checkpointing turns it off).

--step-in-backward builds MicroAdam(step_in_backward=True): each param is stepped inside
loss.backward() once its gradient is complete and its gradient is released at once, so
the gradients of the whole model never exist together (docs/configuration.md). Gradient
accumulation (--grad-accum) then runs the micro-batches but the last inside
`optimizer.accumulate()`; clipping is per tensor (--clip-per-tensor) since a global norm
cannot be known before the first step inside backward (--clip is the ordinary mode's).

A progress bar shows loss and tokens/s; one JSON line per step goes to --metrics, then a
summary line (held-out loss, peak memory, optimizer state bytes); the last line printed
is the memory line: on CUDA the peak of torch.cuda.max_memory_allocated since the model
was built, on the CPU the process's peak resident set.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time

import torch
from tqdm import tqdm

import common  # examples/common.py: this script's folder is first on sys.path
from microadam_dist import MicroAdam


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="hub id or local path; default: a fresh Llama of --size")
    ap.add_argument("--size", default="tiny", help=f"one of {', '.join(common.SIZES)} (without --model)")
    ap.add_argument("--data", default="python", help=f"{', '.join(common.CORPORA)}, or a file/folder")
    ap.add_argument("--optim", choices=("microadam", "adamw"), default="microadam")
    ap.add_argument("--step-in-backward", action="store_true",
                    help="MicroAdam(step_in_backward=True): step and free each gradient inside backward")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="weights and gradients; auto: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--m", type=int, default=10, help="MicroAdam window rows")
    ap.add_argument("--density", type=float, default=0.01, help="MicroAdam top-k density")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine decay")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="on matrices only")
    ap.add_argument("--clip", type=float, default=0.0, help="global max grad norm, ordinary mode only (0: off)")
    ap.add_argument("--clip-per-tensor", type=float, default=None,
                    help="with --step-in-backward: max L2 norm of each gradient")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
    ap.add_argument("--max-tokens", type=int, default=2_000_000, help="corpus tokens read for training")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--metrics", default="finetune_single_gpu.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.step_in_backward and args.optim != "microadam":
        ap.error("--step-in-backward needs --optim microadam")
    if args.step_in_backward and args.clip:
        ap.error("--clip (global norm) cannot run before a step inside backward; use --clip-per-tensor")
    if args.clip_per_tensor is not None and not args.step_in_backward:
        ap.error("--clip-per-tensor needs --step-in-backward (the ordinary mode has --clip)")
    return args


def build_optimizer(args, model):
    groups = common.decay_groups(model, args.weight_decay)
    if args.optim == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, fused=next(model.parameters()).is_cuda)
    return MicroAdam(groups, lr=args.lr, m=args.m, density=args.density, step_in_backward=args.step_in_backward,
                     max_grad_norm_per_tensor=args.clip_per_tensor)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, device) -> float:
    model.eval()
    losses = [float(model(input_ids=w[None].to(device), labels=w[None].to(device)).loss) for w in windows]
    model.train()
    return sum(losses) / len(losses)


def memory_line(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"memory: peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated "
                f"(torch.cuda.max_memory_allocated since the model was built)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return f"memory: peak {rss:.2f} GiB resident (CPU run: the process's peak RSS)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = common.make_tokenizer(args.model)
    train, held_out = common.load_corpus(args.data, tokenizer, args.max_tokens)
    model = common.build_model(args.model, args.size, tokenizer.vocab_size, args.seed,
                               max_len=max(2048, args.seq_len), dtype=dtype).to(device)
    model.config.use_cache = False
    if not args.no_checkpointing:
        common.checkpoint_layers(model)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opt = build_optimizer(args, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.lr_factor(s + 1, args.warmup, args.steps))
    metrics = common.Metrics(args.metrics)
    label = f"{args.optim}{' step_in_backward' if args.step_in_backward else ''}"
    bar = tqdm(total=args.steps, disable=args.no_progress, desc=label)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            ids = common.batch_at(train, (step - 1) * args.grad_accum + micro, args.seed, args.batch_size,
                                  args.seq_len).to(device)
            last = micro == args.grad_accum - 1
            # In step_in_backward mode the last micro-batch's backward steps; the others accumulate.
            with contextlib.nullcontext() if last or args.optim != "microadam" else opt.accumulate():
                loss = model(input_ids=ids, labels=ids).loss / args.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()  # with step_in_backward: completes the step taken inside backward
        opt.zero_grad(set_to_none=True)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        metrics.write(step=step, loss=loss_sum, lr=lr, step_s=seconds, tokens_per_s=tokens_per_step / seconds)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tokens_per_step / seconds:.0f}")
        bar.update(1)
    bar.close()
    eval_loss = evaluate(model, common.eval_windows(held_out, args.eval_windows, args.seq_len), device)
    summary = {"optimizer": label, "steps": args.steps, "final_eval_loss": eval_loss,
               "params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype),
               "optimizer_state_bytes": common.optimizer_state_bytes(opt), "device": str(device),
               "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    metrics.write(summary=summary)
    metrics.close()
    print(f"held-out loss {eval_loss:.4f} after {args.steps} steps ({label})")
    print(memory_line(device))
    return summary


if __name__ == "__main__":
    main()
