"""One-rank DeepSpeed checks, run by tests/test_deepspeed.py after ds_worker.py.

    torchrun --nproc_per_node 1 --standalone tests/dist_scripts/ds_single.py OUT_DIR SEED CKPT_ROOT

Imports microadam_dist *before* DeepSpeed (the import hook path) and writes
`OUT_DIR/single.pt`:
  deepspeed_loaded_by_import: whether `import microadam_dist` pulled DeepSpeed in
  world_refusal: loading the 2-rank ZeRO-2 checkpoint with 1 rank (error, untouched)
  bad[label]: the error of deepspeed.initialize for a bad `optimizer.params`, and
      whether the model was left as it was (no bf16 cast, same values)
  client_in_backward_error: deepspeed.initialize(optimizer=MicroAdam(step_in_backward=True))
  case_insensitive: the optimizer class built from `"type": "microADAM"`
"""

from __future__ import annotations

import os
import sys

import torch

import microadam_dist  # noqa: E402,F401  (before deepspeed on purpose)

LOADED_BY_IMPORT = "deepspeed" in sys.modules

import deepspeed  # noqa: E402
from ds_common import ds_config, init_gloo, make_model, param_groups, same, snapshot  # noqa: E402
from microadam_dist.teardown import finish  # noqa: E402

BAD = {
    "unknown key": {"k_initt": 0.01},
    "density out of range": {"density": 2.0},
    "topk_block too large": {"topk_block": 40000},
    "ef_rounding choice": {"ef_rounding": "up"},
    "alpha -2": {"alpha": -2},
    "step_in_backward": {"step_in_backward": True},
}


def main() -> None:
    out_dir, seed, ckpt_root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    init_gloo()
    res: dict = {"deepspeed_loaded_by_import": LOADED_BY_IMPORT}

    model = make_model(seed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                           config=ds_config(2, "bf16", clip=1.0, scheduler=True))
    before = snapshot(engine)
    try:
        engine.load_checkpoint(os.path.join(ckpt_root, "stage2"))
        res["world_refusal"] = {"error": None}
    except ValueError as exc:
        res["world_refusal"] = {"error": str(exc)}
    res["world_refusal"]["untouched"] = same(before, snapshot(engine))

    res["bad"] = {}
    for label, params in BAD.items():
        model = make_model(seed)
        ref = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = ds_config(2, "bf16", **params)
        err = None
        try:
            deepspeed.initialize(model=model, model_parameters=param_groups(model), config=cfg)
        except ValueError as exc:
            err = str(exc)
        untouched = all(p.dtype == torch.float32 and torch.equal(p, ref[n]) for n, p in model.named_parameters())
        res["bad"][label] = {"error": err, "untouched": untouched}

    cfg = ds_config(1, "fp32")
    cfg["zero_optimization"]["elastic_checkpoint"] = True
    try:
        model = make_model(seed)
        deepspeed.initialize(model=model, model_parameters=param_groups(model), config=cfg)
        res["elastic_error"] = None
    except ValueError as exc:
        res["elastic_error"] = str(exc)

    # A MicroAdam(step_in_backward=True) instance handed to deepspeed.initialize: refused too.
    cfg = ds_config(1, "fp32")
    del cfg["optimizer"]
    model = make_model(seed)
    try:
        deepspeed.initialize(model=model, optimizer=microadam_dist.MicroAdam(
            param_groups(model), step_in_backward=True), config=cfg)
        res["client_in_backward_error"] = None
    except ValueError as exc:
        res["client_in_backward_error"] = str(exc)

    cfg = ds_config(1, "fp32")
    cfg["optimizer"]["type"] = "microADAM"
    model = make_model(seed)
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=cfg)
    res["case_insensitive"] = type(engine.basic_optimizer).__name__
    torch.save(res, os.path.join(out_dir, "single.pt"))
    finish()


if __name__ == "__main__":
    main()
