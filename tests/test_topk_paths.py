"""benchmarks/topk_paths.py: its model of the kernel's rung choice, and a short CPU run."""

from __future__ import annotations

import os
import sys

import torch
from test_launch import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import topk_paths  # noqa: E402


def test_rung_choice_is_the_highest_holding_k_within_cap():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    k, cap = 5, 40
    counts = torch.randint(0, 60, (500, 4), generator=gen).sort(1).values  # counts grow down the rungs
    fast, listed = topk_paths.chosen(counts, k, cap)
    for c, f, n in zip(counts.tolist(), fast.tolist(), listed.tolist()):
        first = next((i for i, x in enumerate(c) if x >= k), None)  # independent of chosen()'s tensor code
        expect = first is not None and c[first] <= cap
        assert f == expect and n == (c[first] if expect else 0), (c, f, n)


def test_short_run_counts_every_full_block(tmp_path):
    res = topk_paths.main(["--size", "tiny", "--steps", "4", "--batch", "2", "--seq-len", "32",
                           "--out", str(tmp_path / "paths.json")])
    per_step = res["per_step"]
    assert [r["step"] for r in per_step] == [2, 3, 4]  # step 1 has no state yet
    # tiny: every full 4096-block of the 2-D weights (the 1-D norms of 128 hold none).
    blocks = sum(p.numel() // 4096 for p in topk_paths.common.build_model(None, "tiny").parameters())
    assert all(r["blocks"] == blocks for r in per_step), (blocks, per_step)
    s = res["summary"]
    assert 0.0 <= s["rungs_fast_fraction"] <= 1.0 and 0.0 <= s["prev_row_fast_fraction"] <= 1.0
    assert (tmp_path / "paths.json").stat().st_size > 0
