"""examples/finetune_fsdp2.py runs end to end under torchrun (2 gloo ranks, tiny Llama):
it trains, writes its metrics file and a DCP checkpoint, and a resumed run repeats the
uninterrupted run's losses exactly."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "examples", "finetune_fsdp2.py"), "--steps", "4", "--warmup", "1",
           "--seq-len", "32", "--batch-size", "2", "--no-progress", *extra]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"


def _losses(path):
    rows = [json.loads(line) for line in open(path)]
    return {r["step"]: r["loss"] for r in rows if "step" in r}, [r["summary"] for r in rows if "summary" in r]


def test_finetune_example_trains_checkpoints_and_resumes(tmp_path):
    _run(tmp_path, "--metrics", "full.jsonl", "--save", "ckpt", "--save-every", "2")
    _run(tmp_path, "--metrics", "resumed.jsonl", "--resume", "ckpt/step_2")
    full, (summary,) = _losses(tmp_path / "full.jsonl")
    resumed, _ = _losses(tmp_path / "resumed.jsonl")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert all(v == v and 0 < v < 20 for v in full.values())  # finite, about ln(256) at the start
    assert resumed == {3: full[3], 4: full[4]}
    assert summary["world_size"] == 2 and summary["optimizer"] == "microadam"
    assert 0 < summary["state_bytes_per_param"] < 1.0  # m=10, density 1%: ~0.9 bytes/param
    assert (tmp_path / "ckpt" / "step_4" / ".metadata").exists()
