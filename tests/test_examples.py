"""The fine-tuning examples run end to end on 2 CPU processes (gloo), a few steps each:
examples/hf_trainer.py (HF Trainer, --deepspeed JSON naming MicroAdam) and
examples/finetune_deepspeed.py --compare (what scripts/demo.sh runs). Each must write
its metrics JSONL and loss-curve PNG, print the comparison, and lower the loss.

The shipped JSONs are used as they are (the scripts adapt them to the CPU), so a JSON
change that breaks the examples fails here. examples/finetune_fsdp2.py has its own
test (tests/test_fsdp_example.py).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_launch import ROOT, env, run

pytestmark = pytest.mark.slow

CONFIGS = os.path.join(ROOT, "examples", "configs")
# Small and short: the byte-level tiny Llama learns the byte statistics within a few steps.
SHORT = ["--max_tokens", "200000", "--eval_windows", "8", "--seq_len", "64"]


def torchrun(script: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "examples", script), *args]
    return run(cmd, timeout=240, env=env()).stdout


def read_jsonl(path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in open(path)]
    summary = next(r["summary"] for r in rows if "summary" in r)
    return [r for r in rows if "summary" not in r], summary


@pytest.mark.timeout(300)
def test_hf_trainer_example(tmp_path):
    out = tmp_path / "hf"
    stdout = torchrun("hf_trainer.py", "--deepspeed", os.path.join(CONFIGS, "ds_zero2_microadam.json"),
                      "--out", str(out), "--max_steps", "8", "--warmup_steps", "2", "--disable_tqdm", "true",
                      *SHORT)
    rows, summary = read_jsonl(out / "zero2_microadam.jsonl")
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9)), rows
    assert len(evals) == 4 and evals[-1] == summary["final_eval_loss"], rows  # every max_steps // 4 steps
    assert train[-1] < train[0] - 0.3 and evals[-1] < evals[0], (train, evals)  # ln(259) = 5.56 at the start
    assert summary["optimizer"] == "DeepSpeedMicroAdam" and summary["zero_stage"] == 2, summary
    assert summary["world_size"] == 2 and summary["steps"] == 8, summary
    assert 0.85 < summary["state_bytes_per_param"] < 0.95, summary  # m=10, density 1%: ~0.90
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert "CPU run: bf16 off" in stdout and "plot: " in stdout, stdout


@pytest.mark.timeout(300)
def test_finetune_deepspeed_compare(tmp_path):
    """The demo's command, shortened: AdamW pre-trains on one corpus, then MicroAdam and the
    AdamW twin fine-tune from those weights on another, in the same processes."""
    out = tmp_path / "ds"
    stdout = torchrun("finetune_deepspeed.py", "--deepspeed_config",
                      os.path.join(CONFIGS, "ds_zero2_microadam.json"), "--compare",
                      os.path.join(CONFIGS, "ds_zero2_adamw.json"), "--out", str(out), "--steps", "6",
                      "--pretrain-steps", "8", "--data", "cpp", "--save-start", str(tmp_path / "start.pt"),
                      "--eval-every", "3", "--max-tokens", "200000", "--eval-windows", "8", "--seq-len", "64",
                      "--no-progress")
    pre_rows, pre = read_jsonl(out / "pretrain" / "pretrain.jsonl")
    assert pre["optimizer"] == "AdamW" and pre["steps"] == 8 and pre["data"] == "python", pre
    starts = []
    for label, optimizer, bytes_per_param in (("zero2_microadam", "DeepSpeedMicroAdam", 0.9),
                                              ("zero2_adamw", "AdamW", 8.0)):
        rows, summary = read_jsonl(out / f"{label}.jsonl")
        assert summary["optimizer"] == optimizer and summary["steps"] == 6 and summary["data"] == "cpp", summary
        assert summary["state_bytes_per_param"] == pytest.approx(bytes_per_param, abs=0.01), summary
        train = [r["loss"] for r in rows if "loss" in r]
        assert train[-1] < train[0], rows
        assert rows[0]["step"] == 0 and "loss" not in rows[0], rows  # the start's held-out loss
        starts.append(rows[0]["eval_loss"])
    assert starts[0] == starts[1] < 5.56, starts  # one start for both, trained (ln 259 = 5.56 untrained)
    assert "start: 8 steps of AdamW on python" in stdout, stdout
    assert "zero2_microadam / zero2_adamw held-out loss:" in stdout, stdout
    assert (out / "loss_curves.png").stat().st_size > 10_000
    import torch
    assert torch.load(tmp_path / "start.pt")["lm_head.weight"].shape == (259, 128)
