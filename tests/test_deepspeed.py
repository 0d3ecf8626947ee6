"""DeepSpeed integration, end to end on the CPU: real torchrun processes, gloo, ZeRO 0-3.

Two launches (tests/dist_scripts/ds_worker.py on 2 ranks, then ds_single.py on 1 rank)
record what happened; the checks below compare it with independent expectations:
partition sizes computed from the model, gradients from a float64 oracle, the
reference step applied in this process, bitwise snapshots for resumes and skips.
fp16 is not exercised: DeepSpeed refuses fp16 on CPUs without AVX512-FP16 (this one);
the overflow-skip path is tested with bf16 and `check_grad_overflow` instead.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from dist_scripts.ds_common import HYPER, Tiny, batch, param_groups
from microadam_dist import Layout, MicroAdamConfig, state_bytes
from microadam_dist.ops import reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2
CLIP = 0.3
SIZE_KEYS = ("m", "density", "topk_block", "quant_block")
SIZES = {k: HYPER[k] for k in SIZE_KEYS}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def launch(nproc: int, script: str, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           os.path.join(HERE, "dist_scripts", script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    seed = int.from_bytes(os.urandom(3), "little")
    print(f"random seed: {seed}")
    launch(WORLD, "ds_worker.py", str(out), str(seed))
    launch(1, "ds_single.py", str(out), str(seed), str(out / "ckpt"))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "single": torch.load(out / "single.pt", weights_only=False), "seed": seed,
            "out": out}


def model_params() -> list[tuple[str, torch.Size]]:
    return [(n, p.shape) for n, p in Tiny().named_parameters()]


def group_numels() -> list[list[int]]:
    return [[p.numel() for p in g["params"]] for g in param_groups(Tiny())]


def expected_numels(stage: int) -> list[list[int]] | None:
    """Per param group, this rank's tensor sizes as DeepSpeed documents its partitioning."""
    if stage == 0:
        return [n for n in group_numels()]
    if stage in (1, 2):  # group flattened, padded to a multiple of 2 * world (4-byte alignment)
        return [[math.ceil(sum(g) / (2 * WORLD)) * 2] for g in group_numels()]
    return None  # ZeRO-3: checked through per-param slices below


def coverage(metas: list[dict]) -> dict[str, torch.Tensor]:
    """How many times each parameter element is covered by the ranks' pieces."""
    counts = {n: torch.zeros(s.numel(), dtype=torch.int64) for n, s in model_params()}
    for meta in metas:
        for t in meta["tensors"]:
            for pc in t["pieces"]:
                counts[pc["name"]][pc["param_offset"]:pc["param_offset"] + pc["length"]] += 1
    return counts


def test_zero_stages_train_with_partition_sized_state(runs):
    total = sum(s.numel() for _, s in model_params())
    for (stage, dtype), r0 in runs["ranks"][0]["train"].items():
        label = f"ZeRO-{stage} {dtype}"
        per_rank = [rk["train"][(stage, dtype)] for rk in runs["ranks"]]
        for rank, res in enumerate(per_rank):
            assert res["basic"] == "DeepSpeedMicroAdam", label
            assert all(math.isfinite(x) for x in res["losses"]), label
            changed = [n for n in res["before"] if not torch.equal(res["before"][n], res["after"][n])]
            assert len(changed) == len(res["before"]), f"{label}: params left unchanged"
            # 6 micro-batches with accumulation 2 -> 3 optimizer steps; DeepSpeed's scheduler drives our lr.
            assert res["global_steps"] == 3, label
            assert res["lr"] == res["sched_lr"] and res["lr"][0] != HYPER["lr"], label
            tensors = res["state"]["tensors"]
            assert res["state"]["stray_entries"] == 0, label
            numels = [t["numel"] for t in tensors]
            for t in tensors:
                assert t["step"] == 3, f"{label}: step {t['step']}"
                assert t["bytes"] == state_bytes(t["numel"], **SIZES), label
                assert Layout.from_tensor(torch.tensor(t["layout"])).n == t["numel"], label
            exp = expected_numels(stage)
            if exp is not None:
                assert numels == [n for g in exp for n in g], f"{label}: {numels} vs {exp}"
            assert sum(t["bytes"] for t in tensors) == state_bytes(numels, **SIZES), label
        metas = [res["meta"] for res in per_rank]
        counts = coverage(metas)
        bytes_all = sum(sum(t["bytes"] for t in res["state"]["tensors"]) for res in per_rank)
        numel_all = sum(sum(t["numel"] for t in res["state"]["tensors"]) for res in per_rank)
        if stage == 0:
            assert all(bool((c == WORLD).all()) for c in counts.values()), label  # replicated
            assert bytes_all == WORLD * state_bytes([n for g in group_numels() for n in g], **SIZES)
        else:
            assert all(bool((c == 1).all()) for c in counts.values()), f"{label}: partitions overlap or miss"
            assert total <= numel_all <= total + 4 * WORLD * len(model_params()), label
            # One copy for the model, up to block rounding of the smaller shards.
            assert bytes_all <= 1.25 * state_bytes(total, **SIZES), label
        if stage == 3:
            g_sizes = [sum(math.ceil(n / WORLD) for n in g) for g in group_numels()]
            by_group = [sum(t["numel"] for t in metas[0]["tensors"] if t["group"] == gi) for gi in range(2)]
            assert by_group == g_sizes, label
            assert len(metas[0]["tensors"]) > 2, "ZeRO-3 sub-groups were not cut (sub_group_size)"


