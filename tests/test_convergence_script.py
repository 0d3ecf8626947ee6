"""benchmarks/convergence.py and convergence_campaign.py on the CPU: optimizer entries, the
campaign's LR and plateau arithmetic, and --tiny runs.

The GPU experiment (docs/convergence.md) is this script at full size; here it must parse
its optimizer entries, refuse bad ones by name, and write rows whose state sizes follow
the hyper-parameters that were asked for.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from test_launch import ROOT, env, run

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import convergence  # noqa: E402
import convergence_campaign as campaign  # noqa: E402


def test_optimizer_entries_and_labels():
    spec = convergence.optimizer_spec("microadam/density=0.02/m=20/lr=1e-4")
    assert (spec["density"], spec["m"], spec["lr"], spec["ef_rounding"]) == (0.02, 20, 1e-4, "nearest")
    assert spec["label"] == "MicroAdam (m=20, 2%), LR 0.0001"
    assert convergence.optimizer_spec("microadam_sr")["label"] == "MicroAdam (m=10, 1%, stochastic EF)"
    assert convergence.optimizer_spec("adamw/lr=3e-4") == {"lr": 3e-4, "label": "AdamW, LR 0.0003"}


@pytest.mark.parametrize("entry,says", [
    ("sgd", "unknown 'sgd'"),
    ("microadam/foo=1", "key one of lr, m, density"),
    ("adamw/m=3", "key one of lr"),
    ("microadam/m=x", "m='x' is not a int"),
    ("microadam/density", "'density' is not key=value"),
])
def test_bad_optimizer_entries_are_named(entry, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        convergence.optimizer_spec(entry)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tiny_run_writes_one_row_per_entry(tmp_path):
    entries = ["adamw/lr=1e-3", "microadam", "microadam/density=0.05/m=4"]
    run([sys.executable, os.path.join(ROOT, "benchmarks", "convergence.py"), "--tiny", "--no-progress",
         "--backend", "reference", "--optimizers", ",".join(entries), "--out", str(tmp_path)],
        timeout=220, env=env())
    res = json.loads((tmp_path / "convergence_tiny.json").read_text())
    rows = res["finetune"]
    assert list(rows) == entries
    assert (tmp_path / "convergence_tiny.png").stat().st_size > 10_000
    assert len(res["pretrained_checksum"]) == 16 and int(res["pretrained_checksum"], 16) >= 0
    for name, r in rows.items():
        assert math.isfinite(r["final_eval_loss"]) and r["final_eval_loss"] < math.log(259), (name, r)
        assert r["label"] == convergence.optimizer_spec(name)["label"]
        assert r["eval_loss_vs_adamw"] == pytest.approx(r["final_eval_loss"] / rows[entries[0]]["final_eval_loss"])
    assert rows[entries[0]]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)
    # The window holds m * k entries of 4 bytes per top-k block: m=4 at 5% holds twice m=10 at 1%.
    win = {n: rows[n]["state_bytes_per_param"] - 0.5 for n in entries[1:]}  # less the 4-bit EF
    assert win[entries[2]] == pytest.approx(2 * win[entries[1]], rel=0.05), win


def test_weights_checksum_sees_one_ulp():
    import torch
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    state = {"a.weight": torch.randn(37, 5, generator=g), "b.bias": torch.randn(11, generator=g)}
    same = {k: v.clone() for k, v in reversed(list(state.items()))}  # order of the dict does not matter
    assert convergence.weights_checksum(state) == convergence.weights_checksum(same)
    j = int(torch.randint(0, 11, (1,), generator=g))
    same["b.bias"][j] = torch.nextafter(same["b.bias"][j], torch.tensor(math.inf))
    assert convergence.weights_checksum(state) != convergence.weights_checksum(same)


# -- the campaign (benchmarks/convergence_campaign.py) -------------------------------------


def _row(loss):
    return {"final_eval_loss": loss}


def test_campaign_best_lr_and_the_next_lr_beyond_an_edge():
    rows = {5e-4: _row(1.3), 1e-3: _row(1.2), 2e-3: _row(1.25)}
    assert campaign.best_lr(rows) == 1e-3 and campaign.beyond_edge(rows) is None
    rows[2e-3] = _row(1.1)
    assert campaign.best_lr(rows) == 2e-3 and campaign.beyond_edge(rows) == 4e-3
    rows = {5e-4: _row(1.0), 1e-3: _row(1.2), 2e-3: {"label": "x", "skipped": "deadline"}}
    assert campaign.best_lr(rows) == 5e-4 and campaign.beyond_edge(rows) == 2.5e-4
    assert campaign.best_lr({1e-3: {"skipped": "deadline"}}) is None
    assert campaign.beyond_edge({1e-3: _row(float("nan")), 2e-3: _row(1.0)}) == 4e-3  # NaN never wins


def test_campaign_last_fifth_gain_reads_the_eval_at_80_percent():
    curve = [{"step": s, "loss": 9.0} for s in range(1, 101)]
    for s, loss in ((50, 2.0), (80, 1.5), (90, 1.49), (100, 1.47)):
        curve[s - 1]["eval_loss"] = loss
    assert campaign.last_fifth_gain(curve) == pytest.approx((1.5 - 1.47) / 1.5)
    curve[79].pop("eval_loss")  # the last evaluation at or before step 80 is now step 50's
    assert campaign.last_fifth_gain(curve) == pytest.approx((2.0 - 1.47) / 2.0)
    assert campaign.last_fifth_gain(curve[:60]) is None  # one evaluation only


def test_authors_row_says_why_it_cannot_run_here():
    import torch
    import authors_microadam
    spec = convergence.optimizer_spec("ista/lr=1e-3/quant_block=64")
    assert spec["label"] == "authors' MicroAdam (m=10, 1%), quant_block 64, LR 0.001"
    with pytest.raises(ValueError, match="key one of lr, m, density, quant_block, alpha"):
        convergence.optimizer_spec("ista/ef_rounding=stochastic")
    model = torch.nn.Linear(4, 3)
    with pytest.raises(authors_microadam.Unavailable, match="bf16 CUDA params"):
        convergence.make_optimizer("ista", model, 1e-3, "reference")
    if not torch.cuda.is_available():
        with pytest.raises(authors_microadam.Unavailable, match="CUDA device"):
            authors_microadam.load()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_campaign_writes_the_regime_table(tmp_path):
    """The whole plan in miniature on the CPU: every run finished or says why not (the
    authors' kernels need CUDA), the tables follow the rows, and a deadline skips runs."""
    small = ["--tiny", "--no-progress", "--backend", "reference", "--pretrain-steps", "16", "--pretrain-cap", "24",
             "--finetune-steps", "8"]
    run([sys.executable, os.path.join(ROOT, "benchmarks", "convergence_campaign.py"), *small, "--out", str(tmp_path)],
        timeout=280, env=env())
    res = json.loads((tmp_path / "campaign.json").read_text())
    runs = res["runs"]
    for key, r in runs.items():
        if r["name"] == "ista":
            assert "CUDA" in r["skipped"], key
        else:
            assert math.isfinite(r["final_eval_loss"]), key
    t = res["tables"]
    assert [(g["weights"], g["start"]) for g in t["regimes"]] == list(campaign.REGIMES)
    for g in t["regimes"]:
        assert g["adamw"] == min(r["final_eval_loss"] for r in runs.values()
                                 if (r["weights"], r["start"], r["name"]) == (g["weights"], g["start"], "adamw"))
        assert g["gap_microadam"] == pytest.approx(g["microadam"] / g["adamw"] - 1)
        assert g["bytes_per_param"]["adamw"] == pytest.approx(8.0 if g["weights"] == "fp32" else 4.0, rel=1e-3)
        assert 0.85 < g["bytes_per_param"]["microadam"] < 1.0
    assert {d["name"] for d in t["dial"]} >= set(campaign.DIAL)
    assert [a["name"] for a in t["alpha"]] == ["microadam/alpha=0.1"] * 2
    assert res["starts"]["well"]["steps"] >= 16 and "last_fifth_gain" in res["starts"]["well"]
    assert (tmp_path / "campaign_regimes.png").stat().st_size > 10_000
    assert "| fp32 | weak:" in (tmp_path / "campaign.md").read_text()
    late = tmp_path / "late"
    run([sys.executable, os.path.join(ROOT, "benchmarks", "convergence_campaign.py"), *small,
         "--deadline-s", "1", "--out", str(late)], timeout=280, env=env())
    rows = json.loads((late / "campaign.json").read_text())["runs"].values()
    assert rows and all(r.get("skipped") == "deadline" for r in rows)


def test_campaign_takes_the_authors_topk_block_where_ours_can():
    rows = {1e-3: {"final_eval_loss": 1.0, "authors_topk_block": 28672}, 2e-3: {"skipped": "deadline"}}
    assert campaign.their_topk_block(rows) == 28672
    assert campaign.their_topk_block({1e-3: {"final_eval_loss": 1.0, "authors_topk_block": 49152}}) is None
    assert campaign.their_topk_block({}) is None


def test_campaign_fits_its_fine_tunes_before_the_deadline():
    runs = sum(n * campaign.PACE_GUESS[k] for k, n in campaign.PLANNED.items()) * 1.1  # step-equivalents
    assert campaign.fitted_steps(400, 50, seconds=1e6, pace=0.02) == 400
    steps = campaign.fitted_steps(400, 50, seconds=300, pace=0.02)
    assert steps % 50 == 0 and 100 <= steps < 400 and steps * runs * 0.02 <= 300 < (steps + 50) * runs * 0.02
    assert campaign.fitted_steps(400, 50, seconds=1, pace=0.02) == 100  # never below the floor
    assert campaign.fitted_steps(16, 8, seconds=-5, pace=1.0) == 16  # nor above what was asked
