"""Atomic checked files and checkpoint directories: round trip, damage detection, SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from microadam_dist.checkpoint import io as ckio
from microadam_dist.checkpoint.io import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "ef": torch.randint(0, 256, (101,), dtype=torch.uint8, generator=g),
        "win_idx": torch.randint(-100, 100, (3, 7), dtype=torch.int16, generator=g),
        "win_val": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "ef_min": torch.randn(5, generator=g),
        "step": torch.tensor(seed, dtype=torch.int64),
        "nested": {"name": "w", "list": [1, 2.5, None]},
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_round_trip_keeps_dtypes(tmp_path, seed):
    obj = sample(seed)
    info = ckio.save_file(obj, str(tmp_path / "a.pt"))
    assert info["bytes"] == os.path.getsize(tmp_path / "a.pt")
    assert ckio.file_digest(str(tmp_path / "a.pt")) == info
    assert_same(ckio.load_file(str(tmp_path / "a.pt")), obj)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".partial")] == []


@pytest.mark.parametrize("damage,message", [
    ("truncate_payload", "truncated"), ("truncate_header", "truncated"), ("flip", "corrupt"),
    ("append", "longer"), ("magic", "not a microadam_dist checkpoint"), ("missing", "does not exist"),
])
def test_damaged_file_is_refused(tmp_path, seed, damage, message):
    p = str(tmp_path / "a.pt")
    ckio.save_file(sample(seed), p)
    raw = bytearray(open(p, "rb").read())
    if damage == "truncate_payload":
        raw = raw[: len(raw) - 1 - seed % 50]
    elif damage == "truncate_header":
        raw = raw[:20]
    elif damage == "flip":
        raw[48 + seed % (len(raw) - 48)] ^= 1 << (seed % 8)
    elif damage == "append":
        raw += b"\0"
    elif damage == "magic":
        raw[0:8] = b"PK\x03\x04abcd"
    if damage == "missing":
        os.unlink(p)
    else:
        open(p, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=message):
        ckio.load_file(p)


def test_failed_verification_keeps_the_old_file(tmp_path, seed):
    p = str(tmp_path / "a.pt")
    ckio.save_file(sample(seed), p)

    def refuse(tmp):
        raise CheckpointError("verification failed on purpose")

    with pytest.raises(CheckpointError, match="on purpose"):
        ckio.atomic_write_bytes(p, ckio.encode(sample(seed + 1)), verify=refuse)
    assert_same(ckio.load_file(p), sample(seed))
    assert os.listdir(tmp_path) == ["a.pt"]


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    sys.path.insert(0, {repo!r})
    from microadam_dist.checkpoint import io as ckio
    root, mode = sys.argv[1], sys.argv[2]
    big = {{"w": torch.arange(6_000_000, dtype=torch.float32)}}

    def hang(written):
        open(os.path.join(root, "MARK"), "w").close()
        time.sleep(60)  # the parent SIGKILLs us here, mid-write

    if mode == "file":
        ckio.save_file({{"v": 1}}, os.path.join(root, "a.pt"))
        ckio.save_file(big, os.path.join(root, "a.pt"), _chunk_hook=hang)
    else:
        for tag in ("step_1", "step_2"):
            stage = ckio.staging_dir(root, tag)
            os.makedirs(stage, exist_ok=True)
            obj = {{"v": tag}} if tag == "step_1" else big
            ckio.save_file(obj, os.path.join(stage, "rank_00000.pt"),
                           _chunk_hook=hang if tag == "step_2" else None)
            ckio.publish_dir(root, tag, {{"step": int(tag[-1])}})
""")


@pytest.mark.parametrize("mode", ["file", "dir"])
def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path, mode):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT.format(repo=REPO))
    root = tmp_path / "ck"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(root), mode])
    try:
        deadline = time.time() + 60
        while not (root / "MARK").exists():
            assert proc.poll() is None, f"writer exited early with {proc.returncode}"
            assert time.time() < deadline, "writer never reached the middle of its save"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    if mode == "file":
        partial = [p for p in os.listdir(root) if p.endswith(".partial")]
        assert partial, "the kill should have left the half-written temporary behind"
        assert ckio.load_file(str(root / "a.pt")) == {"v": 1}
    else:
        assert os.path.isdir(root / ".tmp-step_2")
        path = ckio.latest_complete(str(root))
        assert path == str(root / "step_1")
        assert open(root / "latest").read() == "step_1"
        assert ckio.load_file(os.path.join(path, "rank_00000.pt")) == {"v": "step_1"}
        with pytest.raises(CheckpointError, match="meta.json is missing"):
            ckio.read_meta(str(root / ".tmp-step_2"))
        assert ckio.clean_staging(str(root)) == [".tmp-step_2"]


def publish(root, tag, step, objs):
    stage = ckio.staging_dir(root, tag)
    os.makedirs(stage)
    for name, obj in objs.items():
        ckio.save_file(obj, os.path.join(stage, name))
    return ckio.publish_dir(root, tag, {"step": step, "world_size": len(objs)})


