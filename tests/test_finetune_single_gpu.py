"""examples/finetune_single_gpu.py on the CPU (tiny Llama, byte tokens, activation checkpointing):
the ordinary step and --step-in-backward, both with two accumulated micro-batches per step,
give the same losses to the last bit (the reference backend makes the two modes bitwise
equal: tests/test_step_in_backward.py), write their metrics and print the memory line."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import finetune_single_gpu  # noqa: E402

ARGS = ["--steps", "2", "--grad-accum", "2", "--batch-size", "2", "--seq-len", "32", "--max-tokens", "100000",
        "--eval-windows", "2", "--warmup", "1", "--lr", "1e-2", "--no-progress"]


def run(tmp_path, capsys, *extra):
    path = tmp_path / f"metrics{len(extra)}.jsonl"
    summary = finetune_single_gpu.main([*ARGS, "--metrics", str(path), *extra])
    rows = [json.loads(line) for line in open(path)]
    return rows, summary, capsys.readouterr().out


def test_step_in_backward_matches_ordinary_step(tmp_path, capsys):
    rows_a, sum_a, out_a = run(tmp_path, capsys)
    rows_b, sum_b, out_b = run(tmp_path, capsys, "--step-in-backward")
    assert [r["step"] for r in rows_a[:-1]] == [1, 2] and rows_a[-1]["summary"] == sum_a
    assert [r["loss"] for r in rows_a[:-1]] == [r["loss"] for r in rows_b[:-1]]
    assert sum_a["final_eval_loss"] == sum_b["final_eval_loss"]
    assert sum_b["optimizer"] == "microadam step_in_backward" and sum_b["optimizer_state_bytes"] > 0
    for out in (out_a, out_b):
        assert out.strip().splitlines()[-1].startswith("memory: peak ")
