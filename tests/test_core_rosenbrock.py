"""The paper's Rosenbrock demonstration: without error feedback top-k Adam stalls, with it MicroAdam gets there."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import rosenbrock  # noqa: E402


def test_error_feedback_rescues_topk_adam(tmp_path):
    torch.set_num_threads(1)
    start = float((torch.tensor(rosenbrock.START * 5) - 1.0).norm())
    runs = {v: rosenbrock.run(v, steps=6000, lr=2e-3, pairs=5) for v in ("adam", "topk", "topk_ef")}
    dist = {k: r[1] for k, r in runs.items()}
    print(dist, "start", start)
    assert dist["topk"] > 1.5, "top-k without EF was expected to stall far from the optimum"
    assert dist["topk_ef"] < 1.0, "MicroAdam (top-k + EF) did not reach the optimum region"
    assert dist["topk_ef"] < 0.5 * dist["topk"]
    assert dist["adam"] < 1.0 and start > 4.5
    out = tmp_path / "rosenbrock.png"
    rosenbrock.plot({k: r[0] for k, r in runs.items()}, dist, str(out))
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
