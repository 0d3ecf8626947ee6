"""Peak memory and step time of a full fine-tune of a LLaMA-2-7B-shaped model on one GPU:
torch AdamW (fused), MicroAdam, and MicroAdam(step_in_backward=True).

    python benchmarks/memory_7b.py                     # one H100: three rows, about 2 minutes
    python benchmarks/memory_7b.py --layers 4          # a quick check of the same script
    python benchmarks/memory_7b.py --tiny --out /tmp/m.json   # CPU: a tiny Llama, the test's run

The model is Hugging Face's LlamaForCausalLM built from a config (random weights, nothing
downloaded): 32 layers, hidden 4096, intermediate 11008, vocabulary 32000 (6.74 B params),
bf16 weights and gradients, activation checkpointing per decoder layer, SDPA attention,
batch 1 x 512 random tokens. Each row builds its own model in this process after the
previous row's model, optimizer and gradients were freed. Peak = the largest
torch.cuda.max_memory_allocated after the model was built (the peak statistics are reset
then), minus what was allocated before it was built (nothing, when the previous row was
freed); so it counts weights, gradients, optimizer state and activations, as a trainer
sees them. Step time = median over --steps timed iterations (forward + backward + step +
zero_grad, synchronized) after --warmup untimed ones (the first creates the state).
Writes JSON (every row, the ratios to AdamW and to MicroAdam's ordinary step) to --out
and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch
from examples_import import examples_module

from microadam_dist import MicroAdam

common = examples_module("common")  # examples/common.py: checkpoint_layers

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
ROWS = ("adamw_fused", "microadam", "microadam_step_in_backward")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory_7b", "memory_7b.json")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (reference backend)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's 32)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed iterations (default 10; --tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3; --tiny 1)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; --tiny 32)")
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--bucket-mb", type=float, default=None, help="step_in_backward's backward_bucket_mb (default: the optimizer's)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    for key, full, tiny in (("steps", 10, 2), ("warmup", 3, 1), ("seq_len", 512, 32)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return args


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(TINY if args.tiny else LLAMA2_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=False,
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on the device: no fp32 copy of 7 B params
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    common.checkpoint_layers(model)
    model.train()
    return model, config


def make_optimizer(row, model, args, cuda):
    if row == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if cuda else None)
    return MicroAdam(model.parameters(), lr=1e-5, m=args.m, density=args.density,
                     step_in_backward=row == "microadam_step_in_backward", backward_bucket_mb=args.bucket_mb)


def train_step(model, opt, batch) -> torch.Tensor:
    """Forward, backward (where step_in_backward steps), step, zero_grad; the loss."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(row, args, device):
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device) if cuda else 0
    model, config = build_model(args, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # peak from here: weights, grads, state, activations
    opt = make_optimizer(row, model, args, cuda)
    gen = torch.Generator().manual_seed(1234)
    times, losses = [], []
    flushes = []
    for it in range(args.warmup + args.steps):
        batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
        in_backward = getattr(opt, "_backward", None)
        before = in_backward.flushes if in_backward is not None else 0
        sync(device)
        start = time.perf_counter()
        loss = train_step(model, opt, batch)
        sync(device)
        if it >= args.warmup:
            times.append(time.perf_counter() - start)
        if in_backward is not None:
            flushes.append(in_backward.flushes - before)
        losses.append(float(loss.detach().float()))
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    res = {"params": sum(p.numel() for p in model.parameters()), "base_bytes": base, "peak_bytes": peak,
           "peak_gb": peak / 1e9 if peak is not None else None, "step_s_median": statistics.median(times),
           "step_s": times, "state_bytes": state, "groups_per_step": flushes[-1] if flushes else None,
           "losses": losses}
    del opt, model, loss, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def table(rows: dict) -> str:
    lines = ["| optimizer | peak GB | median step s | peak vs AdamW | step vs AdamW |",
             "| --- | ---: | ---: | ---: | ---: |"]
    names = {"adamw_fused": "torch AdamW, fused", "microadam": "MicroAdam",
             "microadam_step_in_backward": "MicroAdam, step_in_backward=True"}
    for name, r in rows.items():
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        ratio_peak = f"{r['peak_vs_adamw']:.2f}x" if r.get("peak_vs_adamw") is not None else "-"
        ratio_step = f"{r['step_vs_adamw']:.2f}x" if r.get("step_vs_adamw") is not None else "-"
        lines.append(f"| {names[name]} | {peak} | {r['step_s_median']:.3f} | {ratio_peak} | {ratio_step} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda") if cuda else torch.device("cpu")
    rows = {}
    for row in args.rows.split(","):
        rows[row] = run_row(row, args, device)
        r = rows[row]
        print(f"{row}: peak {r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 2)} GB, "
              f"median step {r['step_s_median']:.3f} s, state {r['state_bytes'] / 1e9:.2f} GB"
              + (f", {r['groups_per_step']} groups/step" if r["groups_per_step"] is not None else ""), flush=True)
    adamw, micro = rows.get("adamw_fused"), rows.get("microadam")
    for r in rows.values():
        if adamw is not None:
            r["step_vs_adamw"] = r["step_s_median"] / adamw["step_s_median"]
            r["peak_vs_adamw"] = r["peak_bytes"] / adamw["peak_bytes"] if cuda else None
        if micro is not None:
            r["step_vs_microadam"] = r["step_s_median"] / micro["step_s_median"]
    out = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "shape": dict(TINY if args.tiny else LLAMA2_7B,
                                                     num_hidden_layers=args.layers or (2 if args.tiny else 32)),
           "args": vars(args), "rows": rows, "table": table(rows)}
    sib = rows.get("microadam_step_in_backward")
    if sib is not None and cuda and micro is not None:
        # The targets: peak <= 22 GB for the 7 B shape; the iteration no slower than MicroAdam's ordinary one.
        out["targets"] = {"peak_gb_le_22": sib["peak_gb"] <= 22.0,
                          "step_le_microadam": sib["step_s_median"] <= micro["step_s_median"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(out["table"])
    if "targets" in out:
        print("targets:", json.dumps(out["targets"]))
    return out


if __name__ == "__main__":
    main()
