"""benchmarks/peers.py: state counting, and a tiny CPU run where some peers fail."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from test_launch import ROOT

import microadam_dist

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import peers  # noqa: E402


class Packed(torch.Tensor):
    """A quantized-state stand-in: a wrapper subclass whose data lives in two inner tensors."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32)

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_state_bytes_counts_inner_tensors_and_shared_tensors_once():
    n = int(torch.randint(300, 900, ()))
    shared = torch.zeros(256)                     # a code map held by two params
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    opt.state = {
        "a": {"exp_avg": Packed(torch.zeros(n, dtype=torch.uint8), torch.zeros(n // 64 + 1)),
              "qmap": shared, "step": torch.tensor(1.0), "lr": 0.1},
        "b": {"exp_avg": torch.zeros(n, dtype=torch.bfloat16), "qmap": shared},
    }
    held, managed = peers.state_bytes(opt)
    assert held == n + 4 * (n // 64 + 1) + 4 * 256 + 4 + 2 * n
    assert managed == 0


def test_tiny_cpu_run_measures_what_runs_and_gives_reasons(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # not importable
    real_step = microadam_dist.MicroAdam.step

    def step(self, *a, **k):
        if self.param_groups[0]["quant_block"] == 64:
            raise RuntimeError("planted step failure")
        return real_step(self, *a, **k)

    monkeypatch.setattr(microadam_dist.MicroAdam, "step", step)
    rows = ["fp32:adamw_fused", "fp32:adamw_foreach", "bf16:bnb_adamw8bit",
            "fp32:authors_microadam_q100000", "fp32:microadam_q64", "bf16:adamw_foreach",
            "fp32:microadam_q4096"]
    out = tmp_path / "peers.json"
    res = peers.main(["--tiny", "--device", "cpu", "--rows", ",".join(rows), "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert (tmp_path / "peers.png").stat().st_size > 0
    got = {(r["param_dtype"], r["optimizer"]): r for r in res["rows"]}
    assert [f"{d}:{n}" for d, n in got] == rows
    shapes = peers.llama_shapes(*(res["shapes"][k] for k in ("hidden", "intermediate", "layers", "vocab")))
    numels = [torch.Size(s).numel() for s in shapes]
    n, t = sum(numels), len(numels)
    assert res["params"] == n and res["shapes"]["tensors"] == t

    fused, foreach = got["fp32", "adamw_fused"], got["fp32", "adamw_foreach"]
    for r in (fused, foreach, got["bf16", "adamw_foreach"], got["fp32", "microadam_q4096"]):
        assert r["status"] == "ok" and r["reason"] is None and r["steps"] == 3 and r["median_ms"] > 0, r
    # AdamW: two moments in the param dtype and a 4-byte step per tensor.
    assert fused["state_bytes"] == foreach["state_bytes"] == 2 * 4 * n + 4 * t
    assert got["bf16", "adamw_foreach"]["state_bytes"] == 2 * 2 * n + 4 * t
    assert got["fp32", "microadam_q4096"]["state_bytes"] == microadam_dist.state_bytes(
        numels, m=10, density=0.01, quant_block=4096)
    assert fused["version"] == res["versions"]["torch"] == torch.__version__
    assert fused["ratio_to_adamw_fused"] == 1.0
    assert foreach["ratio_to_adamw_fused"] == pytest.approx(foreach["median_ms"] / fused["median_ms"])
    assert got["bf16", "adamw_foreach"]["ratio_to_adamw_fused"] is None   # no bf16 fused row ran

    bnb = got["bf16", "bnb_adamw8bit"]
    assert bnb["status"] == "failed" and "not importable" in bnb["reason"] and "bitsandbytes" in bnb["reason"]
    authors = got["fp32", "authors_microadam_q100000"]
    assert authors["status"] == "unsupported" and "bf16" in authors["reason"]
    planted = got["fp32", "microadam_q64"]
    assert planted["status"] == "failed" and planted["reason"] == "RuntimeError: planted step failure"
    assert all(r.get("median_ms") is None for r in (bnb, authors, planted))

    table = capsys.readouterr().out
    assert "| optimizer | params | step ms |" in table
    assert all(f"| {name} | {d} |" in table for d, name in got)


def test_bad_row_names_the_spec():
    with pytest.raises(SystemExit, match="'fp16:adamw_fused'"):
        peers.main(["--tiny", "--device", "cpu", "--rows", "fp16:adamw_fused", "--out", ""])
