"""Resharding the engines' own checkpoints on real gloo processes: FSDP2 DCP checkpoints
(integrations/fsdp.py) and DeepSpeed ZeRO-2 and ZeRO-3 checkpoints (integrations/deepspeed.py),
2 ranks -> 1 and 3 ranks -> training continues smoothly; the moved states obey the
conservation guarantee; a consolidated FSDP2 state loads into a single-process optimizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from microadam_dist import MicroAdam
from microadam_dist.checkpoint import dcp as ckdcp
from microadam_dist.checkpoint import io as ckio
from microadam_dist.checkpoint.__main__ import main as cli
from microadam_dist.checkpoint.reshard import ShardState
from microadam_dist.layout import Layout
from test_reshard import assert_smooth_continuation, check_conservation, decode_all, shared_reference

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_scripts", "ckpt_fsdp.py")
STEPS, SAVE_AT = 20, 8


def torchrun(script, world, loss_file, *extra, steps=STEPS, timeout=300):
    """Run a tests/dist_scripts training script on `world` gloo ranks; it must succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "--monitor-interval=0.2", script, "--steps", str(steps), "--loss-file", str(loss_file),
           *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def launch(world, loss_file, *extra):
    return torchrun(SCRIPT, world, loss_file, *extra, timeout=240)


@pytest.fixture(scope="module")
def fsdp_reference(run_shared_dir):
    """An uninterrupted 2-rank FSDP2 run that saves a DCP checkpoint at step SAVE_AT
    (once for all tests; xdist workers share it through a locked directory)."""
    return shared_reference(run_shared_dir / "fsdp_ckpt_reference", lambda d: launch(
        2, d / "loss.jsonl", "--save-at", SAVE_AT, "--ckpt", d / "ck"))


