"""MicroAdam checkpointed by the training frameworks' own calls under FSDP2, on the CPU with
gloo and 2 ranks: torchtune's recipe checkpointing (the full state gathered to rank 0 and
broadcast back; asynchronous DCP), Lightning Fabric's ModelParallelStrategy (distributed and
full checkpoints) and its FSDPStrategy (FSDP1: refused by name, the named helper round-trips),
Accelerate's save_state / load_state (sharded and full state dicts, fp32 and bf16 mixed
precision) and the HF Trainer's resume_from_checkpoint.

One launch of tests/dist_scripts/clients.py, whose docstring says what each framework runs
and the one change each needs on a CPU. The oracle is an uninterrupted run: every rank
compares its own params and MicroAdam state, bitwise, after the load and after every later
step. A framework that is not installed is skipped (requirements/cpu.txt installs them all).
"""

import importlib.util
import json
import shutil

import pytest

import launching
from microadam_dist.layout import STATE_KEYS

pytestmark = pytest.mark.slow

RANKS = 2
MODULES = {"torchtune": "torchtune", "fabric": "lightning_fabric", "accelerate": "accelerate",
           "trainer": "transformers"}
# Every scenario the worker must report, per framework (a dropped one fails here).
SCENARIOS = {
    "torchtune": {"torchtune/full_sync", "torchtune/dcp_async"},
    "fabric": {"fabric/distributed/64/0", "fabric/distributed/65/2", "fabric/full/65/0",
               "fabric_fsdp1/sharded", "fabric_fsdp1/full"},
    "accelerate": {"accelerate/SHARDED_STATE_DICT/no/65/0", "accelerate/FULL_STATE_DICT/no/65/2",
                   "accelerate/SHARDED_STATE_DICT/bf16/64/2"},
    "trainer": {"trainer/SHARDED_STATE_DICT", "trainer/FULL_STATE_DICT"},
}


def _installed(framework: str) -> bool:
    return importlib.util.find_spec(MODULES[framework]) is not None


@pytest.fixture(scope="module")
def results(run_shared_dir):
    """The launch, once per pytest run."""
    def launch(out):
        only = [f for f in MODULES if _installed(f)]
        if only:
            try:
                launching.torchrun("clients.py", RANKS, ["--out", str(out), "--only", *only])
            finally:
                shutil.rmtree(out / "ckpt_clients", ignore_errors=True)

    out = launching.once(run_shared_dir, "clients", launch)
    if not (out / "clients_rank0.json").exists():
        return [{} for _ in range(RANKS)]
    return [json.load(open(out / f"clients_rank{r}.json")) for r in range(RANKS)]


def _ran(results, framework: str) -> list[dict]:
    """Each rank's scenarios of `framework`; skips if it is not installed, fails if it is
    installed but the worker could not import it or left a scenario out."""
    if not _installed(framework):
        pytest.skip(f"{MODULES[framework]} is not installed (requirements/cpu.txt)")
    ranks = []
    for rank, res in enumerate(results):
        assert framework not in res, (rank, res.get(framework))
        mine = {k: v for k, v in res.items() if k.split("/")[0] in (framework, f"{framework}_fsdp1")}
        assert set(mine) == SCENARIOS[framework], (rank, sorted(mine))
        for key, r in mine.items():
            assert r["ok"], f"rank {rank} {key}: {r['error']}\n{r['trace']}"
        ranks.append(mine)
    return ranks


def _assert_resumed(rank: int, key: str, r: dict) -> None:
    assert r["after_save"] == [], (rank, key, "saving changed the run", r["after_save"])
    # Before the load, B differs from the checkpoint: the comparison can fail.
    assert r["differs_before_load"] > 0, (rank, key)
    assert r["after_load"] == [], (rank, key, "state after the load", r["after_load"])
    assert r["after_steps"] and all(d == [] for d in r["after_steps"]), (rank, key, r["after_steps"])
    assert r["microadam"] and r["param_types"] == ["DTensor"], (rank, key, r["param_types"])
    assert r["state_keys"] == sorted(STATE_KEYS), (rank, key, r["state_keys"])
    assert r["state_entries"] == len(r["local_numels"]), (rank, key)  # every param has its state


@pytest.mark.parametrize("framework", list(MODULES))
def test_framework_checkpoint_resumes_bitwise_on_every_rank(results, framework):
    for rank, mine in enumerate(_ran(results, framework)):
        for key, r in mine.items():
            if not key.startswith("fabric_fsdp1/"):
                _assert_resumed(rank, key, r)


@pytest.mark.parametrize("framework", list(MODULES))
def test_shards_differ_between_ranks(results, framework):
    """Uneven shards (65 rows, a 65-token vocabulary): the ranks hold different sizes, and
    params of one row leave rank 1 an empty shard."""
    ranks = _ran(results, framework)
    uneven = [k for k in SCENARIOS[framework] if "/64/" not in k and not k.startswith("fabric_fsdp1/")]
    for key in uneven:
        numels = [ranks[r][key]["local_numels"] for r in range(RANKS)]
        assert numels[0] != numels[1], (key, numels)
        if framework in ("fabric", "accelerate"):
            assert 0 in numels[1], (key, numels)


def test_fabric_checkpoint_kinds_and_metadata(results):
    for mine in _ran(results, "fabric"):
        for key in ("fabric/distributed/64/0", "fabric/distributed/65/2", "fabric/full/65/0"):
            assert mine[key]["checkpoint_is_dir"] == ("/distributed/" in key), key
            assert mine[key]["metadata_steps"] == 4, key  # what fabric.save was given beside the objects


def test_fabric_fsdp1_refused_by_name_and_the_helper_round_trips(results):
    for rank, mine in enumerate(_ran(results, "fabric")):
        for kind in ("sharded", "full"):
            r = mine[f"fabric_fsdp1/{kind}"]
            assert r["save"]["raised"], (rank, kind)
            assert "microadam_dist.integrations.fsdp.save_checkpoint" in r["save"]["error"], r["save"]
            assert r["untouched"] == [], (rank, kind, r["untouched"])
        helper = mine["fabric_fsdp1/sharded"]["helper"]
        _assert_resumed(rank, "fsdp1 helper", {**helper, "param_types": ["DTensor"]})
        assert helper["param_types"] == ["Parameter"]  # FSDP1's flat params, not DTensors


@pytest.mark.parametrize("framework", ["accelerate", "trainer"])
def test_accelerate_ran_fsdp2_with_the_plugins_state_dict_options(results, framework):
    """Accelerate's FSDP2 path with the plugin's options: sharded -> DCP folder optimizer_0;
    full -> optimizer.bin, gathered with offload_to_cpu and loaded with rank0_only."""
    for mine in _ran(results, framework):
        for key, r in mine.items():
            assert r["distributed_type"] == "DistributedType.FSDP" and r["fsdp_version"] == 2, (key, r)
            files = r["files"] if framework == "accelerate" else r["checkpoint_files"]
            assert r["offload_to_cpu"] is True, (key, r)
            if "FULL_STATE_DICT" in key:
                assert "optimizer.bin" in files and r["rank0_only"] is True, (key, files, r)
            else:
                assert "optimizer_0" in files and "optimizer.bin" not in files, (key, files)
