"""MicroAdam under FSDP2, FSDP1 (both use_orig_params) and DDP with real gloo processes,
and its DCP checkpoints (microadam_dist/integrations/fsdp.py).

Two launches serve every test (tests/dist_scripts/fsdp_scenarios.py): 2 ranks train,
dump and checkpoint every engine; then 1 rank tries to load the 2-rank checkpoint.
Oracles: torch.chunk / the model's own shapes for shard sizes, the reference step
(ops/reference.py) re-run here in one process on the dumped shards, the float64
oracle (tests/oracle.py), and bitwise comparisons against an uninterrupted run.
"""

import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    import oracle  # tests/oracle.py: the float64 oracle (an extra check beside the bitwise one)
except ImportError:  # pragma: no cover - only while the oracle is not in the tree
    oracle = None
from microadam_dist.layout import Layout
from microadam_dist.ops import reference
from microadam_dist.ops.reference import StepHyper

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "fsdp_scenarios.py")
KINDS = ("fsdp2", "fsdp2_mp", "fsdp2_bf16", "fsdp1_flat", "fsdp1_orig", "ddp")
SHARDED = KINDS[:-1]
# The worker's model: Linear(7,33), Linear(33,33), Linear(33,5) -> names and shapes.
SHAPES = {"0.weight": (33, 7), "0.bias": (33,), "2.weight": (33, 33), "2.bias": (33,),
          "4.weight": (5, 33), "4.bias": (5,)}


def _launch(nproc: int, phase: str, out: str, ckpt: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           SCRIPT, "--phase", phase, "--out", out, "--ckpt-dir", ckpt]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two launches, once per pytest run: under xdist the workers share one result
    directory, and the first worker to take the lock runs them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent  # shared by this run's workers only
    else:
        root = tmp_path_factory.mktemp("fsdp_shared")
    out, ckpt = root / "fsdp_out", root / "fsdp_ckpt"
    with open(root / "fsdp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done").exists():
                out.mkdir(exist_ok=True)
                ckpt.mkdir(exist_ok=True)
                _launch(2, "train", str(out), str(ckpt))
                _launch(1, "mismatch", str(out), str(ckpt))
                (out / "done").write_text("ok")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    train = [json.load(open(out / f"train_rank{r}.json")) for r in range(2)]
    mismatch = json.load(open(out / "mismatch_rank0.json"))
    return {"out": str(out), "train": train, "mismatch": mismatch}


def test_state_bytes_equal_formula_of_local_shards(runs):
    for kind in KINDS:
        for r, res in enumerate(runs["train"]):
            sc = res[kind]
            assert sc["state_nbytes"] == sc["state_bytes_formula"], (kind, r)
            held = [i["local_numel"] for i in sc["infos"] if i["local_numel"] > 0]
            assert sc["stepped_numels"] == held, (kind, r)
    # FSDP2 shards dim 0 as torch.chunk does: 33 rows -> 17 / 16 (uneven), 5 -> 3 / 2.
    for kind in ("fsdp2", "fsdp2_mp", "fsdp2_bf16"):
        for r, res in enumerate(runs["train"]):
            want = [torch.empty(SHAPES[n]).chunk(2, dim=0)[r].numel() for n in SHAPES]
            assert res[kind]["stepped_numels"] == want, (kind, r)
    # FSDP1 with use_orig_params=True leaves some params with no elements on a rank.
    assert any(i["local_numel"] == 0 for res in runs["train"] for i in res["fsdp1_orig"]["infos"])


def test_state_nbytes_counts_dtensor_states_by_local_shard(runs):
    # torch AdamW under FSDP2 (the benchmarks' baseline): two fp32 moments per local element
    # and a 4-byte step per param; a global count would give the full model's bytes on each rank.
    for r, res in enumerate(runs["train"]):
        c = res["adamw_state_control"]
        assert "DTensor" in c["state_types"], c["state_types"]
        assert c["local_numels"] != c["global_numels"]
        assert c["state_nbytes"] == sum(2 * 4 * n + 4 for n in c["local_numels"]), (r, c)


def test_shard_ranges_tile_each_param_and_hold_its_values(runs):
    for kind in SHARDED:
        per_rank = [res[kind]["infos"] for res in runs["train"]]
        for j in range(len(per_rank[0])):
            entries = [infos[j] for infos in per_rank]
            total = entries[0]["global_numel"]
            spans = sorted((e["flat_offset"], e["local_numel"]) for e in entries if e["local_numel"])
            at = 0
            for off, n in spans:
                assert off == at, (kind, entries[0]["fqn"], spans)
                at += n
            assert at == total, (kind, entries[0]["fqn"], spans, total)
            assert [e["rank"] for e in entries] == [0, 1] and all(e["world_size"] == 2 for e in entries)
            assert {e["engine"] for e in entries} == {"fsdp2" if kind.startswith("fsdp2") else "fsdp1"}
        for r, res in enumerate(runs["train"]):
            full = res[kind]["full_values"]
            for info, local in zip(res[kind]["infos"], res[kind]["local_values"]):
                if info["fqn"] in full and info["local_numel"]:
                    span = full[info["fqn"]][info["flat_offset"]:info["flat_offset"] + info["local_numel"]]
                    assert span == local, (kind, r, info["fqn"])
    # FSDP1 FlatParameter: its segments are the model's params (plus any padding), in order.
    for res in runs["train"]:
        infos = res["fsdp1_flat"]["infos"]
        assert [i["fqn"] for i in infos] == ["0._flat_param", "2._flat_param", "4._flat_param"]
        segs = [s for i in infos for s in i["extra"]["segments"]]
        assert {s[0]: s[2] for s in segs if s[0]} == {n: int(np.prod(s)) for n, s in SHAPES.items()}
        assert all(sum(s[2] for s in i["extra"]["segments"]) == i["global_numel"] for i in infos)
    assert [i["fqn"] for i in runs["train"][0]["ddp"]["infos"]] == list(SHAPES)


