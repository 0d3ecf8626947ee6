"""FSDP2 fine-tuning throughput and memory: MicroAdam vs torch AdamW (fused on CUDA).

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_throughput.py \\
        --out benchmarks/results/throughput/fsdp_2xH200.json       # ~1 B Llama, bf16, 50 steps
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_throughput.py --tiny --out /tmp/t.json  # CPU

A randomly initialised Llama-architecture model (default: hidden 2048, 18 layers,
GQA 16/8 heads, MLP 5632, vocab 32000: 0.98 B params) is sharded with `fully_shard`
per decoder layer, fp32 sharded params with bf16 compute (MixedPrecisionPolicy), and
trained on random tokens. Each optimizer runs in a fresh model in the same process:
--warmup untimed steps, then --steps timed ones. Reported per optimizer: tokens/s
(all ranks), step time, per-rank peak memory (also above what the process held when the
run started), per-rank optimizer-state bytes and
bytes/param; and MicroAdam / AdamW throughput and memory ratios. Rank 0 writes JSON.
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
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from microadam_dist import MicroAdam
from microadam_dist.teardown import finish  # noqa: E402
from microadam_dist.integrations.fsdp import state_nbytes

FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
            num_attention_heads=16, num_key_value_heads=8)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, a few steps: CPU/gloo check")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 50; --tiny 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per rank (default 4; --tiny 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; --tiny 64)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--optimizers", default="adamw,microadam")
    ap.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="sharded param dtype: fp32 with bf16 compute (default) or pure bf16")
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--out", default="fsdp_throughput.json")
    args = ap.parse_args()
    d = dict(steps=4, warmup=1, batch_size=2, seq_len=64) if args.tiny else \
        dict(steps=50, warmup=5, batch_size=4, seq_len=2048)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build(args, device, mesh):
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(TINY if args.tiny else FULL)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.param_dtype == "bf16" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" and dtype == torch.float32 else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model, config


def make_optimizer(name, model, args, cuda):
    if name == "microadam" or name.startswith("microadam_q"):  # microadam_q<N>: quant block N
        q = name.partition("_q")[2]
        return MicroAdam(model.parameters(), lr=1e-4, m=args.m, density=args.density,
                         **({"quant_block": int(q)} if q else {}))
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if cuda else None)
    raise SystemExit(f"unknown optimizer {name!r}; choose from adamw, microadam, microadam_q<N>")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(name, args, device, mesh, rank, world):
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # Memory still allocated when the run starts (what earlier runs in this process left):
    # the run's own peak is the peak above it.
    base = torch.cuda.memory_allocated(device) if cuda else 0
    model, config = build(args, device, mesh)
    opt = make_optimizer(name, model, args, cuda)
    n_params = sum(p.numel() for p in model.parameters())
    local_params = sum(p.to_local().numel() for p in model.parameters())
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
        losses.append(float(loss.detach().float()))
    # A step's time is the slowest rank's.
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    times = t.tolist()
    tokens_step = world * args.batch_size * args.seq_len
    per_rank = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0, state_nbytes(opt),
                             local_params, base], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(per_rank) for _ in range(world)]
    dist.all_gather(gathered, per_rank)
    peak = [int(x[0]) for x in gathered]
    state = [int(x[1]) for x in gathered]
    backend = None
    if isinstance(opt, MicroAdam):
        from microadam_dist.ops import select_backend
        backend = select_backend(opt.param_groups[0]["backend"], device)[0]
    res = {
        "optimizer": name, "backend": backend, "params": n_params,
        "step_time_s_mean": statistics.mean(times), "step_time_s_median": statistics.median(times),
        "tokens_per_s": tokens_step / statistics.mean(times),
        "peak_memory_bytes_per_rank": peak, "state_bytes_per_rank": state,
        "baseline_memory_bytes_per_rank": [int(x[3]) for x in gathered],
        "run_peak_memory_bytes_per_rank": [int(x[0] - x[3]) for x in gathered],
        "local_params_per_rank": [int(x[2]) for x in gathered],
        "state_bytes_per_param_per_rank": [s / n_params for s in state],
        "state_bytes_per_local_param": [s / max(1, int(x[2])) for s, x in zip(state, gathered)],
        "loss_first": losses[0], "loss_last": losses[-1],
    }
    del opt, model
    gc.collect()
    return res


def main():
    args = parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    results = {}
    for name in args.optimizers.split(","):
        results[name] = run_one(name.strip(), args, device, mesh, rank, world)
        if rank == 0:
            r = results[name]
            print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_time_s_mean'] * 1e3:.1f} ms, "
                  f"peak {max(r['peak_memory_bytes_per_rank']) / 2**30:.2f} GiB/rank "
                  f"({max(r['run_peak_memory_bytes_per_rank']) / 2**30:.2f} above the run's start), "
                  f"state {max(r['state_bytes_per_rank']) / 2**20:.1f} MiB/rank", flush=True)
    if rank == 0:
        out = {"world_size": world, "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
               "torch": torch.__version__, "args": vars(args), "results": results}
        # Every MicroAdam row against AdamW. Target: per-rank state <= 0.9 / N bytes
        # per model param, i.e. state_bytes_per_param_times_world <= 0.9.
        a = results.get("adamw")
        for name, m in results.items():
            if a is not None and name.startswith("microadam"):
                out.setdefault("ratios", {})[name] = {
                    "throughput": m["tokens_per_s"] / a["tokens_per_s"],
                    "run_peak_memory": (max(m["run_peak_memory_bytes_per_rank"])
                                        / max(a["run_peak_memory_bytes_per_rank"]) if cuda else None),
                    "state_bytes_per_param_times_world": max(m["state_bytes_per_param_per_rank"]) * world}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(json.dumps({k: v for k, v in out.items() if k not in ("results", "args")}))
    finish()  # barrier, destroy the group, leave without racing gloo's threads (teardown.py)


if __name__ == "__main__":
    main()
