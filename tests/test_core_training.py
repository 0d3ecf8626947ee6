"""MicroAdam trains real models: a small classifier against AdamW, and under 2-process DDP."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import ddp_compare  # noqa: E402


def _run(name, lr, seed, steps=600):
    args = argparse.Namespace(steps=steps, batch=128, lr=lr, warmup=20, eval_samples=8192, dim=64,
                              classes=10, seed=seed)
    _, opt, losses, eval_loss = ddp_compare.train(name, args, 0, 1, torch.device("cpu"))
    return opt, losses, eval_loss


def test_microadam_within_10_percent_of_adamw(seed):
    """Same data stream, same steps; AdamW gets the better of two learning rates."""
    s = seed % 1000
    _, m_losses, m_eval = _run("microadam", 1e-2, s)
    adamw = min(_run("adamw", lr, s)[2] for lr in (3e-3, 1e-2))
    first = sum(m_losses[:20]) / 20
    assert m_eval < 0.75 * first, "MicroAdam did not train"
    assert m_eval <= 1.10 * adamw, f"MicroAdam held-out loss {m_eval:.4f} vs AdamW {adamw:.4f}"


def test_ddp_two_processes_end_identical(tmp_path, seed):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "examples", "ddp_compare.py"), "--optimizer", "microadam", "--steps", "40",
           "--seed", str(seed % 1000), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(out / "microadam_rank0.pt")
    r1 = torch.load(out / "microadam_rank1.pt")
    init = ddp_compare.build_model(64, 10, seed % 1000 + 1).state_dict()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert any(not torch.equal(r0[k], init[k]) for k in r0), "parameters did not move"
    assert "microadam" in proc.stdout
