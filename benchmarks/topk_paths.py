"""Which top-k path would the fused kernel take on real gradients? (CPU, minutes.)

The step benchmark feeds Gaussian random gradients; the kernel's fast top-k (`topk_cand`
in csrc/topk.cuh) relies on the shape of a = g + Q^-1(EF) in each top-k block and falls
back to the slower general path when its guess fails. This script trains a small
Llama-architecture model on a local corpus with MicroAdam (reference backend) and, before
every step, replays the kernel's decision for every top-k block from the state and the
gradient (a model of the CUDA code, in PyTorch):

* rungs (the kernel now): counts of |a| >= amax * (0.75, 0.55, 0.4, 0.28); the highest
  rung holding k keys is taken if it holds at most cap = topk_block / 2 candidates.
  (The kernel also falls back when more than 2048 candidates share one bin of its
  spanning histogram, possible only for top-k blocks over 4096; not modelled here.)
* prev_row (timed as a kernel variant and not kept, docs/performance.md): the smallest
  magnitude in the block's window row of the previous step (last step's k-th largest),
  rungs at 0.7x and 0.35x.

    python benchmarks/topk_paths.py --size small --steps 200 --out topk_paths.json
"""

from __future__ import annotations

import argparse
import json

import torch

from examples_import import examples_module
from microadam_dist import MicroAdam
from microadam_dist.ops.reference import dequantize_ef

common = examples_module("common")

RUNGS = (0.75, 0.55, 0.4, 0.28)
PREV_RUNGS = (0.7, 0.35)


def chosen(counts: torch.Tensor, k: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts (blocks, rungs), highest rung first: (fast path taken, candidates listed)."""
    ok = counts >= k
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], -1, dtype=torch.long))
    listed = counts.gather(1, first.clamp(min=0)[:, None])[:, 0]
    fast = (first >= 0) & (listed <= cap)
    return fast, torch.where(fast, listed, torch.zeros_like(listed))


def block_stats(p: torch.Tensor, st: dict, quant_block: int, m: int) -> dict | None:
    """The two schemes' decisions for the full top-k blocks of one param before its step."""
    t = int(st["step"])  # steps taken so far; this step writes row t % m
    B, k = int(st["layout"][2]), int(st["layout"][3])
    n = p.numel()
    nb = n // B
    if t == 0 or nb == 0 or B > 8192:
        return None
    a = p.grad.reshape(-1).float() + dequantize_ef(st["ef"], st["ef_min"], st["ef_max"], n, quant_block)
    mag = a[:nb * B].abs().reshape(nb, B)
    amax = mag.max(1).values
    counts = torch.stack([(mag >= amax[:, None] * r).sum(1) for r in RUNGS], 1)
    cap = ((B + 15) // 16 * 16) // 2
    fast, listed = chosen(counts, k, cap)
    prev = st["win_val"][(t - 1) % m].float().abs()[:nb * k].reshape(nb, k).min(1).values
    pcounts = torch.stack([(mag >= prev[:, None] * r).sum(1) for r in PREV_RUNGS], 1)
    pfast, plisted = chosen(pcounts, k, cap)
    return {"blocks": nb, "k": k, "zero_grad_blocks": int((p.grad.reshape(-1)[:nb * B].reshape(nb, B) == 0)
                                                          .all(1).sum()),
            "rungs_fast": int(fast.sum()), "rungs_listed": int(listed.sum()),
            "prev_fast": int(pfast.sum()), "prev_listed": int(plisted.sum())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=tuple(common.SIZES))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--corpus", default="python")
    ap.add_argument("--quant-block", type=int, default=4096)
    ap.add_argument("--topk-block", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tok = common.ByteTokenizer()
    tokens, _ = common.load_corpus(args.corpus, tok, 2_000_000, 10_000)
    model = common.build_model(None, args.size, tok.vocab_size, seed=0)
    m = 10
    opt = MicroAdam(model.parameters(), lr=args.lr, m=m, density=0.01, quant_block=args.quant_block,
                    topk_block=args.topk_block, backend="reference")
    names = {p: n for n, p in model.named_parameters()}
    per_step, per_tensor = [], {}
    for step in range(1, args.steps + 1):
        x = common.batch_at(tokens, step, 0, args.batch, args.seq_len)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        tot = {"blocks": 0, "zero_grad_blocks": 0, "rungs_fast": 0, "rungs_listed": 0, "prev_fast": 0,
               "prev_listed": 0}
        for p in model.parameters():
            st = opt.state.get(p)
            s = block_stats(p, st, args.quant_block, m) if st else None
            if s is None:
                continue
            for key in tot:
                tot[key] += s[key]
            agg = per_tensor.setdefault(names[p], {"blocks": 0, "rungs_fast": 0, "prev_fast": 0})
            for key in agg:
                agg[key] += s[key]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if tot["blocks"]:
            per_step.append({"step": step, "loss": loss.item(), **tot})
        if step % 20 == 0 and per_step:
            r = per_step[-1]
            print(f"step {step:4d} loss {loss.item():.3f}  fast path: rungs {r['rungs_fast'] / r['blocks']:.3f}, "
                  f"previous row {r['prev_fast'] / r['blocks']:.3f} of {r['blocks']} blocks", flush=True)
    blocks = sum(r["blocks"] for r in per_step)
    summary = {
        "blocks": blocks,
        "rungs_fast_fraction": sum(r["rungs_fast"] for r in per_step) / blocks,
        "prev_row_fast_fraction": sum(r["prev_fast"] for r in per_step) / blocks,
        "rungs_candidates_per_fast_block": sum(r["rungs_listed"] for r in per_step)
        / max(1, sum(r["rungs_fast"] for r in per_step)),
        "prev_row_candidates_per_fast_block": sum(r["prev_listed"] for r in per_step)
        / max(1, sum(r["prev_fast"] for r in per_step)),
        "zero_gradient_block_fraction": sum(r["zero_grad_blocks"] for r in per_step) / blocks,
    }
    print(f"\n{'scheme':<14} {'fast-path blocks':>17} {'candidates / block':>19}")
    print(f"{'rungs (now)':<14} {summary['rungs_fast_fraction']:>17.4f} {summary['rungs_candidates_per_fast_block']:>19.1f}")
    print(f"{'previous row':<14} {summary['prev_row_fast_fraction']:>17.4f} "
          f"{summary['prev_row_candidates_per_fast_block']:>19.1f}")
    worst = sorted(per_tensor.items(), key=lambda kv: kv[1]["rungs_fast"] / kv[1]["blocks"])[:5]
    print("tensors with the most general-path blocks (rungs):",
          ", ".join(f"{n} {v['rungs_fast'] / v['blocks']:.3f}" for n, v in worst))
    res = {"args": vars(args), "summary": summary, "per_tensor": per_tensor, "per_step": per_step}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"results: {args.out}")
    return res


if __name__ == "__main__":
    main()
