"""MicroAdam(step_in_backward=True) under FSDP2 and DDP, with 2 real gloo processes.

One launch (tests/dist_scripts/backward_scenarios.py) serves every test. Oracle for FSDP2:
the ordinary step of the same optimizer on the same sharded model and data, compared
bitwise shard by shard (params and state) on every rank after every step.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "backward_scenarios.py")
FSDP2 = ("fsdp2_per_tensor", "fsdp2_one_group", "fsdp2_mp")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("backward")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


@pytest.mark.parametrize("kind", FSDP2)
def test_fsdp2_shards_equal_ordinary_step(ranks, kind):
    for res in ranks:
        sc = res[kind]
        assert sc["equal"] == [True] * 4, (res["rank"], sc)
        assert sc["released"] == [True] * 4 and sc["moved"] and sc["stepped"] == [4], (res["rank"], sc)
    groups = [res[kind]["flushes"] for res in ranks]
    if kind == "fsdp2_per_tensor":  # six params, one group each
        assert groups == [[6] * 4] * 2
    elif kind == "fsdp2_one_group":  # all six in one group at the end of backward
        assert groups == [[1] * 4] * 2
    else:  # groups cut at the same params on both ranks (by the params' global sizes)
        assert groups[0] == groups[1] and 1 < groups[0][0] < 6


def test_ddp_refused_at_first_backward(ranks):
    for res in ranks:
        err = res["ddp"]["error"]
        assert err is not None and "cannot train a DistributedDataParallel model" in err and "FSDP2" in err
        assert res["ddp"]["untouched"]