def shard_states(sd):
    """fqn -> ([ShardState] of every shard, numel) from a loaded stock-form DCP dict, read
    from the checkpoint form's definition (sharded_state.py): S = layout / 7 shards, chunk
    r of each key is shard r's state (win_idx as bytes), shard r holds rows
    [r * ceil(rows / S), ...) of the param."""
    out = {}
    for fqn, st in sd["optim"]["state"].items():
        full = sd["model"][fqn]
        shards_n = st["layout"].numel() // 7
        rows = full.shape[0]
        row = full.numel() // rows
        chunk = -(-rows // shards_n)
        shards = []
        for r in range(shards_n):
            lay = Layout.from_tensor(st["layout"][7 * r:7 * r + 7])
            state = {}
            for k, (_, shape) in lay.expected_specs().items():
                flat = st[k].reshape(-1)
                part = flat[r * (flat.numel() // shards_n):]
                count = int(np.prod(shape))
                state[k] = (part[:2 * count].clone().view(torch.int16) if k == "win_idx"
                            else part[:count].clone()).reshape(shape)
            shards.append(ShardState(min(rows, r * chunk) * row, lay.n, state))
        out[fqn] = (shards, full.numel())
    return out


def test_fsdp2_reshard_to_1_and_3_then_continue(fsdp_reference, tmp_path, capsys):
    src, ref = fsdp_reference
    noise = max(abs(ref[t + 1] - ref[t]) for t in range(1, STEPS))
    before = shard_states(ckdcp.load_dcp(str(src)))
    for world in (1, 3):
        dst = tmp_path / f"w{world}"
        assert cli(["reshard", "--src", str(src), "--dst", str(dst), "--world-size", str(world)]) == 0
        sd = ckdcp.load_dcp(str(dst))
        assert {st["layout"].numel() for st in sd["optim"]["state"].values()} == {7 * world}
        after = shard_states(sd)
        assert after.keys() == before.keys()
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        slots = 0
        for fqn, (shards, n) in before.items():
            dst_shards = sorted(after[fqn][0], key=lambda s: s.offset)
            slots += sum(min(int(s.state["step"]), s.state["win_idx"].shape[0]) * s.state["win_idx"].shape[1]
                         for s in shards)
            check_conservation(shards, [s.state for s in dst_shards],
                               [(s.offset, s.numel) for s in dst_shards], n, None)
        assert report["entries_in"] == slots > 0
        assert report["entries_kept"] + report["entries_folded"] == slots
        proc = launch(world, tmp_path / f"w{world}.jsonl", "--resume", dst)
        assert_smooth_continuation(proc.stdout, dst, SAVE_AT, tmp_path / f"w{world}.jsonl", ref, STEPS, noise,
                                   f"FSDP2 2->{world}", first=5)


def test_fsdp2_consolidate_loads_in_one_process(fsdp_reference, tmp_path):
    src, _ = fsdp_reference
    out = str(tmp_path / "one.pt")
    assert cli(["consolidate", "--src", str(src), "--dst", out]) == 0
    obj = ckio.load_file(out)
    assert obj["step"] == SAVE_AT and obj["extra"] == {"step": SAVE_AT}
    params = [obj["model"][n].clone() for n in obj["names"]]
    hyper = {k: v for k, v in obj["hyper"][0].items() if k not in ("backend",)}
    opt = MicroAdam(params, **dict(hyper, backend="reference"))
    opt.load_state_dict(obj["optimizer"])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(int(opt.state[p]["step"]) == SAVE_AT + 1 for p in params)
    # And back to a 2-rank sharded checkpoint of our own format.
    assert cli(["split", "--src", out, "--dst", str(tmp_path / "two"), "--world-size", "2"]) == 0
    assert ckio.read_meta(str(tmp_path / "two"))["world_size"] == 2


# -- DeepSpeed ZeRO-2 ---------------------------------------------------------------------

DS_SCRIPT = os.path.join(HERE, "dist_scripts", "ckpt_ds.py")


def ds_launch(world, loss_file, *extra, steps=STEPS):
    return torchrun(DS_SCRIPT, world, loss_file, *extra, steps=steps)


@pytest.fixture(scope="module")
def ds_reference(run_shared_dir):
    """An uninterrupted 2-rank ZeRO-2 run that saves at step SAVE_AT (once for all tests)."""
    return shared_reference(run_shared_dir / "ds_ckpt_reference", lambda d: ds_launch(
        2, d / "loss.jsonl", "--save-at", SAVE_AT, "--ckpt", d / "ck"))


def zero_shards(folder, world):
    """Per param group: [ShardState] over the padded flat group, real numel (from the files)."""
    out = []
    for r in range(world):
        base = torch.load(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                          weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        for gi, t in enumerate(base["microadam"]["partition"]["tensors"]):
            if len(out) <= gi:
                out.append([[], t["group_numel"], 0])
            out[gi][0].append(ShardState(t["global_offset"], t["numel"], base["state"][gi]))
            out[gi][2] += sum(pc["length"] for pc in t["pieces"])  # real elements, over all ranks
    return out


def test_zero2_reshard_to_1_and_3_then_continue(ds_reference, tmp_path, capsys):
    src, ref = ds_reference
    noise = max(abs(ref[t + 1] - ref[t]) for t in range(1, STEPS))
    before = zero_shards(os.path.join(src, f"global_step{SAVE_AT}"), 2)
    for world in (1, 3):
        dst = tmp_path / f"w{world}"
        assert cli(["reshard", "--src", str(src), "--dst", str(dst), "--world-size", str(world)]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["entries_kept"] + report["entries_folded"] == report["entries_in"] > 0
        after = zero_shards(os.path.join(dst, f"global_step{SAVE_AT}"), world)
        for (old, n_old, real_old), (new, n_new, real_new) in zip(before, after):
            assert real_old == real_new and n_new % (2 * world) == 0  # DeepSpeed's group padding
            check_padded(old, n_old, new, n_new, real_new)
        proc = ds_launch(world, tmp_path / f"w{world}.jsonl", "--resume", dst)
        assert_smooth_continuation(proc.stdout, dst, SAVE_AT, tmp_path / f"w{world}.jsonl", ref, STEPS, noise,
                                   f"ZeRO-2 2->{world}", first=4)


def test_zero2_round_trip_through_one_rank(ds_reference, tmp_path):
    """2 ranks -> 1 (a single-process DeepSpeed checkpoint) -> 2: each move keeps the
    guarantee; the way back has the source's partitions and master weights bit for bit."""
    src, _ = ds_reference
    folders = [os.path.join(src, f"global_step{SAVE_AT}")]
    for world, name in ((1, "one"), (2, "two")):
        assert cli(["reshard", "--src", folders[-1], "--dst", str(tmp_path / name), "--world-size", str(world)]) == 0
        folders.append(os.path.join(tmp_path / name, f"global_step{SAVE_AT}"))
    shards = [zero_shards(f, w) for f, w in zip(folders, (2, 1, 2))]
    for a, b in zip(shards, shards[1:]):
        for (old, n_old, real), (new, n_new, _) in zip(a, b):
            check_padded(old, n_old, new, n_new, real)
    def partitions(folder):
        out = []
        for r in range(2):
            osd = torch.load(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                             weights_only=False)["optimizer_state_dict"]
            meta = osd["base_optimizer_state"]["microadam"]["partition"]
            out.append(([(t["numel"], t["global_offset"], t["pieces"]) for t in meta["tensors"]],
                        [f.clone() for f in osd["single_partition_of_fp32_groups"]]))
        return out
    for (ta, fa), (tb, fb) in zip(partitions(folders[0]), partitions(folders[2])):
        assert ta == tb and all(torch.equal(x, y) for x, y in zip(fa, fb))


def check_padded(old, n_old, new, n_new, real):
    """Conservation over the real elements [0, real) of flat groups padded differently
    (padding belongs to no parameter)."""
    ef0, _, e0, _ = decode_all(old, n_old)
    ef1, q1, e1, _ = decode_all(new, n_new)
    e0 = {k: v for k, v in e0.items() if k[0] < real}
    for key, v in e1.items():
        assert key[0] < real and e0.get(key) == v, key
    folded = {k: v for k, v in e0.items() if k not in e1}
    fold = np.zeros(real)
    for (i, _), v in folded.items():
        fold[i] += v
    err = np.abs(ef1[:real] - (ef0[:real] + fold))
    assert np.all(err <= 0.5 * q1[:real] + 2e-6 * (np.abs(ef0[:real]) + np.abs(fold) + 15 * q1[:real]))
    # The new padding starts empty: zero up to the rounding of its quant block.
    assert np.all(np.abs(ef1[real:]) <= 0.5 * q1[real:] + 1e-6 * 15 * q1[real:])


# -- DeepSpeed ZeRO-3 ---------------------------------------------------------------------

Z3_STEPS, Z3_SUB_GROUP = 13, 400  # sub-groups of <= ~400 elements: several tensors per group and rank


@pytest.fixture(scope="module")
def z3_reference(run_shared_dir):
    """An uninterrupted 2-rank ZeRO-3 run that saves at step SAVE_AT (once for all tests)."""
    return shared_reference(run_shared_dir / "z3_ckpt_reference", lambda d: ds_launch(
        2, d / "loss.jsonl", "--save-at", SAVE_AT, "--ckpt", d / "ck", "--stage", 3,
        "--sub-group-size", Z3_SUB_GROUP, steps=Z3_STEPS))


def zero3_decode(folder, world):
    """Per param group, keyed by (param name, element) from the files' own piece tables:
    EF value and step, window entries {(key, age): value}, written slots, fp32 masters,
    and (EF, step) of every padding element. Decoded by test_reshard's float64 decoder."""
    out = {}
    for r in range(world):
        osd = torch.load(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                         weights_only=False)["optimizer_state_dict"]
        inner = osd["optimizer_state_dict"]
        assert osd["partition_count"] == world
        for t in inner["microadam"]["partition"]["tensors"]:
            n, sg = t["numel"], t["sub_group"]
            flat = osd["fp32_flat_groups"][sg]
            assert flat.numel() == n
            ef, q, entries, slots = decode_all([ShardState(0, n, inner["state"][sg])], n)
            key = {}
            for pc in t["pieces"]:
                for j in range(pc["length"]):
                    key[pc["offset"] + j] = (pc["name"], pc["param_offset"] + j)
            g = out.setdefault(t["group"], {"ef": {}, "q": {}, "win": {}, "slots": 0, "master": {}, "pad": [],
                                            "pad_entries": 0})
            for j in range(n):
                if j in key:
                    assert key[j] not in g["ef"], f"element {key[j]} held twice"
                    g["ef"][key[j]], g["q"][key[j]], g["master"][key[j]] = ef[j], q[j], float(flat[j].detach())
                else:
                    g["pad"].append((ef[j], q[j]))
            for (j, age), v in entries.items():
                if j in key:
                    g["win"][(key[j], age)] = v
                else:
                    g["pad_entries"] += 1
            g["slots"] += slots
    return out


def check_zero3(before, after, report):
    """The reshard guarantee over real elements: window entries kept exactly or folded into the
    EF (EF' = EF + folded within half a new quantization step), nothing else lost; master
    weights equal; new padding starts empty."""
    slots = dropped = 0
    for gi, b in before.items():
        a = after[gi]
        assert a["ef"].keys() == b["ef"].keys() and a["master"] == b["master"], gi
        for k, v in a["win"].items():
            assert b["win"].get(k) == v, k
        folded = {k: v for k, v in b["win"].items() if k not in a["win"]}
        assert len(folded) + len(a["win"]) == len(b["win"])
        fold = {}
        for (key, _), v in folded.items():
            fold[key] = fold.get(key, 0.0) + v
        for key, e0 in b["ef"].items():
            f, q1 = fold.get(key, 0.0), a["q"][key]
            err = abs(a["ef"][key] - (e0 + f))
            assert err <= 0.5 * q1 + 2e-6 * (abs(e0) + abs(f) + 15 * q1), (key, err, q1)
        for e, q in a["pad"]:
            assert abs(e) <= 0.5 * q + 1e-6 * 15 * q
        slots += b["slots"]
        dropped += b["pad_entries"]
    assert report["entries_in"] + report["padding_dropped"] == slots > 0
    assert report["entries_kept"] + report["entries_folded"] == report["entries_in"]
    assert report["padding_dropped"] >= dropped  # zero-valued entries at padding decode as nothing


def test_zero3_reshard_to_1_and_3_then_continue(z3_reference, tmp_path, capsys):
    src, ref = z3_reference
    noise = max(abs(ref[t + 1] - ref[t]) for t in range(1, Z3_STEPS))
    before = zero3_decode(os.path.join(src, f"global_step{SAVE_AT}"), 2)
    meta = json.load(open(os.path.join(src, f"global_step{SAVE_AT}", "microadam_layout.json")))["rank0"]
    assert len(meta["tensors"]) > len(before) == 2  # several sub-group tensors in a param group
    for world in (1, 3):
        dst = tmp_path / f"w{world}"
        assert cli(["reshard", "--src", str(src), "--dst", str(dst), "--world-size", str(world)]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        folder = os.path.join(dst, f"global_step{SAVE_AT}")
        assert sorted(f for f in os.listdir(folder) if f.endswith(".pt")) == sorted(
            [f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in range(world) for k in ("model", "optim")])
        check_zero3(before, zero3_decode(folder, world), report)
        proc = ds_launch(world, tmp_path / f"w{world}.jsonl", "--resume", dst, "--stage", 3,
                         "--sub-group-size", Z3_SUB_GROUP, steps=Z3_STEPS)
        jumps = assert_smooth_continuation(proc.stdout, dst, SAVE_AT, tmp_path / f"w{world}.jsonl", ref, Z3_STEPS,
                                           noise, f"ZeRO-3 2->{world}", first=4)
        assert jumps[0] < 1e-5 * abs(ref[SAVE_AT + 1])  # the masters moved exactly


def test_zero3_round_trip_through_one_rank(z3_reference, tmp_path, capsys):
    """2 ranks -> 1 (the single-process checkpoint) -> 2: each move keeps the guarantee, and
    the way back rebuilds the source's own tensors (same sizes, masters bit for bit)."""
    src, _ = z3_reference
    src_folder = os.path.join(src, f"global_step{SAVE_AT}")
    states = [zero3_decode(src_folder, 2)]
    for world, path in ((1, src_folder), (2, str(tmp_path / "one" / f"global_step{SAVE_AT}"))):
        dst = tmp_path / ("one" if world == 1 else "two")
        assert cli(["reshard", "--src", path, "--dst", str(dst), "--world-size", str(world)]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        states.append(zero3_decode(os.path.join(dst, f"global_step{SAVE_AT}"), world))
        check_zero3(states[-2], states[-1], report)
    def tables(folder):
        out = []
        for r in range(2):
            osd = torch.load(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                             weights_only=False)["optimizer_state_dict"]
            out.append([(t["group"], t["sub_group"], t["numel"], t["pieces"])
                        for t in osd["optimizer_state_dict"]["microadam"]["partition"]["tensors"]])
        return out
    # (check_zero3 compared the masters at every real element; the source's padding holds
    # whatever memory DeepSpeed allocated, the resharded padding zeros.)
    assert tables(src_folder) == tables(os.path.join(tmp_path / "two", f"global_step{SAVE_AT}"))
