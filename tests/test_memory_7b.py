"""benchmarks/memory_7b.py --tiny on the CPU: every row runs, the JSON and the table are written,
and the step_in_backward row trains exactly as MicroAdam's ordinary row (same losses to the
last bit on the reference backend) while stepping inside backward."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_7b  # noqa: E402


def test_tiny_rows(tmp_path):
    path = tmp_path / "m.json"
    out = memory_7b.main(["--tiny", "--out", str(path)])
    assert json.load(open(path))["table"] == out["table"]
    rows = out["rows"]
    assert list(rows) == list(memory_7b.ROWS)
    assert len(out["table"].splitlines()) == 2 + len(rows)
    sib, micro = rows["microadam_step_in_backward"], rows["microadam"]
    assert sib["losses"] == micro["losses"] and len(sib["losses"]) == 3
    assert sib["groups_per_step"] == 1 and micro["groups_per_step"] is None  # the tiny model fits one bucket
    assert sib["state_bytes"] == micro["state_bytes"] > 0
    assert all(r["step_vs_adamw"] > 0 and r["peak_gb"] is None for r in rows.values())