def test_directory_publish_verify_and_fallback(tmp_path, seed):
    root = str(tmp_path)
    p1 = publish(root, "step_1", 1, {"rank_00000.pt": sample(seed), "rank_00001.pt": sample(seed + 1)})
    p2 = publish(root, "step_2", 2, {"rank_00000.pt": sample(seed + 2), "rank_00001.pt": sample(seed + 3)})
    meta = ckio.read_meta(p2)
    assert meta["step"] == 2 and meta["world_size"] == 2 and meta["format_version"] == ckio.FORMAT_VERSION
    assert sorted(meta["files"]) == ["rank_00000.pt", "rank_00001.pt"]
    assert ckio.list_complete(root) == ["step_2", "step_1"]
    assert ckio.latest_complete(root) == p2
    # Damage the newest: explicit reads refuse it, resume falls back to the previous one.
    f = os.path.join(p2, "rank_00001.pt")
    raw = bytearray(open(f, "rb").read())
    raw[-3] ^= 0xFF
    open(f, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        ckio.read_meta(p2)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert ckio.latest_complete(root) == p1
    open(f, "wb").write(bytes(raw[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        ckio.read_meta(p2, verify=False)
    os.unlink(os.path.join(p2, "meta.json"))
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        ckio.read_meta(p2)
    with open(os.path.join(p1, "meta.json"), "w") as fh:
        fh.write('{"format_version": 1, "files": {')
    with pytest.raises(CheckpointError, match="corrupt"):
        ckio.read_meta(p1)


def test_resave_same_tag_replaces_whole(tmp_path, seed):
    root = str(tmp_path)
    publish(root, "final", 5, {"rank_00000.pt": sample(seed)})
    p = publish(root, "final", 6, {"rank_00000.pt": sample(seed + 1)})
    assert ckio.read_meta(p)["step"] == 6
    assert_same(ckio.load_file(os.path.join(p, "rank_00000.pt")), sample(seed + 1))
    assert sorted(os.listdir(root)) == ["final", "latest"]


def test_bad_tag_is_refused(tmp_path):
    for tag in ("", ".x", "a/b", "latest"):
        with pytest.raises(ValueError, match="tag"):
            ckio.staging_dir(str(tmp_path), tag)


def test_sharded_checkpoint_metadata_and_refusals(tmp_path, seed):
    """meta.json records format, version, world size, step, hyper-parameters and every
    shard's layout; a newer format version, a damaged rank file or another world size is
    refused by load_sharded before anything is returned."""
    import json

    from microadam_dist import Layout, MicroAdam, MicroAdamConfig
    from microadam_dist.checkpoint import sharded

    cfg = MicroAdamConfig(lr=3e-3, betas=(0.8, 0.95), m=3, density=0.1, topk_block=32, quant_block=24,
                          weight_decay=0.05, ef_rounding="stochastic")
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 11), (50,)]]
    opt = MicroAdam(params, **cfg.as_dict())
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    shards = [sharded.LocalShard(f"p{i}", tuple(p.shape), 0, 0, p.numel(), p.detach().reshape(-1), opt.state[p])
              for i, p in enumerate(params)]
    path = sharded.save_sharded(str(tmp_path), "step_000003", shards, [cfg], step=3, extra={"seed": seed})
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert meta["format"] == sharded.FORMAT and meta["format_version"] == ckio.FORMAT_VERSION
    assert meta["world_size"] == 1 and meta["step"] == 3 and meta["extra"] == {"seed": seed}
    assert sharded.config_of(meta["hyper"][0]) == cfg
    for t, p in zip(meta["tensors"], params):
        assert t["shape"] == list(p.shape) and t["numel"] == p.numel()
        (s,) = t["shards"]
        assert Layout.from_tensor(torch.tensor(s["layout"])) == Layout.from_tensor(opt.state[p]["layout"])
    got_meta, payload = sharded.load_sharded(path)
    for i, p in enumerate(params):
        entry = payload["tensors"][f"p{i}"]
        assert torch.equal(entry["param"], p.detach().reshape(-1))
        assert all(torch.equal(entry["state"][k], opt.state[p][k]) for k in opt.state[p])
    # A future format version: refused, with what to do.
    newer = dict(meta, format_version=ckio.FORMAT_VERSION + 1)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(newer, f)
    with pytest.raises(CheckpointError, match="format version .*upgrade"):
        sharded.load_sharded(path)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(dict(meta, world_size=2), f)
    with pytest.raises(CheckpointError, match="saved by 2 ranks and this run has 1.*reshard"):
        sharded.load_sharded(path)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    rank_file = os.path.join(path, sharded.rank_file(0))
    raw = bytearray(open(rank_file, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(rank_file, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        sharded.load_sharded(path)
    open(rank_file, "wb").write(bytes(raw[:-7]))
    with pytest.raises(CheckpointError, match="truncated|bytes, meta.json says"):
        sharded.load_sharded(path)
