"""Real multi-process runs (torchrun, gloo): reshard 2 -> 1 and 3 and continue; SIGKILL a
rank mid-run or mid-save and resume from the last complete checkpoint.

tests/dist_scripts/ckpt_train.py trains a small MLP with MicroAdam on per-rank flat
shards and our sharded checkpoints; its global batch depends only on the step, so
runs of any world size see the same data.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from microadam_dist import Layout, MicroAdam
from microadam_dist.checkpoint import io as ckio
from microadam_dist.checkpoint import sharded
from microadam_dist.checkpoint.__main__ import main as cli
from microadam_dist.checkpoint.reshard import ShardState
from test_reshard import assert_smooth_continuation, check_conservation, losses, shared_reference

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_scripts", "ckpt_train.py")
STEPS, EVERY = 20, 4


def launch(world, root, loss_file, *extra, expect_ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "--monitor-interval=0.2", SCRIPT, "--root", str(root), "--steps", str(STEPS),
           "--loss-file", str(loss_file), *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(run_shared_dir):
    """An uninterrupted 2-rank run, checkpointing every EVERY steps. Run once for all tests:
    pytest-xdist workers share it through a locked directory beside their temp roots."""
    return shared_reference(run_shared_dir / "ckpt_reference",
                            lambda d: launch(2, d / "ck", d / "loss.jsonl", "--every", EVERY))


def test_reshard_to_1_and_3_then_continue(reference, tmp_path):
    root, ref = reference
    src = root / "step_000008"
    noise = max(abs(ref[t + 1] - ref[t]) for t in range(1, STEPS))
    for world in (1, 3):
        dst = tmp_path / f"w{world}" / "step_000008"
        assert cli(["reshard", "--src", str(src), "--dst", str(dst), "--world-size", str(world)]) == 0
        meta = ckio.read_meta(str(dst))
        assert meta["world_size"] == world and meta["step"] == 8
        rep = meta["resharded_from"]["report"]
        assert rep["entries_kept"] + rep["entries_folded"] == rep["entries_in"] > 0
        log = tmp_path / f"w{world}.jsonl"
        proc = launch(world, dst.parent, log, "--resume", dst)
        assert_smooth_continuation(proc.stdout, dst, 8, log, ref, STEPS, noise, f"world {world}", first=5)


def test_resharded_dir_conserves_state_and_round_trips(reference, tmp_path):
    root, _ = reference
    src = str(root / "step_000012")
    meta0, pay0 = sharded._load_all(src)
    dst = tmp_path / "w3"
    sharded.reshard_dir(src, str(dst), 3)
    meta1, pay1 = sharded._load_all(str(dst))
    for t0, t1 in zip(meta0["tensors"], meta1["tensors"]):
        n = t0["numel"]
        srcs = [ShardState(s["offset"], s["numel"], pay0[s["rank"]]["tensors"][t0["name"]]["state"])
                for s in t0["shards"]]
        ranges = [(s["offset"], s["numel"]) for s in t1["shards"]]
        states = [pay1[s["rank"]]["tensors"][t1["name"]]["state"] for s in t1["shards"]]
        full0 = torch.cat([pay0[s["rank"]]["tensors"][t0["name"]]["param"] for s in t0["shards"]])
        full1 = torch.cat([pay1[s["rank"]]["tensors"][t1["name"]]["param"] for s in t1["shards"]])
        assert torch.equal(full0, full1)  # params move exactly
        # The per-tensor counts come from recomputing the (deterministic) reshard.
        again, rep = sharded.reshard_tensor(srcs, n, ranges, sharded.config_of(meta0["hyper"][0]))
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                   for a, b in zip(again, states))
        check_conservation(srcs, states, ranges, n, rep)
    # consolidate -> a single-process optimizer loads it and steps; split back -> 2 ranks.
    one = str(tmp_path / "one.pt")
    assert cli(["consolidate", "--src", src, "--dst", one]) == 0
    obj = ckio.load_file(one)
    params = [obj["model"][n].clone() for n in obj["names"]]
    opt = MicroAdam(params, backend="reference", **{k: v for k, v in obj["hyper"][0].items()
                                                    if k not in ("backend", "nonfinite")})
    opt.load_state_dict(obj["optimizer"])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(int(opt.state[p]["step"]) == 13 for p in params)
    back = tmp_path / "back"
    assert cli(["reshard", "--src", one, "--dst", str(back), "--world-size", "2"]) == 0
    meta2, pay2 = sharded._load_all(str(back))
    for t in meta2["tensors"]:
        for s in t["shards"]:
            a = pay2[s["rank"]]["tensors"][t["name"]]
            b = pay0[s["rank"]]["tensors"][t["name"]]
            assert torch.equal(a["param"], b["param"])
            assert bool(a["state"]) == bool(b["state"])
            if b["state"]:
                assert int(a["state"]["step"]) == int(b["state"]["step"])
                assert Layout.from_tensor(a["state"]["layout"]) == Layout.from_tensor(b["state"]["layout"])
    # Loading a 2-rank checkpoint in a 1-process run names the reshard command.
    with pytest.raises(ckio.CheckpointError, match="saved by 2 ranks.*reshard"):
        sharded.load_sharded(src)
    assert cli(["verify", src]) == 0
    assert cli(["reshard", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "x"),
                "--world-size", "2"]) == 2


@pytest.mark.parametrize("kill", [("--kill-at-step", 15), ("--kill-in-save", 12)])
def test_sigkill_a_rank_then_resume(reference, tmp_path, kill):
    _, ref = reference
    root = tmp_path / "ck"
    log = tmp_path / "loss.jsonl"
    proc = launch(2, root, log, "--every", EVERY, "--kill-rank", 1, *kill, expect_ok=False)
    assert proc.returncode != 0, "the run with a killed rank should fail"
    assert "SIGKILL" in proc.stdout + proc.stderr
    complete = ckio.list_complete(str(root))
    want_last = 12 if kill[0] == "--kill-at-step" else 8
    assert complete[0] == f"step_{want_last:06d}", complete
    if kill[0] == "--kill-in-save":
        assert os.path.isdir(root / ".tmp-step_000012")  # the interrupted save never got published
    proc = launch(2, root, log, "--every", EVERY)
    assert f"resumed from {root / f'step_{want_last:06d}'} at step {want_last}" in proc.stdout
    got = losses(log)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same world size, same data, deterministic ops: the resumed run retraces the uninterrupted one.
    for t in range(1, STEPS + 1):
        assert got[t] == pytest.approx(ref[t], rel=1e-6, abs=1e-7), t


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from microadam_dist.checkpoint import sharded
    from microadam_dist.checkpoint.io import CheckpointError
    from microadam_dist.teardown import finish

    dist.init_process_group("gloo")
    try:
        got = sharded.load_sharded(sys.argv[1])
        result = {"loaded": True, "tensors": len(got[1]["tensors"])}
    except CheckpointError as exc:
        result = {"loaded": False, "error": str(exc)}
    with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    finish()
""")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_rank_file_is_refused_by_every_rank(reference, tmp_path, damage):
    """Rank 1's file is damaged: rank 1 finds it, and rank 0, whose own file is whole, is told
    so and refuses too. Nothing is returned on either rank."""
    root, _ = reference
    ck = tmp_path / "step_000012"
    shutil.copytree(root / "step_000012", ck)
    f = ck / "rank_00001.pt"
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[len(raw) // 3] ^= 0x04
    else:
        raw = raw[: len(raw) - 100]
    f.write_bytes(bytes(raw))
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", str(script), str(ck), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert not r0["loaded"] and not r1["loaded"]
    want = "corrupt" if damage == "flip" else "bytes, meta.json says"
    assert want in r1["error"] and "rank_00001.pt" in r1["error"]
    # A size mismatch every rank sees itself (meta.json lists all sizes); a bad digest only
    # rank 1 can see (each rank hashes its own file), and the ranks agree on it.
    assert want in r0["error"] and "rank_00001.pt" in r0["error"]
    if damage == "flip":
        assert r0["error"].startswith("rank 1 cannot load")