def full_from_partitions(tensors_per_rank, metas) -> dict[str, torch.Tensor]:
    out = {n: torch.full((s.numel(),), float("nan"), dtype=torch.float64) for n, s in model_params()}
    for tensors, meta in zip(tensors_per_rank, metas):
        for t, tm in zip(tensors, meta["tensors"]):
            for pc in tm["pieces"]:
                out[pc["name"]][pc["param_offset"]:pc["param_offset"] + pc["length"]] = \
                    t[pc["offset"]:pc["offset"] + pc["length"]].double()
    return out


def oracle_grads(params: dict[str, torch.Tensor], seed: int, step: int) -> dict[str, torch.Tensor]:
    """float64 gradient of the mean loss over both ranks x 2 micro-batches, clipped as DeepSpeed does."""
    model = Tiny().double()
    shapes = dict(model_params())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n].view(shapes[n]))
    for rank in range(WORLD):
        for micro in range(2):
            x, y = batch(seed, step, rank, micro)
            (model(x.double(), y.double()) / (2 * WORLD)).backward()
    grads = {n: p.grad.reshape(-1).clone() for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    scale = min(1.0, CLIP / (norm + 1e-6))
    return {n: g * scale for n, g in grads.items()}


def test_zero12_equals_reference_on_two_partitions(runs):
    """ZeRO-1/2 on 2 ranks == this process stepping the same two flat partitions with the reference."""
    seed = runs["seed"]
    for stage in (1, 2):
        logs = [rk["equiv"][stage] for rk in runs["ranks"]]
        metas = [lg["meta"] for lg in logs]
        steps = len(logs[0]["pre"])
        assert steps == 4
        for t in range(steps):
            # The gradients DeepSpeed hands MicroAdam are the partitions of the full-batch gradient.
            params = full_from_partitions([lg["pre"][t] for lg in logs], metas)
            want = oracle_grads(params, seed, t)
            for lg, meta in zip(logs, metas):
                for g, tm in zip(lg["grad"][t], meta["tensors"]):
                    exp = torch.zeros(g.numel(), dtype=torch.float64)
                    for pc in tm["pieces"]:
                        exp[pc["offset"]:pc["offset"] + pc["length"]] = \
                            want[pc["name"]][pc["param_offset"]:pc["param_offset"] + pc["length"]]
                    torch.testing.assert_close(g.double(), exp, rtol=1e-4, atol=1e-7)
        # The reference step, one partition at a time, reproduces DeepSpeed's result bitwise.
        for rank, lg in enumerate(logs):
            for i, tm in enumerate(metas[rank]["tensors"]):
                group_wd = HYPER["weight_decay"] if tm["group"] == 0 else 0.0
                cfg = MicroAdamConfig.from_kwargs(**{**HYPER, "weight_decay": group_wd})
                param = lg["pre"][0][i].clone()
                layout = Layout.for_numel(param.numel(), cfg)
                state = layout.new_state(param.device)
                for t in range(steps):
                    state["step"] += 1
                    hp = reference.StepHyper(lr=lg["lr"][t][i], beta1=cfg.betas[0], beta2=cfg.betas[1],
                                             eps=cfg.eps, weight_decay=group_wd, ef_rounding=cfg.ef_rounding,
                                             alpha=cfg.alpha)
                    reference.step_shard(param, lg["grad"][t][i], state, layout, hp)
                    assert torch.equal(param, lg["post"][t][i]), f"ZeRO-{stage} rank {rank} tensor {i} step {t + 1}"
        # ...and DeepSpeed copies the partitions back into the model.
        final = full_from_partitions([lg["post"][-1] for lg in logs], metas)
        for n, p in logs[0]["final_params"].items():
            assert torch.equal(p.double().reshape(-1), final[n]), n


def test_checkpoint_resume_is_bitwise(runs):
    for rk in runs["ranks"]:
        for stage in (0, 1, 2, 3):
            res = rk["resume"][stage]
            assert res["loaded"], stage
            assert res["load_equal"], f"ZeRO-{stage}: loaded state differs from the saved one"
            assert res["end_equal"], f"ZeRO-{stage}: resumed run diverged from the uninterrupted one"
            assert res["losses"][0] == res["losses"][1] and res["steps"] == (4, 4) and res["lr"][0] == res["lr"][1]
            assert "microadam_layout.json" in res["files"]
    # The saved optimizer state carries the partition map the reshard tool needs.
    ckpt = runs["out"] / "ckpt" / "stage2" / "t2"
    for rank in range(WORLD):
        sd = torch.load(ckpt / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        meta = sd["optimizer_state_dict"]["base_optimizer_state"]["microadam"]["partition"]
        assert (meta["zero_stage"], meta["world_size"], meta["rank"], meta["partitioning"]) == (2, WORLD, rank, "flat")
        for t, numels in zip(meta["tensors"], expected_numels(2)):
            assert t["numel"] == numels[0] and t["global_offset"] == rank * t["numel"]
            assert t["group_numel"] == WORLD * t["numel"]


def test_zero_to_fp32_exports_the_saved_weights(runs, tmp_path):
    """DeepSpeed's exporter, called as users call it, on the 2-rank bf16 checkpoints of
    scenario_resume: its fp32 weights are bitwise DeepSpeed's own gathered fp32 master at
    the save (safe_get_full_fp32_param), and round to the module's bf16 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    shapes = dict(model_params())
    for stage in (1, 2, 3):
        res = runs["ranks"][0]["resume"][stage]
        master, module = res["fp32_at_save"], res["module_at_save"]
        ckpt = runs["out"] / "ckpt" / f"stage{stage}"
        exports = {"function": get_fp32_state_dict_from_zero_checkpoint(str(ckpt))}
        if stage in (2, 3):
            # The copy DeepSpeed puts beside the checkpoint, run from inside that folder.
            out = tmp_path / f"fp32_stage{stage}"
            proc = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(out)], cwd=ckpt,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            exports["script"] = torch.load(out / "pytorch_model.bin", weights_only=True)
        for how, sd in exports.items():
            label = f"ZeRO-{stage} {how}"
            assert sd.keys() == shapes.keys(), label
            for n, w in sd.items():
                assert master[n] is not None and master[n].dtype == torch.float32, label
                assert w.dtype == torch.float32 and w.shape == shapes[n], f"{label} {n}"
                assert torch.equal(w, master[n].reshape(shapes[n])), f"{label} {n}: export != fp32 master"
                assert torch.equal(w.bfloat16().float(), module[n].reshape(shapes[n])), f"{label} {n}"


def test_other_stage_or_world_size_is_refused_before_anything_moves(runs):
    refuse = runs["ranks"][0]["refuse"]
    for name, (src, dst) in {"3<-2": (2, 3), "0<-1": (1, 0)}.items():
        err = refuse[name]["error"]
        assert err is not None, f"{name}: load was not refused"
        assert f"ZeRO stage {src}" in err and f"ZeRO stage {dst}" in err and "reshard" in err, err
        assert refuse[name]["untouched"], f"{name}: refused load modified the engine"
    # ZeRO-1 and ZeRO-2 cut identical partitions: the stage-2 state loads into ZeRO-1 as saved.
    assert refuse["1<-2"]["error"] is None
    from dist_scripts.ds_common import same
    assert same(refuse["1<-2"]["state"], runs["ranks"][0]["resume"]["ckpt_state"])
    wr = runs["single"]["world_refusal"]
    assert wr["error"] is not None and "world size 2" in wr["error"] and "world size 1" in wr["error"], wr
    assert "reshard" in wr["error"] and wr["untouched"]


def test_overflow_step_skipped_by_deepspeed_leaves_state_untouched(runs):
    for rk in runs["ranks"]:
        for stage, res in rk["skip"].items():
            assert res["skipped"] == 1, f"ZeRO-{stage}: DeepSpeed did not skip the overflow step"
            assert res["ms_skips"] == 0, "the skip must come from DeepSpeed (nonfinite='off')"
            assert res["untouched"], f"ZeRO-{stage}: EF/window/params changed on a skipped step"
            assert set(res["steps_after"]) == {2}, res  # the skipped step did not count


def test_json_params_validated_at_initialize(runs):
    single = runs["single"]
    assert single["deepspeed_loaded_by_import"] is False
    assert single["case_insensitive"] == "DeepSpeedMicroAdam"
    fields = {"unknown key": "k_initt", "density out of range": "density",
              "topk_block too large": "topk_block", "ef_rounding choice": "ef_rounding",
              "alpha -2": "alpha", "step_in_backward": "step_in_backward"}
    for label, field in fields.items():
        res = single["bad"][label]
        assert res["error"] is not None and field in res["error"] and "optimizer.params" in res["error"], res
        assert res["untouched"], f"{label}: model modified by a failed initialize"
    assert "accepted: lr, betas" in single["bad"]["unknown key"]["error"]
    assert "elastic_checkpoint" in single["elastic_error"]
    for err in (single["bad"]["step_in_backward"]["error"], single["client_in_backward_error"]):
        assert err is not None and "step_in_backward is not supported under DeepSpeed" in err, err


def test_import_does_not_import_deepspeed():
    code = "import sys, microadam_dist; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def test_reshard_tool_reads_every_stage(runs, tmp_path, capsys):
    """The 2-rank bf16 checkpoints of ZeRO-0..3 (scenario_resume) -> 3 ranks, offline.
    ZeRO-0 is replicated: copied as is. ZeRO-1/2/3: every window entry is kept or folded,
    the files keep DeepSpeed's bf16_ names, and the new partition metadata covers every
    parameter element exactly once."""
    import json

    from microadam_dist.checkpoint.__main__ import main as cli

    for stage in (0, 1, 2, 3):
        src = runs["out"] / "ckpt" / f"stage{stage}"
        dst = tmp_path / f"stage{stage}"
        assert cli(["reshard", "--src", str(src), "--dst", str(dst), "--world-size", "3"]) == 0, stage
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (dst / "latest").read_text() == "t2"
        files = sorted(os.listdir(dst / "t2"))
        record = json.loads((dst / "t2" / "microadam_layout.json").read_text())
        if stage == 0:
            assert files == ["microadam_layout.json", "mp_rank_00_model_states.pt"]
            a = torch.load(src / "t2" / "mp_rank_00_model_states.pt", weights_only=False)
            b = torch.load(dst / "t2" / "mp_rank_00_model_states.pt", weights_only=False)
            assert b["dp_world_size"] == 3 and report["entries_in"] == 0
            assert equal(a["optimizer"], b["optimizer"])  # the state, unchanged
            continue
        assert [f for f in files if f.endswith("optim_states.pt")] == \
            [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3)], files
        assert record["signature"]["world_size"] == 3 and record["signature"]["zero_stage"] == stage
        assert report["entries_kept"] + report["entries_folded"] == report["entries_in"] > 0
        metas = [torch.load(dst / "t2" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
                 ["optimizer_state_dict"] for r in range(3)]
        metas = [(m.get("base_optimizer_state") or m["optimizer_state_dict"])["microadam"]["partition"]
                 for m in metas]
        assert [m["rank"] for m in metas] == [0, 1, 2]
        counts = coverage(metas)
        assert all(bool((c == 1).all()) for c in counts.values()), f"ZeRO-{stage}: pieces overlap or miss"
