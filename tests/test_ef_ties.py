"""benchmarks/ef_ties.py: its count of elements near a rounding half, and a short CPU run."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import ef_ties  # noqa: E402


def test_near_half_rates_count_the_elements_within_1e5_of_a_half(seed):
    gen = torch.Generator().manual_seed(seed)
    qb = 4096
    # Each block spans [0, 15] exactly (scale 1), so q = a; the rest lie on whole or quarter steps.
    a = torch.randint(0, 16, (2 * qb,), generator=gen).float() + 0.25 * torch.randint(0, 2, (2 * qb,), generator=gen)
    a = a.clamp(max=15.0)
    a[0::qb], a[1::qb] = 0.0, 15.0
    picks = torch.randperm(2 * qb - 2, generator=gen)[:37] + 2
    picks = picks[(picks % qb) > 1]
    a[picks] = 3.5 + 4e-6 * (torch.rand(picks.numel(), generator=gen) * 2 - 1)  # within 1e-5 of a half
    r = ef_ties.near_half_rates(a, qb)
    assert abs(r["elements"] - picks.numel() / a.numel()) < 1e-12
    units = torch.zeros(a.numel() // 8, dtype=torch.bool)
    units[picks // 8] = True
    assert abs(r["units"] - units.float().mean().item()) < 1e-12
    assert abs(r["warps"] - units.view(-1, 32).any(1).float().mean().item()) < 1e-12


def test_short_run_reports_every_step(tmp_path):
    out = tmp_path / "ties.json"
    res = ef_ties.main(["--blocks", "4", "--steps", "2", "--out", str(out)])
    for case in ("same_gradient", "fresh_gradient"):
        assert [r["step"] for r in res[case]] == [1, 2]
        assert all(0.0 <= r["elements"] <= r["units"] <= r["warps"] <= 1.0 for r in res[case])
    assert out.exists()
