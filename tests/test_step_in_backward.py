"""MicroAdam(step_in_backward=True) on the CPU (reference backend) against the ordinary step.

The oracle is the ordinary mode of the same optimizer (itself tested against the float64
oracle elsewhere): the same model, data, param groups and LR schedule, stepped by
`opt.step()` after backward, must give bitwise the same params and state as stepping
inside backward, whatever the grouping (one group per tensor, or one for the whole
backward). Per-tensor clipping has its own float64 oracle. FSDP2 and DDP run in real
processes (test_step_in_backward_dist.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from microadam_dist import MicroAdam
from microadam_dist.backward import clip_per_tensor_

HYPER = dict(m=3, density=0.2, topk_block=16, quant_block=8, backend="reference")
TINY, HUGE = 1e-9, 1e3  # backward_bucket_mb: one group per tensor / one group per backward


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40),
                               torch.nn.Tanh(), torch.nn.Linear(40, 3))


def groups(model: torch.nn.Module) -> list[dict]:
    """Three groups with different hyper-parameters, names given (error messages use them)."""
    named = list(model.named_parameters())
    pick = lambda keep: ([p for n, p in named if keep(n)], [n for n, p in named if keep(n)])  # noqa: E731
    out = []
    for keep, hyper in ((lambda n: n.startswith("4."), dict(lr=2e-2, m=2, density=0.3, ef_rounding="stochastic")),
                        (lambda n: n.endswith("weight") and not n.startswith("4."), dict(lr=1e-2, weight_decay=0.05)),
                        (lambda n: n.endswith("bias") and not n.startswith("4."), dict(lr=5e-3))):
        params, names = pick(keep)
        out.append(dict(params=params, param_names=names, **hyper))
    return out


def pair(seed: int, bucket_mb: float = HUGE, **over):
    """(ordinary model, optimizer), (step-in-backward model, optimizer), same init."""
    ma = make_model(seed)
    mb = copy.deepcopy(ma)
    oa = MicroAdam(groups(ma), **{**HYPER, **over})
    ob = MicroAdam(groups(mb), step_in_backward=True, backward_bucket_mb=bucket_mb, **{**HYPER, **over})
    return ma, oa, mb, ob


def batch(gen: torch.Generator):
    return torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)


def loss_of(model, xy):
    x, y = xy
    return torch.nn.functional.mse_loss(model(x), y)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} if opt.state.get(p) else {} for p in model.parameters()]
    return params, states


def assert_same(a, b, where=""):
    (pa, sa), (pb, sb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y), f"{where}: param {i} differs"
    for i, (x, y) in enumerate(zip(sa, sb)):
        assert x.keys() == y.keys(), f"{where}: state {i} keys {x.keys()} vs {y.keys()}"
        for k in x:
            assert torch.equal(x[k], y[k]), f"{where}: state {i} {k!r} differs"


def grads_released(model) -> bool:
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bucket_mb", [TINY, HUGE])
def test_bitwise_equal_to_ordinary_step_with_groups_scheduler_and_accumulate(seed, bucket_mb):
    ma, oa, mb, ob = pair(seed % 1000, bucket_mb)
    decay = lambda t: 0.7 ** t  # noqa: E731
    sa, sb = torch.optim.lr_scheduler.LambdaLR(oa, decay), torch.optim.lr_scheduler.LambdaLR(ob, decay)
    gen = torch.Generator().manual_seed(seed)
    n_params = len(list(mb.parameters()))
    for step in range(1, 7):
        micro = [batch(gen) for _ in range(3 if step in (3, 5) else 1)]  # two steps accumulate 3 micro-batches
        oa.zero_grad()
        for xy in micro:
            loss_of(ma, xy).backward()
        oa.step()
        flushes = ob._backward.flushes
        with ob.accumulate():
            for xy in micro[:-1]:
                loss_of(mb, xy).backward()
        assert ob._backward.flushes == flushes  # nothing stepped inside accumulate()
        loss_of(mb, micro[-1]).backward()
        assert grads_released(mb)
        # One group per tensor, or one group for the whole backward.
        assert ob._backward.flushes - flushes == (n_params if bucket_mb == TINY else 1)
        assert ob.step() is None
        sa.step()
        sb.step()
        assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]
        assert_same(snapshot(ma, oa), snapshot(mb, ob), f"step {step}")
    assert all(int(ob.state[p]["step"]) == 6 for p in mb.parameters())


def test_state_dict_loads_across_modes_and_continues_identically(seed):
    gen = torch.Generator().manual_seed(seed)
    data = [batch(gen) for _ in range(6)]
    ma, oa, mb, ob = pair(seed % 1000, TINY)
    for xy in data[:3]:
        oa.zero_grad()
        loss_of(ma, xy).backward()
        oa.step()
        loss_of(mb, xy).backward()
        ob.step()
    sd_a, sd_b = oa.state_dict(), ob.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"] and sd_a["microadam"] == sd_b["microadam"]
    for k in sd_a["state"]:
        assert all(torch.equal(v, sd_b["state"][k][n]) for n, v in sd_a["state"][k].items())
    # Each mode's checkpoint into a fresh optimizer of the other mode, then three more steps.
    runs = []
    for sd, sib in ((sd_a, True), (sd_b, False)):
        model = copy.deepcopy(ma)
        opt = MicroAdam(groups(model), step_in_backward=sib, **HYPER)
        opt.load_state_dict(copy.deepcopy(sd))
        runs.append((model, opt, sib))
    for xy in data[3:]:
        oa.zero_grad()
        loss_of(ma, xy).backward()
        oa.step()
        for model, opt, sib in runs:
            opt.zero_grad()
            loss_of(model, xy).backward()
            assert grads_released(model) == sib
            opt.step()
    for model, opt, sib in runs:
        assert_same(snapshot(ma, oa), snapshot(model, opt), f"loaded into step_in_backward={sib}")


@pytest.mark.parametrize("first", [True, False])
def test_nonfinite_gradient_skips_that_tensor_only(seed, first):
    """A NaN in one gradient: that tensor keeps its param and state (no state at all on its
    first step), every other tensor steps as the ordinary step does without it."""
    ma, oa, mb, ob = pair(seed % 1000, TINY)
    gen = torch.Generator().manual_seed(seed)
    bad = dict(mb.named_parameters())["2.weight"]
    bad_a = dict(ma.named_parameters())["2.weight"]
    for step in range(1, 4):
        xy = batch(gen)
        poison = step == (1 if first else 2)
        oa.zero_grad()
        loss_of(ma, xy).backward()
        if poison:
            bad_a.grad = None  # the oracle: the ordinary step without that tensor
        oa.step()
        handle = bad.register_hook(lambda g: g * float("nan")) if poison else None
        before = (bad.detach().clone(), {k: v.clone() for k, v in ob.state[bad].items()} if bad in ob.state else {})
        loss_of(mb, xy).backward()
        if handle is not None:
            handle.remove()
        ob.step()
        assert grads_released(mb)
        if poison:
            assert torch.equal(bad.detach(), before[0])
            if first:
                assert not ob.state.get(bad)
            else:
                assert all(torch.equal(v, ob.state[bad][k]) for k, v in before[1].items())
        assert_same(snapshot(ma, oa), snapshot(mb, ob), f"step {step}")
    assert ob.nonfinite_skips == 1


def test_nonfinite_raise_names_the_tensor_after_stepping_the_others(seed):
    _, _, mb, ob = pair(seed % 1000, TINY, nonfinite="raise")
    xy = batch(torch.Generator().manual_seed(seed))
    bad = dict(mb.named_parameters())["0.bias"]
    bad.register_hook(lambda g: g * float("inf"))
    before = {n: p.detach().clone() for n, p in mb.named_parameters()}
    loss_of(mb, xy).backward()
    with pytest.raises(FloatingPointError, match=r"'0\.bias'.*unchanged"):
        ob.step()
    for n, p in mb.named_parameters():
        assert torch.equal(p.detach(), before[n]) == (n == "0.bias"), n
    assert not ob.state.get(bad) and ob.nonfinite_skips == 1


def test_step_completes_closure_refused_zero_grad_harmless(seed):
    ma, oa, mb, ob = pair(seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    # Gradients set by hand (no backward): step() steps them, as the ordinary step does.
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        pa.grad = torch.randn(pa.shape, generator=gen)
        pb.grad = pa.grad.clone()
    oa.step()
    ob.step()
    assert_same(snapshot(ma, oa), snapshot(mb, ob), "hand-set gradients")
    ob.zero_grad()
    oa.zero_grad()
    xy = batch(gen)
    loss_of(mb, xy).backward()
    ob.zero_grad()  # after the step inside backward: nothing left to clear, nothing undone
    ob.step()
    loss_of(ma, xy).backward()
    oa.step()
    assert_same(snapshot(ma, oa), snapshot(mb, ob), "zero_grad between backward and step")
    with pytest.raises(RuntimeError, match="takes no closure"):
        ob.step(lambda: loss_of(mb, xy))


def test_hooks_follow_params_replaced_after_construction(seed):
    """As Accelerate does for FSDP2: the optimizer's param lists are swapped for new params
    after it was built; the first forward attaches the hooks to them before backward."""
    ma, oa, mb, ob = pair(seed % 1000, TINY)
    fresh = copy.deepcopy(mb)
    old = list(mb.parameters())
    for g in ob.param_groups:
        g["params"] = [dict(zip(map(id, old), fresh.parameters()))[id(p)] for p in g["params"]]
    xy = batch(torch.Generator().manual_seed(seed))
    loss_of(fresh, xy).backward()
    assert grads_released(fresh) and ob._backward.flushes == len(old)
    ob.step()
    oa.zero_grad()
    loss_of(ma, xy).backward()
    oa.step()
    assert_same(snapshot(ma, oa), snapshot(fresh, ob), "replaced params")
    # The old params lost their hooks: their gradients stay, nothing steps them.
    loss_of(mb, xy).backward()
    assert all(p.grad is not None for p in old) and ob._backward.flushes == len(old)


def test_clip_per_tensor_matches_float64_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen) * s for n, s in ((7, 0.01), (100, 3.0), (33, 1.0))]
    grads.append(torch.randn(50, generator=gen).to(torch.bfloat16) * 5)
    want = []
    for g in grads:
        g64 = g.double()
        coef = min(1.0, 0.5 / (float(g64.norm()) + 1e-6))
        want.append(g64 * coef)
    clip_per_tensor_(grads, 0.5)
    for g, w in zip(grads, want):
        tol = 2 ** -7 if g.dtype == torch.bfloat16 else 1e-6
        assert torch.allclose(g.double(), w, rtol=tol, atol=0), (g, w)
    assert float(grads[0].norm()) < 0.5 and abs(float(grads[1].norm()) - 0.5) < 1e-5


def test_per_tensor_clipping_applies_before_each_step(seed):
    ma, oa, mb, ob = pair(seed % 1000, TINY)
    ob._backward.max_norm = 0.05  # as MicroAdam(max_grad_norm_per_tensor=0.05) sets it
    gen = torch.Generator().manual_seed(seed)
    clipped = 0
    for step in range(3):
        xy = batch(gen)
        oa.zero_grad()
        loss_of(ma, xy).backward()
        grads = [p.grad for p in ma.parameters()]
        clipped += sum(float(g.norm()) > 0.05 for g in grads)
        clip_per_tensor_(grads, 0.05)
        oa.step()
        loss_of(mb, xy).backward()
        ob.step()
        assert_same(snapshot(ma, oa), snapshot(mb, ob), f"step {step}")
    assert clipped > 0  # the clipping did something


def test_options_validated():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for kwargs, match in ((dict(step_in_backward=1), "step_in_backward"),
                          (dict(step_in_backward=True, backward_bucket_mb=0), r"backward_bucket_mb: 0;.*\(0\.0, inf\]"),
                          (dict(step_in_backward=True, max_grad_norm_per_tensor=-1.0), "max_grad_norm_per_tensor"),
                          (dict(max_grad_norm_per_tensor=1.0), "needs step_in_backward=True")):
        with pytest.raises(ValueError, match=match):
            MicroAdam(p, **kwargs)
    opt = MicroAdam(p, step_in_backward=True, max_grad_norm_per_tensor=1.0)
    assert opt._backward.max_norm == 1.0 and "step_in_backward" not in opt.param_groups[0]
    with opt.accumulate():
        pass
    with MicroAdam(p).accumulate():  # the ordinary mode: nothing to do
        pass


def test_grad_scaler_refused(seed):
    _, _, mb, ob = pair(seed % 1000)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(mb, batch(torch.Generator().manual_seed(seed)))).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(ob)


def test_deepspeed_json_refuses_step_in_backward():
    from microadam_dist.integrations.deepspeed import validate_params
    with pytest.raises(ValueError, match="step_in_backward.*DeepSpeed"):
        validate_params({"lr": 1e-3, "step_in_backward": True})


def test_hf_trainer_accumulation_honoured_and_global_clipping_refused(tmp_path, seed):
    """A real HF Trainer with gradient_accumulation_steps=2 (it tells Accelerate which
    micro-batches must not step): the same params as the ordinary mode, one group per
    optimizer step. Its default max_grad_norm=1.0 would clip nothing: refused by name."""
    from transformers import Trainer, TrainingArguments

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model(seed % 1000)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen)
    data = [{"x": x, "labels": y} for x, y in zip(xs, ys)]

    def train(step_in_backward: bool, max_grad_norm: float):
        model = Model()
        opt = MicroAdam(groups(model.net), step_in_backward=step_in_backward, **HYPER)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 max_steps=3, max_grad_norm=max_grad_norm, use_cpu=True, report_to=[],
                                 logging_strategy="no", save_strategy="no", lr_scheduler_type="constant",
                                 disable_tqdm=True, seed=seed % 1000)
        Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
        return model, opt

    ma, oa = train(False, 0.0)
    mb, ob = train(True, 0.0)
    assert_same(snapshot(ma.net, oa), snapshot(mb.net, ob), "Trainer, gradient_accumulation_steps=2")
    assert ob._backward.flushes == 3 and {int(s["step"]) for s in ob.state.values()} == {3}
    from accelerate.state import GradientState
    try:
        with pytest.raises(ValueError, match=r"max_grad_norm=1\.0 .*max_grad_norm_per_tensor"):
            train(True, 1.0)
    finally:
        # The refused run stopped on a micro-batch that does not sync: Accelerate's process-wide
        # flag would make every later backward in this process accumulate (as Accelerate's own
        # optimizer wrapper would skip every step).
        GradientState._reset_state()


def test_a_backward_that_raised_does_not_break_the_next(seed):
    """An exception inside backward (after some params were queued, before its end) skips the
    end-of-backward callback; the next backward still steps every param exactly once."""
    ma, oa, mb, ob = pair(seed % 1000, HUGE)
    gen = torch.Generator().manual_seed(seed)
    handle = dict(mb.named_parameters())["0.weight"].register_hook(lambda g: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        loss_of(mb, batch(gen)).backward()
    handle.remove()
    ob.zero_grad()
    xy = batch(gen)
    loss_of(mb, xy).backward()
    ob.step()
    loss_of(ma, xy).backward()
    oa.step()
    assert grads_released(mb) and {int(s["step"]) for s in ob.state.values()} == {1}
    assert_same(snapshot(ma, oa), snapshot(mb, ob), "after a failed backward")


def test_default_bucket_is_a_sixteenth_of_the_gradients(seed):
    """backward_bucket_mb=None: buckets of ceil(total gradient bytes / 16), at least 32 MiB,
    recomputed when the param groups change. Meta tensors: sizes without memory."""
    gen = torch.Generator().manual_seed(seed)
    rows = [int(r) for r in torch.randint(512, 4096, (20,), generator=gen)]
    big = [torch.nn.Parameter(torch.empty(r, 4096, device="meta")) for r in rows]  # 0.6-1.3 GiB fp32
    opt = MicroAdam(big[:-1], step_in_backward=True)
    total = 4 * 4096 * sum(rows[:-1])
    assert opt._backward.bucket_bytes == max(32 * 2**20, -(-total // 16))
    opt.add_param_group({"params": [big[-1]]})
    assert opt._backward.bucket_bytes == max(32 * 2**20, -(-(total + 4 * 4096 * rows[-1]) // 16))
    small = MicroAdam([torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))], step_in_backward=True)
    assert small._backward.bucket_bytes == 32 * 2**20
    frozen = torch.nn.Parameter(torch.empty(2**20, 64, device="meta"), requires_grad=False)
    assert MicroAdam([frozen, big[0]], step_in_backward=True)._backward.bucket_bytes == 32 * 2**20
    assert MicroAdam(big, step_in_backward=True, backward_bucket_mb=1.5)._backward.bucket_bytes == int(1.5 * 2**20)
