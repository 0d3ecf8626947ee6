"""MicroAdam through torch's stock checkpoint calls under FSDP2 (the calls Accelerate,
Lightning, torchtune and torchtitan make): `get_optimizer_state_dict` / `set_optimizer_state_dict`
with DCP save, load and async_save, cpu_offload, the flattened form, the full state dict
gathered to rank 0 and broadcast back; FSDP1's stock calls refused by name.

Three launches of tests/dist_scripts/dcp_stock.py (gloo, CPU): 2 ranks (every path, FSDP2
fp32 / bf16-compute / pure bf16, even and uneven shards), 3 ranks (the paths, and checkpoints
moved between 2 and 3 ranks), 4 ranks as a 2x2 HSDP mesh. The oracle is an uninterrupted
run: every rank compares its own params and state, bitwise, after the load and after every
later step.
"""

import json

import pytest

import launching

pytestmark = pytest.mark.slow

PHASES = {"main": 2, "three": 3, "hsdp": 4}


@pytest.fixture(scope="module")
def results(run_shared_dir):
    def launch(out):
        for phase, nproc in PHASES.items():
            launching.torchrun("dcp_stock.py", nproc, ["--phase", phase, "--out", str(out)])

    out = launching.once(run_shared_dir, "dcp_stock", launch)
    return {phase: [json.load(open(out / f"{phase}_rank{r}.json")) for r in range(n)]
            for phase, n in PHASES.items()}


def _round_trips(results, phase):
    return [(r, key, res) for r, ranks in enumerate(results[phase]) for key, res in ranks.items()
            if "/" in key]


@pytest.mark.parametrize("phase", list(PHASES))
def test_stock_paths_resume_bitwise_on_every_rank(results, phase):
    trips = _round_trips(results, phase)
    assert trips
    for rank, key, res in trips:
        assert res["ok"], f"{phase} rank {rank} {key}: {res['error']}\n{res['trace']}"
        assert res["after_save"] == [], (phase, rank, key, "saving changed the run", res["after_save"])
        assert res["after_load"] == [], (phase, rank, key, "state after the load", res["after_load"])
        for step, diffs in enumerate(res["after_steps"]):
            assert diffs == [], (phase, rank, key, f"step {step} after the load", diffs)


def test_scenarios_cover_paths_flavours_and_shard_shapes(results):
    keys = {key for _, key, _ in _round_trips(results, "main")} - {"legacy/fp32/65/helper", "dcp/stochastic/65/3"}
    paths = {k.split("/")[0] for k in keys}
    assert paths == {"dcp", "dcp_offload", "flat", "async", "full_bcast", "full_all"}
    assert {k.split("/")[1] for k in keys} == {"fp32", "mp", "bf16"}
    assert {k.split("/")[2] for k in keys} == {"64", "65"}  # even and uneven over 2 ranks
    assert {k.split("/")[3] for k in keys} == {"0", "3"}    # fresh optimizer and another history
    # Uneven: the ranks hold different sizes; some ranks hold empty shards (1-row params).
    numels = [results["main"][r]["dcp/fp32/65/3"]["local_numels"] for r in range(2)]
    assert numels[0] != numels[1] and 0 in numels[1]
    three = [results["three"][r]["dcp/fp32/65/3"]["local_numels"] for r in range(3)]
    assert len({tuple(n) for n in three}) == 3


def test_hsdp_replicas_agree(results):
    """A 2x2 HSDP mesh: the replicas of a shard (ranks r and r + 2) hold the same shard and
    resume to the same values."""
    for key in ("dcp/fp32/65/3", "full_bcast/fp32/65/3"):
        numels = [results["hsdp"][r][key]["local_numels"] for r in range(4)]
        assert numels[0] == numels[2] and numels[1] == numels[3] and numels[0] != numels[1]


@pytest.mark.parametrize("phase,shards", [("main", 2), ("three", 3), ("hsdp", 2)])
def test_state_is_stored_like_its_param(results, phase, shards):
    """DCP stores the state in as many chunks as the param: one per shard (sharded where the
    param is sharded), once per replica group (replicated where it is replicated)."""
    for res in results[phase]:
        for key, one in res.items():
            if key.startswith("dcp/"):
                assert one["chunks"] == {k: shards for k in one["chunks"]}, (phase, key, one["chunks"])


def test_init_optim_state_call_creates_state_without_stepping(results):
    for rank, res in enumerate(results["main"]):
        call = res["init_state_call"]
        assert call["ok"], call.get("error")
        assert call["states"] == 6 and call["params_unchanged"] and call["windows_zero"], call
        assert call["steps"] == [0] and call["lrs"] == [0.02, 0.02], call
        # The first real step afterwards equals a fresh optimizer's first step.
        assert call["first_step_as_fresh"] == [], call


def test_other_world_size_or_window_fails_loudly(results):
    for rank, res in enumerate(results["main"]):
        assert res["other_m"]["raised"] and "Size mismatch" in res["other_m"]["error"], res["other_m"]
    for rank, res in enumerate(results["three"]):
        cross = res["cross_world"]
        assert cross["ok"], cross.get("error")
        assert cross["2to3"]["raised"] and "Size mismatch" in cross["2to3"]["error"], cross["2to3"]
        if rank < 2:
            assert cross["3to2"]["raised"] and "Size mismatch" in cross["3to2"]["error"], cross["3to2"]
        # The full state of 2 ranks broadcast into 3: refused, params untouched.
        assert cross["2to3_full"]["raised"], cross["2to3_full"]
        assert "TypeError" not in cross["2to3_full"]["error"], cross["2to3_full"]
        assert cross["2to3_full_untouched"]


def test_fsdp1_stock_calls_name_the_helper_and_the_helper_round_trips(results):
    for rank, res in enumerate(results["main"]):
        f = res["fsdp1"]
        assert f["ok"], f.get("error")
        for orig in ("orig0", "orig1"):
            for call in ("get", "fsdp_api"):
                err = f[f"{orig}_{call}"]
                assert err["raised"], (rank, orig, call)
                assert "microadam_dist.integrations.fsdp.save_checkpoint" in err["error"], err
            assert f[f"{orig}_helper_states"] > 0
            assert f[f"{orig}_helper_diffs"] == [], (rank, orig, f[f"{orig}_helper_diffs"])


def test_rank_keyed_checkpoint_of_earlier_versions_still_loads(results):
    for rank, res in enumerate(results["main"]):
        legacy = res["legacy/fp32/65/helper"]
        assert legacy["ok"], legacy.get("error")
        assert legacy["extra"] == {"step": 5}