def _hyper(h):
    return StepHyper(lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                     weight_decay=h["weight_decay"], ef_rounding=h["ef_rounding"])


@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_reference_on_the_same_shards(runs, kind):
    """The optimizer's step on each rank == the reference step re-run here on that rank's
    dumped local shard, gradient and state (bitwise); and near the float64 oracle."""
    for r in range(2):
        d = torch.load(os.path.join(runs["out"], f"equiv_{kind}_rank{r}.pt"), weights_only=False)
        hp = _hyper(d["hyper"])
        (p0, s0), (p1, s1), grads = d["before"], d["after"], d["grads"]
        moved = 0
        for j, (a, b, g) in enumerate(zip(p0, p1, grads)):
            if g is None or a.numel() == 0:
                assert torch.equal(a, b) and s1[j] == s0[j] == {}, (kind, r, j)
                continue
            st = {k: v.clone() for k, v in s0[j].items()}
            st["step"] += 1
            p = a.clone()
            reference.step_shard(p, g, st, Layout.from_tensor(st["layout"]), hp)
            assert torch.equal(p, b), (kind, r, j)
            assert all(torch.equal(st[k], s1[j][k]) for k in st), (kind, r, j)
            moved += int(not torch.equal(a, b))
            if hp.ef_rounding == "nearest" and a.dtype == torch.float32:
                _check_oracle(a, g, s0[j], b, d["hyper"])
        assert moved > 0, (kind, r)


def _check_oracle(theta, grad, st, after, h):
    if oracle is None:
        return
    layout = Layout.from_tensor(st["layout"])
    n = layout.n
    pos = reference.window_positions(st["win_idx"], layout).numpy()
    rows = [(pos[i].astype(np.int64), st["win_val"][i].double().numpy()) for i in range(layout.m)]
    ost = oracle.OracleState(oracle.unpack_nibbles(st["ef"].numpy(), n), st["ef_min"].double().numpy(),
                             st["ef_max"].double().numpy(), rows, int(st["step"]))
    res = oracle.step(theta.double().reshape(-1).numpy(), grad.double().reshape(-1).numpy(), ost,
                      lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                      weight_decay=h["weight_decay"], m=h["m"], density=h["density"],
                      topk_block=h["topk_block"], quant_block=h["quant_block"])
    # The package keeps window values in bf16 (relative error <= 2^-8); the update is
    # lr * m/(sqrt(v)+eps) with |m/sqrt(v)| <= a few, so 3% of lr bounds the difference.
    np.testing.assert_allclose(after.double().reshape(-1).numpy(), res.theta,
                               rtol=0, atol=0.03 * h["lr"])


@pytest.mark.parametrize("kind", KINDS)
def test_dcp_round_trip_restores_every_rank_and_resumes_bitwise(runs, kind):
    for r, res in enumerate(runs["train"]):
        sc = res[kind]
        assert sc["state_after_load_bitwise"], (kind, r)
        assert sc["resume_bitwise"] == [True] * len(sc["resume_bitwise"]) and sc["resume_bitwise"], (kind, r)
        assert sc["extra"] == {"step": 4}
    if kind in SHARDED:
        # The ranks' states differ, so a checkpoint that kept one rank's copy would fail above.
        assert runs["train"][0][kind]["state_digest"] != runs["train"][1][kind]["state_digest"]


def test_state_under_a_shared_key_is_lost_and_caught(runs):
    """Control: under one key for all ranks DCP writes a single copy; the bitwise check
    sees it and set_optimizer_state_dict refuses it. Under rank keys, all ranks round-trip."""
    ctrl = [res["shared_key_control"] for res in runs["train"]]
    assert not all(c["shared_key"]["bitwise"] for c in ctrl)
    refusals = [c["shared_key"]["refused"] for c in ctrl if c["shared_key"]["refused"]]
    assert refusals and all("written by rank" in m for m in refusals)
    assert all(c["rank_key"]["bitwise"] and c["rank_key"]["refused"] is None for c in ctrl)


def test_other_world_size_or_layout_is_refused_naming_both_layouts(runs):
    err = runs["mismatch"]["error"]
    assert err is not None
    for piece in ("'0.weight' was saved for 2 shard(s)", "this run holds 1 shard(s)",
                  "python -m microadam_dist.checkpoint reshard"):
        assert piece in err, (piece, err)
    for r, res in enumerate(runs["train"]):
        n2 = torch.empty(33, 7).chunk(2)[r].numel()  # rank r's 0.weight shard at world size 2
        # An FSDP2 checkpoint (stock form) into FSDP1, which loads only its rank-keyed form.
        other = res["fsdp2"]["other_sharding_error"]
        assert other is not None and "FSDP1" in other and "reshard" in other, other
        # Another m: the sizes of the window differ; refused naming this run's layout.
        other_m = res["fsdp2"]["other_m_error"]
        assert other_m is not None and "'0.weight'" in other_m and f"n={n2}," in other_m, other_m
        assert "m=4," in other_m and "python -m microadam_dist.checkpoint reshard" in other_m, other_m
