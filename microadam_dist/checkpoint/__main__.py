"""Offline checkpoint tool.

    python -m microadam_dist.checkpoint reshard --src DIR --dst DIR --world-size M [--set topk_block=2048]
        [--model-src DIR]
    python -m microadam_dist.checkpoint consolidate --src DIR --dst FILE [--model-src DIR]
    python -m microadam_dist.checkpoint split --src FILE --dst DIR --world-size M
    python -m microadam_dist.checkpoint verify PATH

`reshard` also accepts a consolidated FILE as --src (then it is `split`), and
`reshard` / `consolidate` accept an FSDP DCP checkpoint: the stock form that torch's
`get_optimizer_state_dict` + `dcp.save` write (our `integrations.fsdp.save_checkpoint`,
Accelerate, Lightning, torchtitan; the optimizer under "optim" or "optimizer", nested or
flattened (flatten_optimizer_state_dict=True, as torchtitan saves it), the model under
"model", at the top level (torchtitan) or, with --model-src, in another DCP dir), or the
rank-keyed form of older helper checkpoints (FSDP2 or DDP); the output is DCP in the
same form (keys and layout), and
`reshard` accepts a DeepSpeed ZeRO-1/2/3 save_dir or tag dir (output: a save_dir
holding the same tag and `latest`). It prints
a JSON report: entries kept in the window, folded into the EF, EF blocks copied
exactly or requantized. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .dcp import consolidate_dcp, is_dcp, reshard_dcp
from .io import CheckpointError, read_meta, verify_file
from .reshard import ReshardError
from .sharded import FORMAT, consolidate_dir, reshard_dir, split_file
from .zero import is_deepspeed, reshard_zero

_INT_FIELDS = ("m", "topk_block", "quant_block")
_FLOAT_FIELDS = ("lr", "eps", "weight_decay", "density", "alpha")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        if key in _INT_FIELDS:
            out[key] = int(value)
        elif key in _FLOAT_FIELDS:
            out[key] = float(value)
        elif key in ("ef_rounding", "nonfinite", "backend"):
            out[key] = value
        else:
            raise SystemExit(f"--set {key}: not a hyper-parameter that can change at reshard; "
                             f"accepted: {', '.join(_INT_FIELDS + _FLOAT_FIELDS)}, ef_rounding, nonfinite, backend")
    return out


def _check_sharded(src: str) -> None:
    meta = read_meta(src, verify=False)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{src} has format {meta.get('format')!r}; this tool reads {FORMAT!r} checkpoints "
            "(microadam_dist.checkpoint.sharded.save_sharded)")


def _check_model_src(src: str, model_src: str) -> None:
    """--model-src only serves a DCP --src (the optimizer alone, as Accelerate saves it):
    refuse it elsewhere rather than ignore it."""
    if not is_dcp(src):
        kind = ("a DeepSpeed checkpoint" if is_deepspeed(src) else "a file" if os.path.isfile(src)
                else "a directory without DCP's .metadata" if os.path.isdir(src) else "missing")
        raise SystemExit(f"--model-src {model_src}: only read with an FSDP DCP checkpoint as --src (a "
                         f"directory holding DCP's .metadata, such as Accelerate's optimizer_0); --src "
                         f"{src} is {kind}: drop --model-src or point --src at the DCP optimizer directory")
    if not is_dcp(model_src):
        raise SystemExit(f"--model-src {model_src}: not a DCP checkpoint (no .metadata); expected the "
                         "DCP directory holding the model (Accelerate's pytorch_model_fsdp_0)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microadam_dist.checkpoint",
                                 description="Reshard, consolidate, split or verify MicroAdam checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reshard", help="move a checkpoint to another world size")
    r.add_argument("--src", required=True)
    r.add_argument("--dst", required=True)
    r.add_argument("--world-size", type=int, required=True)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a hyper-parameter for the destination (block sizes, density, m)")
    c = sub.add_parser("consolidate", help="all shards -> one single-process file")
    c.add_argument("--src", required=True)
    c.add_argument("--dst", required=True)
    for p in (r, c):
        p.add_argument("--model-src", default=None, metavar="DIR",
                       help="DCP dir holding the model params, for a DCP checkpoint whose --src holds "
                            "the optimizer alone (Accelerate's optimizer dir)")
    s = sub.add_parser("split", help="a consolidated file -> a sharded checkpoint")
    s.add_argument("--src", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--world-size", type=int, required=True)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v = sub.add_parser("verify", help="check every file's size and sha256")
    v.add_argument("path")
    args = ap.parse_args(argv)

    try:
        if getattr(args, "world_size", 1) < 1:
            raise SystemExit(f"--world-size {args.world_size}: expected an integer >= 1")
        if args.cmd == "verify":
            if os.path.isdir(args.path):
                meta = read_meta(args.path, verify=True)
                print(json.dumps({"ok": True, "files": len(meta["files"]), "step": meta.get("step"),
                                  "world_size": meta.get("world_size")}))
            else:
                verify_file(args.path)
                print(json.dumps({"ok": True}))
            return 0
        if getattr(args, "model_src", None) is not None:
            _check_model_src(args.src, args.model_src)
        if args.cmd == "reshard" and is_deepspeed(args.src):
            if args.set:
                raise SystemExit("--set is not supported for DeepSpeed checkpoints: DeepSpeed takes the "
                                 "hyper-parameters from the JSON of the run that loads them")
            rep = reshard_zero(args.src, args.dst, args.world_size)
        elif args.cmd in ("reshard", "consolidate") and is_dcp(args.src):
            # An FSDP checkpoint (DCP): torch's stock form or the rank-keyed one.
            rep = (reshard_dcp(args.src, args.dst, args.world_size, model_src=args.model_src,
                               **_overrides(args.set))
                   if args.cmd == "reshard" else consolidate_dcp(args.src, args.dst, model_src=args.model_src))
        elif args.cmd == "consolidate":
            _check_sharded(args.src)
            rep = consolidate_dir(args.src, args.dst)
        elif args.cmd == "split" or (args.cmd == "reshard" and os.path.isfile(args.src)):
            rep = split_file(args.src, args.dst, args.world_size, **_overrides(args.set))
        else:
            _check_sharded(args.src)
            rep = reshard_dir(args.src, args.dst, args.world_size, **_overrides(args.set))
    except (CheckpointError, ReshardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"ok": True, "dst": os.path.abspath(args.dst), **dataclasses.asdict(rep)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
