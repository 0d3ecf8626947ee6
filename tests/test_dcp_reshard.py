"""The offline reshard tool on FSDP2 checkpoints in torch's stock form (what
get_optimizer_state_dict + dcp.save, Accelerate, Lightning and torchtitan write).

One 3-rank launch of tests/dist_scripts/dcp_reshard.py (gloo, CPU). Oracles: the
uninterrupted run (2 -> 2 resumes bitwise on every rank) and `reshard_tensor` of the source
shards for each rank's own range (2 -> 3 through the CLI, 3 -> 2 through reshard_dcp, both
loaded through torch's stock calls; 2 -> 3 of the optimizer-only layout Accelerate's own save
functions write, through the CLI with --model-src; 2 -> 3 of torchtitan's layout, the
optimizer in torch's flattened form, through the CLI with --set, loaded through the
flattened stock calls).
"""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_scripts"))
from dcp_reshard import TITAN_LR  # noqa: E402  the worker's --set value
from dcp_stock import STEPS_AFTER, STEPS_BEFORE  # noqa: E402  the worker's step counts

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "dcp_reshard.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp_reshard")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           SCRIPT, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = [json.load(open(out / f"reshard_rank{r}.json"))["reshard"] for r in range(3)]
    for r, one in enumerate(res):
        assert one["ok"], f"rank {r}: {one['error']}\n{one['trace']}"
    return res


def test_same_world_size_resumes_bitwise_on_every_rank(results):
    for rank in (0, 1):
        same = results[rank]["same"]
        assert same["after_load"] == [], (rank, same["after_load"])
        assert len(same["after_steps"]) == STEPS_AFTER
        for step, diffs in enumerate(same["after_steps"]):
            assert diffs == [], (rank, step, diffs)


@pytest.mark.parametrize("move,ranks", [("2to3", (0, 1, 2)), ("3to2", (0, 1))])
def test_other_world_size_equals_reshard_tensor_and_continues(results, move, ranks):
    for rank in ranks:
        res = results[rank][move]
        assert res["oracle_diffs"] == [], (move, rank, res["oracle_diffs"])
        # Saved after STEPS_BEFORE steps, then STEPS_AFTER more on every non-empty shard.
        assert res["steps"] == [STEPS_BEFORE + STEPS_AFTER] and res["finite"], (move, rank, res)


def test_cli_reshards_a_stock_checkpoint(results):
    cli = results[0]["cli"]
    assert cli["rc"] == 0, cli["stderr"]
    report = json.loads(cli["stdout"].strip().splitlines()[-1])
    assert report["ok"] and report["dst"].endswith("ck2to3")
    assert report["entries_in"] == report["entries_kept"] + report["entries_folded"] > 0


def test_cli_reshards_accelerates_optimizer_only_layout(results):
    cli = results[0]["accelerate_cli"]
    # The layout under test: the optimizer alone in one DCP dir, the model in another.
    assert cli["optim_keys"] == ["optimizer"] and cli["model_keys"] == ["model"], cli
    assert cli["rc"] == 0, cli["stderr"]
    report = json.loads(cli["stdout"].strip().splitlines()[-1])
    assert report["ok"] and report["entries_in"] == report["entries_kept"] + report["entries_folded"] > 0
    for rank in (0, 1, 2):
        res = results[rank]["accelerate"]
        assert res["oracle_diffs"] == [], (rank, res["oracle_diffs"])
        assert res["steps"] == [STEPS_BEFORE + STEPS_AFTER] and res["finite"], (rank, res)


def test_cli_reshards_torchtitans_flattened_layout(results):
    cli = results[0]["titan_cli"]
    # torchtitan's layout: model params at the top level, the optimizer flattened.
    assert "optimizer" in cli["src_keys"] and "model" not in cli["src_keys"], cli["src_keys"]
    assert cli["rc"] == 0, cli["stderr"]
    report = json.loads(cli["stdout"].strip().splitlines()[-1])
    assert report["ok"] and report["entries_in"] == report["entries_kept"] + report["entries_folded"] > 0
    # Written back in the same layout: flattened keys, the model and train_state kept.
    assert cli["dst_keys"] == cli["src_keys"], cli
    opt_keys = [k for k in cli["flat_keys"] if k.startswith("optimizer.")]
    assert opt_keys and all(k.startswith(("optimizer.state.", "optimizer.param_groups.")) for k in opt_keys)
    assert "optimizer.state.0.weight.ef" in opt_keys and "optimizer.param_groups.0.weight.lr" in opt_keys
    for rank in (0, 1, 2):
        res = results[rank]["titan"]
        assert res["oracle_diffs"] == [], (rank, res["oracle_diffs"])
        assert res["lrs"] == [TITAN_LR], (rank, res["lrs"])
        assert res["steps"] == [STEPS_BEFORE + STEPS_AFTER] and res["finite"], (rank, res)


def test_consolidating_the_flattened_form_equals_the_nested_one(results):
    cons = results[0]["titan_consolidate"]
    assert cons["names"] and cons["diffs"] == [], cons


def test_model_src_with_a_src_that_is_not_dcp_is_refused(results):
    cli = results[0]["model_src_refused"]
    assert cli["rc"] != 0 and not cli["dst_written"], cli
    assert "--model-src" in cli["stderr"] and "ck2.pt is a file" in cli["stderr"], cli["stderr"]
