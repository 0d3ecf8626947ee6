"""Fine-tune a Llama-architecture model with FSDP2 (`fully_shard`) and MicroAdam or AdamW.

    torchrun --standalone --nproc_per_node 2 examples/finetune_fsdp2.py            # tiny, CPU ok
    torchrun --standalone --nproc_per_node 8 examples/finetune_fsdp2.py \\
        --model /path/to/llama --data corpus.txt --seq-len 2048 --steps 1000 --save ckpt/ --save-every 200
    torchrun ... examples/finetune_fsdp2.py ... --resume ckpt/step_200

Without --model the model is a small LlamaConfig built offline with a byte-level
vocabulary; with --model it is loaded (local path or hub id) with its tokenizer. The
corpus is --data (a text file or a folder of .txt/.py/.md files), by default the
Python standard library's sources, which every machine has. Rank 0 shows a progress
bar and writes one JSON line per step to --metrics. Checkpoints are sharded DCP
directories written by microadam_dist.integrations.fsdp (every rank's MicroAdam
state under its own key); --resume continues bitwise at the same world size.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sysconfig
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from microadam_dist import MicroAdam
from microadam_dist.teardown import finish  # noqa: E402
from microadam_dist.integrations import fsdp


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local path or hub id; default: a tiny LlamaConfig")
    ap.add_argument("--data", default=None, help="text file or folder; default: Python's stdlib sources")
    ap.add_argument("--optim", choices=("microadam", "adamw"), default="microadam")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--m", type=int, default=10, help="MicroAdam window rows")
    ap.add_argument("--density", type=float, default=0.01, help="MicroAdam top-k density")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--clip", type=float, default=1.0, help="max grad norm (0: off)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16-mixed", "bf16"), default="auto",
                    help="bf16-mixed: fp32 sharded params, bf16 compute; bf16: bf16 params; "
                         "auto: bf16-mixed on CUDA, fp32 on CPU")
    ap.add_argument("--metrics", default="finetune_fsdp2_metrics.jsonl")
    ap.add_argument("--save", default=None, help="folder for DCP checkpoints DIR/step_N (at the end "
                    "and every --save-every steps)")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", default=None, help="DCP checkpoint directory to continue from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


# -- data ----------------------------------------------------------------------

class ByteTokenizer:
    """Bytes as tokens (vocab 256): no files needed, so the default run is offline."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def corpus_files(data: str | None) -> list[str]:
    if data and os.path.isfile(data):
        return [data]
    root = data or sysconfig.get_paths()["stdlib"]
    files = []
    for ext in ("txt", "py", "md"):
        files += glob.glob(os.path.join(root, "**", f"*.{ext}"), recursive=True)
    if not files:
        raise SystemExit(f"--data {root!r}: no .txt/.py/.md files found")
    return sorted(files)


def load_tokens(tokenizer, data: str | None, max_tokens: int) -> torch.Tensor:
    """A 1-D int64 token stream of up to `max_tokens` from the corpus (same on every rank)."""
    ids: list[int] = []
    for path in corpus_files(data):
        with open(path, encoding="utf-8", errors="ignore") as f:
            ids += tokenizer.encode(f.read())
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def get_batch(tokens: torch.Tensor, step: int, rank: int, world: int, batch: int, seq: int,
              seed: int) -> torch.Tensor:
    """Sequences for (step, rank), a pure function of them: a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * world + rank)
    starts = torch.randint(0, tokens.numel() - seq, (batch,), generator=g)
    return torch.stack([tokens[s:s + seq] for s in starts.tolist()])


# -- model -------------------------------------------------------------------------

def build_model(args, vocab: int, device: torch.device, param_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=param_dtype)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config).to(param_dtype)
    return model.to(device)


def shard(model, mesh, precision: str):
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16-mixed" else MixedPrecisionPolicy())
    for layer in model.model.layers:  # one all-gather per decoder layer
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def make_optimizer(args, model):
    # No weight decay on norms and biases, as usual for Llama fine-tuning.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if args.optim == "microadam":
        return MicroAdam(groups, lr=args.lr, m=args.m, density=args.density)
    return torch.optim.AdamW(groups, lr=args.lr, fused=torch.cuda.is_available() or None)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step <= warmup:
        return step / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if cuda else "fp32")
    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    if args.model:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        tokenizer = ByteTokenizer()
    vocab = getattr(tokenizer, "vocab_size", 256)
    tokens = load_tokens(tokenizer, args.data, max_tokens=max(200_000, 50 * args.batch_size * args.seq_len))
    if tokens.numel() <= args.seq_len + 1:
        raise SystemExit(f"corpus has {tokens.numel()} tokens; need more than --seq-len {args.seq_len}")

    mesh = init_device_mesh(device.type, (world,))
    model = shard(build_model(args, vocab, device, param_dtype), mesh, precision)
    optimizer = make_optimizer(args, model)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    start = 0
    if args.resume:
        start = int(fsdp.load_checkpoint(args.resume, model, optimizer).get("step", 0))

    n_params = sum(p.numel() for p in model.parameters())
    metrics = open(args.metrics, "a") if rank == 0 else None
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, desc=args.optim)
    model.train()
    t_last = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * lr_factor(step, args.warmup, args.steps)
        batch = get_batch(tokens, step, rank, world, args.batch_size, args.seq_len, args.seed).to(device)
        # HF shifts the labels inside the model: labels are the inputs themselves.
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).full_tensor().item()
                     if args.clip > 0 else float("nan"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = loss.detach()
        dist.all_reduce(loss_val)  # SUM: gloo has no AVG
        loss_val = loss_val.item() / world
        now = time.perf_counter()
        tok_s = world * args.batch_size * args.seq_len / (now - t_last)
        t_last = now
        if rank == 0:
            metrics.write(json.dumps({"step": step, "loss": loss_val, "lr": optimizer.param_groups[0]["lr"],
                                      "grad_norm": grad_norm, "tokens_per_s": tok_s}) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
        if args.save and args.save_every and step % args.save_every == 0 and step < args.steps:
            fsdp.save_checkpoint(os.path.join(args.save, f"step_{step}"), model, optimizer, extra={"step": step})
    bar.close()
    if args.save:
        fsdp.save_checkpoint(os.path.join(args.save, f"step_{args.steps}"), model, optimizer,
                             extra={"step": args.steps})
    state = torch.tensor([fsdp.state_nbytes(optimizer)], dtype=torch.float64)
    dist.all_reduce(state)
    if rank == 0:
        summary = {"params": n_params, "world_size": world, "optimizer": args.optim, "precision": precision,
                   "state_bytes_total": int(state.item()), "state_bytes_per_param": state.item() / n_params}
        metrics.write(json.dumps({"summary": summary}) + "\n")
        metrics.close()
        print(json.dumps(summary))
    finish()  # barrier, destroy the group, leave without racing gloo's threads (teardown.py)


if __name__ == "__main__":
    main()
