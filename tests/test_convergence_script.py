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
import re
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


def test_a_fp32_run_after_a_bf16_one_gets_the_first_rotary_frequencies():
    """The rotary frequencies are buffers no state_dict carries: model.to(bf16) rounds them,
    and a later fp32 run must compute with the values the model was built with."""
    import torch
    model = convergence.common.build_model(None, "tiny", 259, seed=int.from_bytes(os.urandom(2), "little"))
    first = {n: b.clone() for n, b in model.named_buffers()}
    assert first and all(b.dtype == torch.float32 for b in first.values())
    convergence.cast_weights(model, torch.float32)
    convergence.cast_weights(model, torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for _, b in model.named_buffers())
    assert next(model.parameters()).dtype == torch.bfloat16
    rounded = {n: b.float() for n, b in model.named_buffers()}
    assert any(not torch.equal(rounded[n], first[n]) for n in first)  # what plain .to(float32) would give
    convergence.cast_weights(model, torch.float32)
    assert {n: b for n, b in model.named_buffers()}.keys() == first.keys()
    for n, b in model.named_buffers():
        assert b.dtype == torch.float32 and torch.equal(b, first[n]), n


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


def test_authors_stand_ins_serve_their_import_only(tmp_path, monkeypatch):
    """A module importing wandb and gpustat at its top imports under the stand-ins and keeps
    them; afterwards a probe of either (as accelerate makes when transformers is imported in
    the same process) finds nothing and does not raise."""
    import importlib
    import importlib.util
    import authors_microadam
    missing = [n for n in ("wandb", "gpustat") if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("wandb and gpustat are both installed: no stand-in is made")
    name = f"logs_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("import wandb\nimport gpustat\ndef log(x):\n    wandb.log(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with authors_microadam.stand_ins("wandb", "gpustat"):
        module = importlib.import_module(name)
    assert module.log({"loss": 1.0}) is None
    for n in missing:
        assert n not in sys.modules
        assert importlib.util.find_spec(n) is None


SMALL = ["--tiny", "--no-progress", "--backend", "reference", "--pretrain-steps", "16", "--pretrain-cap", "24",
         "--finetune-steps", "8", "--threads", "1", "--dial", "microadam/m=5/density=0.05,microadam_sr"]


def _campaign(out, *extra) -> dict:
    script = os.path.join(ROOT, "benchmarks", "convergence_campaign.py")
    run([sys.executable, script, *SMALL, *extra, "--out", str(out)], timeout=280, env=env())
    return json.loads((out / "campaign.json").read_text())


@pytest.fixture(scope="module")
def serial_campaign(tmp_path_factory):
    """The whole plan in miniature on the CPU, every run in one process."""
    out = tmp_path_factory.mktemp("serial")
    return out, _campaign(out, "--workers", "1")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_campaign_writes_the_regime_table(serial_campaign, tmp_path):
    """Every run finished or says why not (the authors' kernels need CUDA), the plan ran the
    runs it counts, the tables follow the rows, and a deadline skips runs."""
    out, res = serial_campaign
    runs = res["runs"]
    for key, r in runs.items():
        if r["name"] == "ista":
            assert "CUDA" in r["skipped"], key
        else:
            assert math.isfinite(r["final_eval_loss"]), key
    lrs = res["args"]["lrs"]
    dial = res["args"]["dial"]
    counts = campaign.plan_counts(campaign.REGIMES, len(lrs), 1, dial, res["args"]["dial_lr_factors"])
    counts["adamw"] -= campaign.EDGE_STEPS
    counts["microadam"] -= campaign.EDGE_STEPS + 1  # no run at the authors' top-k block without their rows
    beyond = [r for r in runs.values() if r["name"] in ("adamw", "microadam") and r["lr"] not in lrs]
    assert len(beyond) <= 2 * campaign.EDGE_STEPS * len(campaign.REGIMES)
    ran = {k: sum(campaign.kind(r["name"]) == k for r in runs.values() if r not in beyond) for k in counts}
    assert ran == counts
    t = res["tables"]
    assert [(g["weights"], g["start"]) for g in t["regimes"]] == list(campaign.REGIMES)
    for g in t["regimes"]:
        assert g["adamw"] == min(r["final_eval_loss"] for r in runs.values()
                                 if (r["weights"], r["start"], r["name"]) == (g["weights"], g["start"], "adamw"))
        assert g["gap_microadam"] == pytest.approx(g["microadam"] / g["adamw"] - 1)
        assert g["bytes_per_param"]["adamw"] == pytest.approx(8.0 if g["weights"] == "fp32" else 4.0, rel=1e-3)
        assert 0.85 < g["bytes_per_param"]["microadam"] < 1.0
    d = t["dial"]
    assert {x["name"] for x in d["rows"]} == {"microadam", *dial}
    ours = t["regimes"][[(g["weights"], g["start"]) for g in t["regimes"]].index(("fp32", "well"))]
    for x in d["rows"]:
        tried = {float(lr): loss for lr, loss in x["losses"].items()}
        if x["name"] != "microadam":
            assert sorted(tried) == [ours["microadam_lr"], 2 * ours["microadam_lr"]], x
        assert x["loss"] == min(tried.values()) and tried[x["lr"]] == x["loss"]
        assert x["gap_to_best_adamw"] == pytest.approx(x["loss"] / ours["adamw"] - 1)
    sizes = [x["bytes_per_param"] for x in d["rows"]]
    assert sizes == sorted(sizes)
    within = [x["name"] for x in d["rows"] if x["gap_to_best_adamw"] <= 0.02]
    assert d["cheapest_within"] == (within[0] if within else None)
    assert [a["name"] for a in t["alpha"]] == ["microadam/alpha=0.1"] * 2
    assert res["starts"]["well"]["steps"] >= 16 and "last_fifth_gain" in res["starts"]["well"]
    assert (out / "campaign_regimes.png").stat().st_size > 10_000
    md = (out / "campaign.md").read_text()
    assert "| fp32 | weak:" in md and "Model tiny" in md and "Fine-tunes: 1 process," in md
    late = _campaign(tmp_path, "--deadline-s", "1")
    assert late["runs"] and all(r.get("skipped") == "deadline" for r in late["runs"].values())
    assert late["starts"]["well"]["stopped"] == "deadline share"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_campaign_in_two_workers_gives_the_serial_results(serial_campaign, tmp_path):
    """Two worker processes run the runs of one process, with the same held-out curves; with a
    deadline, a probe times both optimizers side by side first."""
    _, serial = serial_campaign
    res = _campaign(tmp_path, "--workers", "2", "--deadline-s", "600", "--starts", str(tmp_path / "starts"))
    assert res["workers"] == 2 and res["probe"]["runs_side_by_side"] == 2
    assert set(res["probe"]["seconds_per_step"]) == {"adamw", "microadam"}
    assert res["starts"]["well"]["checksum"] == serial["starts"]["well"]["checksum"]
    assert list(res["runs"]) == list(serial["runs"])
    for key, r in res["runs"].items():
        curve = [(c["step"], c["eval_loss"]) for c in r.get("curve", ()) if "eval_loss" in c]
        assert curve == [(c["step"], c["eval_loss"]) for c in serial["runs"][key].get("curve", ()) if "eval_loss" in c]
        assert r.get("final_eval_loss") == serial["runs"][key].get("final_eval_loss"), key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_campaign_reuses_kept_starts(serial_campaign, tmp_path):
    """--starts keeps each start a campaign pre-trained; a later campaign loads it instead of
    pre-training (same weights, same fine-tunes; other batches under another --finetune-seed)
    and refuses a start of another model."""
    _, serial = serial_campaign
    kept = tmp_path / "starts"
    first = _campaign(tmp_path / "a", "--workers", "1", "--regimes", "fp32/well", "--starts", str(kept))
    assert "loaded" not in first["starts"]["well"] and (kept / "well.pt").exists()
    assert first["starts"]["well"]["checksum"] == serial["starts"]["well"]["checksum"]
    res = _campaign(tmp_path / "b", "--workers", "1", "--regimes", "fp32/well", "--starts", str(kept),
                    "--dial", "microadam/m=5/density=0.05", "--dial-lr-factors", "0.5,1")
    well = res["starts"]["well"]
    assert well["loaded"] == str(kept / "well.pt") and "weak" not in res["starts"]
    assert well["checksum"] == serial["starts"]["well"]["checksum"]
    assert {k: well[k] for k in ("steps", "last_fifth_gain", "size", "seq_len", "max_tokens")} == {
        "steps": first["starts"]["well"]["steps"], "last_fifth_gain": first["starts"]["well"]["last_fifth_gain"],
        "size": "tiny", "seq_len": 64, "max_tokens": 300_000}
    for key in ("fp32/well/adamw@0.002", "fp32/well/microadam@0.002"):
        assert res["runs"][key]["final_eval_loss"] == serial["runs"][key]["final_eval_loss"], key
    best = res["tables"]["regimes"][0]["microadam_lr"]
    dial = {x["name"]: x for x in res["tables"]["dial"]["rows"]}
    assert sorted(float(lr) for lr in dial["microadam/m=5/density=0.05"]["losses"]) == [best / 2, best]
    other = _campaign(tmp_path / "d", "--workers", "1", "--regimes", "fp32/well", "--starts", str(kept),
                      "--dial", "", "--finetune-seed", "1")
    assert other["starts"]["well"]["checksum"] == well["checksum"]
    for key in ("fp32/well/adamw@0.002", "fp32/well/microadam@0.002"):
        assert other["runs"][key]["final_eval_loss"] != res["runs"][key]["final_eval_loss"], key
    assert "(batch seed 1)" in (tmp_path / "d" / "campaign.md").read_text()
    records = json.loads((kept / "starts.json").read_text())
    records["well"]["size"] = "small"
    (kept / "starts.json").write_text(json.dumps(records))
    with pytest.raises(AssertionError, match=re.escape("was made with {'size': 'small', 'seq_len': 64}, not --size")):
        _campaign(tmp_path / "c", "--workers", "1", "--regimes", "fp32/well", "--starts", str(kept))


def test_campaign_takes_the_authors_topk_block_where_ours_can():
    rows = {1e-3: {"final_eval_loss": 1.0, "authors_topk_block": 28672}, 2e-3: {"skipped": "deadline"}}
    assert campaign.their_topk_block(rows) == 28672
    assert campaign.their_topk_block({1e-3: {"final_eval_loss": 1.0, "authors_topk_block": 49152}}) is None
    assert campaign.their_topk_block({}) is None


@pytest.mark.parametrize("workers,alone", [(1, 1.0), (8, 0.25), (8, 0.05)])
def test_campaign_fits_its_fine_tunes_before_the_deadline(workers, alone):
    paces = {"adamw": 0.02, "microadam": 0.03, "microadam_sr": 0.03, "ista": 0.05}
    counts = {"adamw": 14, "microadam": 40, "microadam_sr": 5, "ista": 0}
    # Seconds per fine-tuning step of the whole plan: the runs shared by the workers, then two
    # runs of the slowest kind that ran (MicroAdam) after the others, alone: `alone` of its pace
    # with every worker busy, but no less than its share of the GPU.
    per_step = (14 * 0.02 + 45 * 0.03) / workers + 2 * 0.03 * max(alone, 1 / workers)
    fit = lambda seconds, steps=400, every=50: campaign.fitted_steps(steps, every, seconds, paces, counts, workers,
                                                                     alone)
    assert fit(1e6) == 400
    steps = fit(100 * per_step + 2)
    assert steps % 50 == 0 and steps == 100
    steps = fit(333 * per_step)
    assert steps == 300 and steps * per_step <= 333 * per_step < (steps + 50) * per_step
    assert fit(1) == 100  # never below the floor
    assert fit(-5, steps=16, every=8) == 16  # nor above what was asked


def test_campaign_counts_the_runs_of_its_plan():
    n = campaign.plan_counts([("bf16", "well"), ("fp32", "weak")], 3, 2, ["microadam/density=0.1", "microadam_sr"],
                              (1.0, 2.0))
    # grids 3 + 3 and two LRs beyond an edge each; ours: top-k block (bf16, well), 2 alphas
    # (fp32, weak), the dial's density at 2 LRs; the stochastic EF row per regime and the
    # dial's at twice ours' LR; the authors' at 3 LRs (bf16, well).
    assert n == {"adamw": 8, "microadam": 8 + 1 + 2 + 2, "microadam_sr": 3, "ista": 3}
