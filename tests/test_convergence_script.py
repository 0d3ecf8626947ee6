"""benchmarks/convergence.py on the CPU: its --optimizers variants and a --tiny run.

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
