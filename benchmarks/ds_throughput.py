"""DeepSpeed ZeRO-2 / ZeRO-3 throughput and memory: MicroAdam vs AdamW, from the JSON config.

    torchrun --standalone --nproc_per_node 2 benchmarks/ds_throughput.py \\
        --out benchmarks/results/throughput/ds_2xH200.json        # ~1 B Llama, bf16, 50 steps
    torchrun --standalone --nproc_per_node 2 benchmarks/ds_throughput.py --tiny --out /tmp/t.json  # CPU, gloo

A randomly initialised Llama-architecture model (default: hidden 2048, 18 layers,
GQA 16/8 heads, MLP 5632, vocab 32000: 0.98 B params, as benchmarks/fsdp_throughput.py)
is trained on random tokens by `deepspeed.initialize` with bf16, gradient clipping 1.0
and `"optimizer": {"type": ...}` set to "MicroAdam" or "AdamW". The AdamW baseline is
torch's fused CUDA AdamW through DeepSpeed (`"torch_adam": true, "fused": true`; no JIT
build) or, with --adamw deepspeed, DeepSpeed's FusedAdam (JIT-compiled on first use).
Every (stage, optimizer) pair gets a fresh model and engine in the same processes:
--warmup untimed steps (they include any kernel build), then --steps timed ones.
Reported per run: tokens/s (all ranks), step time, per-rank peak memory (also above what the
process held when the run started: earlier runs may leave memory allocated), per-rank
optimizer-state bytes (fp32 master partition reported apart) and state bytes per
model parameter; per stage, MicroAdam/AdamW ratios against the project's targets
(throughput >= 0.98x, per-rank state <= 0.9/N bytes/param). Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import torch
import torch.distributed as dist

FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
            num_attention_heads=16, num_key_value_heads=8)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model, a few steps: CPU/gloo check")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages, comma-separated")
    ap.add_argument("--optimizers", default="adamw,microadam")
    ap.add_argument("--adamw", choices=("torch", "deepspeed"), default="torch",
                    help="AdamW baseline: torch fused AdamW via DeepSpeed (default) or DeepSpeed FusedAdam (JIT)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 50; --tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per rank (default 4; --tiny 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; --tiny 64)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default="ds_throughput.json")
    args = ap.parse_args()
    d = dict(steps=3, warmup=1, batch_size=2, seq_len=64) if args.tiny else \
        dict(steps=50, warmup=5, batch_size=4, seq_len=2048)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def ds_config(args, stage: int, optimizer: str, cuda: bool) -> dict:
    if optimizer == "microadam" or optimizer.startswith("microadam_q"):  # microadam_q<N>: quant block N
        opt = {"type": "MicroAdam", "params": {"lr": args.lr, "weight_decay": 0.0, "m": args.m,
                                               "density": args.density}}
        q = optimizer.partition("_q")[2]
        if q:
            opt["params"]["quant_block"] = int(q)
    else:
        params = {"lr": args.lr, "weight_decay": 0.0}
        if args.adamw == "torch":
            params.update({"torch_adam": True, "fused": cuda})
        opt = {"type": "AdamW", "params": params}
    zero = {"stage": stage, "overlap_comm": cuda, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if stage == 3:
        zero = {"stage": 3, "overlap_comm": cuda, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
                "stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e5}
    return {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_optimization": zero,
            "optimizer": opt, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(TINY if args.tiny else FULL)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    return model, shape


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes_of(opt) -> tuple[int, int]:
    """(optimizer-state bytes, fp32 master-partition bytes) this rank holds."""
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor))
    master = sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return state, master


def run_one(args, stage, name, device, rank, world):
    import deepspeed

    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    # Memory still allocated when the run starts (what earlier runs in this process left):
    # the run's own peak is the peak above it.
    base = torch.cuda.memory_allocated(device) if cuda else None
    model, shape = build_model(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(args, stage, name, cuda))
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    ids = torch.randint(0, shape["vocab_size"], (args.batch_size, args.seq_len), device=device, generator=g)

    def step():
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - t0
    basic = engine.basic_optimizer
    # ZeRO-3 keeps param_groups empty between steps; its flat partitions hold the state.
    opt_state, master = state_bytes_of(basic)
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        master = sum(t.numel() * t.element_size() for t in engine.optimizer.fp32_partitioned_groups_flat)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    rec = {"stage": stage, "optimizer": name, "optimizer_class": type(basic).__name__,
           "loss": float(loss.detach().float()), "step_s": elapsed / args.steps, "warmup_s": warmup_s,
           "tokens_per_s": world * args.batch_size * args.seq_len * args.steps / elapsed,
           "peak_mem_bytes": peak, "baseline_mem_bytes": base,
           "run_peak_mem_bytes": peak - base if cuda else None,
           "state_bytes": opt_state, "master_bytes": master, "params": n_params}
    if name.startswith("microadam"):
        from microadam_dist.ops import builder, select_backend

        rec["backend"] = select_backend("auto", device)[0]
        rec["kernels"] = builder.how_loaded() if cuda else None
    per_rank = [None] * world
    dist.all_gather_object(per_rank, rec)
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    del engine, model, basic
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return per_rank


def summarize(per_rank: list[dict], world: int) -> dict:
    r0 = per_rank[0]
    out = {k: r0[k] for k in ("stage", "optimizer", "optimizer_class", "params", "backend", "kernels") if k in r0}
    out["tokens_per_s"] = min(r["tokens_per_s"] for r in per_rank)  # the slowest rank sets the pace
    out["step_s"] = max(r["step_s"] for r in per_rank)
    out["warmup_s"] = max(r["warmup_s"] for r in per_rank)
    out["loss"] = r0["loss"]
    out["peak_mem_bytes_per_rank"] = [r["peak_mem_bytes"] for r in per_rank]
    out["baseline_mem_bytes_per_rank"] = [r["baseline_mem_bytes"] for r in per_rank]
    out["run_peak_mem_bytes_per_rank"] = [r["run_peak_mem_bytes"] for r in per_rank]
    out["state_bytes_per_rank"] = [r["state_bytes"] for r in per_rank]
    out["master_bytes_per_rank"] = [r["master_bytes"] for r in per_rank]
    out["max_rank_state_bytes_per_param"] = max(r["state_bytes"] for r in per_rank) / r0["params"]
    return out


def main() -> None:
    args = parse_args()
    import deepspeed

    import microadam_dist  # noqa: F401  registers "type": "MicroAdam"

    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not cuda:  # skip DeepSpeed's JIT build of a CPU shared-memory all-reduce (~80 s); gloo suffices
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    runs = []
    for stage in [int(s) for s in args.stages.split(",")]:
        for name in args.optimizers.split(","):
            per_rank = run_one(args, stage, name, device, rank, world)
            runs.append(summarize(per_rank, world))
            if rank == 0:
                r = runs[-1]
                print(f"ZeRO-{stage} {name:10s} {r['tokens_per_s']:10.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  "
                      f"state/rank {max(r['state_bytes_per_rank']) / 2**20:9.1f} MiB  peak/rank "
                      f"{max(x or 0 for x in r['peak_mem_bytes_per_rank']) / 2**30:6.2f} GiB ("
                      f"{max(x or 0 for x in r['run_peak_mem_bytes_per_rank']) / 2**30:.2f} above the run's start)",
                      flush=True)
    ratios = {}
    for stage in sorted({r["stage"] for r in runs}):
        by = {r["optimizer"]: r for r in runs if r["stage"] == stage}
        aw = by.get("adamw")
        for ma_name, ma in by.items():
            if aw is None or not ma_name.startswith("microadam"):
                continue
            peak_ratio = None
            if aw["run_peak_mem_bytes_per_rank"][0]:
                peak_ratio = max(ma["run_peak_mem_bytes_per_rank"]) / max(aw["run_peak_mem_bytes_per_rank"])
            ratios[f"zero{stage}" + ma_name[len("microadam"):]] = {
                "throughput_ratio": ma["tokens_per_s"] / aw["tokens_per_s"], "throughput_target": 0.98,
                "peak_mem_ratio": peak_ratio,
                "microadam_rank_state_bytes_per_param": ma["max_rank_state_bytes_per_param"],
                "state_target_bytes_per_param": 0.9 / world,
                "adamw_rank_state_bytes_per_param": aw["max_rank_state_bytes_per_param"]}
    if rank == 0:
        result = {"benchmark": "ds_throughput", "tiny": args.tiny, "world_size": world,
                  "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                  "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                  "model": dict(TINY if args.tiny else FULL, layers=args.layers, params=runs[0]["params"]),
                  "batch_size_per_rank": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                  "warmup": args.warmup, "adamw_impl": args.adamw, "m": args.m, "density": args.density,
                  "runs": runs, "ratios": ratios}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(ratios, indent=1))
    from microadam_dist.teardown import finish
    finish()  # barrier, destroy the group, leave without racing gloo's threads (teardown.py)


if __name__ == "__main__":
    main()
