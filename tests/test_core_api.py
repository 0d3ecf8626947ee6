"""MicroAdam's public behaviour: validation, state size, state_dict, gradients, dtypes."""

import io

import numpy as np
import pytest
import torch

import oracle
from microadam_dist import Layout, MicroAdam, MicroAdamConfig, state_bytes


def state_nbytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())


def snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if opt.state[p]})


def assert_same(snap_a, snap_b):
    for x, y in zip(snap_a[0], snap_b[0]):
        assert torch.equal(x, y)
    assert snap_a[1].keys() == snap_b[1].keys()
    for key in snap_a[1]:
        for k in snap_a[1][key]:
            assert torch.equal(snap_a[1][key][k], snap_b[1][key][k]), k


# -- hyper-parameters ---------------------------------------------------------------

@pytest.mark.parametrize("field,value,fragment", [
    ("lr", -1e-3, "[0.0, inf]"), ("lr", float("nan"), "lr"), ("betas", (0.9, 1.0), "betas[1]"),
    ("betas", (-0.1, 0.9), "betas[0]"), ("betas", 0.9, "pair"), ("eps", -1.0, "eps"), ("eps", 0.0, "(0.0, inf]"),
    ("weight_decay", -0.1, "weight_decay"), ("m", 0, "[1, 1024]"), ("m", 2.5, "integer"),
    ("density", 0.0, "(0.0, 1.0]"), ("density", 1.5, "density"), ("topk_block", 40000, "int16"),
    ("topk_block", 0, "topk_block"), ("quant_block", 0, "quant_block"),
    ("ef_rounding", "up", "'nearest', 'stochastic'"), ("nonfinite", "ignore", "nonfinite"),
    ("backend", "triton", "backend"), ("k_init", -0.5, "density"), ("quant_block_size", -3, "quant_block"),
])
def test_invalid_hyperparameter_names_field_value_and_range(field, value, fragment):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError) as err:
        MicroAdam([p], **{field: value})
    msg = str(err.value)
    assert fragment in msg and repr(value) in msg


def test_invalid_group_value_names_the_group():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"param_groups\[1\].*Invalid m: -2"):
        MicroAdam([{"params": [a]}, {"params": [b], "m": -2}])


def test_unknown_and_doubled_names():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises((TypeError, ValueError), match="momentum"):
        MicroAdam([p], momentum=0.9)
    with pytest.raises(ValueError, match="given twice"):
        MicroAdam([p], density=0.01, k_init=0.02)


def test_alpha_minus_2_is_refused_with_its_reason():
    """The published package's alpha=-2 needs a float buffer of each param's size."""
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"Invalid alpha: -2; allowed range is \[0.0, 1.0\).*dense buffer"):
        MicroAdam([p], alpha=-2)
    assert MicroAdam([p], alpha=0.5).param_groups[0]["alpha"] == 0.5


def test_published_aliases_mean_our_names():
    p = torch.nn.Parameter(torch.zeros(3))
    g = MicroAdam([p], k_init=0.05, quant_block_size=128).param_groups[0]
    assert g["density"] == 0.05 and g["quant_block"] == 128
    assert "k_init" not in g and "quant_block_size" not in g


# -- memory -------------------------------------------------------------------------

def test_state_of_10m_params_matches_state_bytes_and_is_under_0905_bytes(seed):
    shapes = [(4096, 1024), (1024, 4096), (1536, 1100), (7, 33), (1000,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    numel = sum(p.numel() for p in params)
    assert numel >= 10_000_000
    opt = MicroAdam(params, m=10, density=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    allocated = state_nbytes(opt)
    assert allocated == state_bytes([p.numel() for p in params], m=10, density=0.01)
    assert allocated / numel <= 0.905
    # and the formula of docs/algorithm.md, computed independently
    expect = 0
    for p in params:
        n = p.numel()
        ks = sum(oracle.k_for(0.01, min(4096, n - s)) for s in range(0, n, 4096))
        expect += (n + 1) // 2 + 8 * -(-n // 4096) + 10 * ks * 4 + 64
    assert allocated == expect


def test_state_bytes_validates_and_accepts_lists():
    assert state_bytes(0) == 0
    assert state_bytes([100, 200], m=3) == state_bytes(100, m=3) + state_bytes(200, m=3)
    with pytest.raises(ValueError, match="density"):
        state_bytes(100, density=2.0)


# -- state_dict -------------------------------------------------------------------

def _model_and_opt(seed, **kw):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 7), (1001,), (5,)]]
    return params, MicroAdam(params, lr=1e-2, m=4, density=0.05, topk_block=256, quant_block=100, **kw)


def _run_and_save(seed, grads, steps, **kw):
    """A run of `steps` steps on `grads`, and its params and state dict as read back from a file."""
    pa, oa = _model_and_opt(seed, **kw)
    for t in range(steps):
        for p, g in zip(pa, grads[t]):
            p.grad = g.clone()
        oa.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in pa], "opt": oa.state_dict()}, buf)
    buf.seek(0)
    return pa, oa, torch.load(buf)


def _resumed(seed, saved, **kw):
    """Another run (other initial params) that loads the saved params and state dict."""
    pb, ob = _model_and_opt(seed, **kw)
    with torch.no_grad():
        for p, v in zip(pb, saved["params"]):
            p.copy_(v)
    ob.load_state_dict(saved["opt"])
    return pb, ob


def _step_both_and_compare(grads, pa, oa, pb, ob):
    for p, q, g in zip(pa, pb, grads):
        p.grad, q.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        assert oa.state[p].keys() == ob.state[q].keys()
        for k in oa.state[p]:
            assert torch.equal(oa.state[p][k], ob.state[q][k]), k


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_state_dict_round_trip_resumes_bitwise(seed, rounding):
    grads = [[torch.randn(s) for s in [(300, 7), (1001,), (5,)]] for _ in range(12)]
    pa, oa, saved = _run_and_save(seed, grads, 6, ef_rounding=rounding)
    pb, ob = _resumed(seed + 1, saved, ef_rounding=rounding)
    assert ob.state[pb[0]]["ef_min"].dtype == torch.float32
    for t in range(6, 12):
        _step_both_and_compare(grads[t], pa, oa, pb, ob)


def test_a_state_dict_without_alpha_resumes_bitwise_with_alpha_off(seed):
    """A state dict written before `alpha` existed has no 'alpha' in its groups: such a run
    used none, so it resumes with alpha = 0 even in an optimizer built with another alpha."""
    grads = [[torch.randn(s) for s in [(300, 7), (1001,), (5,)]] for _ in range(10)]
    pa, oa, saved = _run_and_save(seed, grads, 5, backend="reference")
    for group in saved["opt"]["param_groups"]:
        del group["alpha"]
    pb, ob = _resumed(seed + 1, saved, backend="reference", alpha=0.5)
    for t in range(5, 10):
        _step_both_and_compare(grads[t], pa, oa, pb, ob)
    assert [group["alpha"] for group in ob.param_groups] == [0.0]


def test_loading_another_layout_is_refused_and_changes_nothing(seed):
    src = torch.nn.Parameter(torch.randn(1000))
    o1 = MicroAdam([src], topk_block=128, quant_block=64)
    src.grad = torch.randn(1000)
    o1.step()
    dst = torch.nn.Parameter(torch.randn(600))  # e.g. another world size's shard
    o2 = MicroAdam([dst], topk_block=128, quant_block=64)
    dst.grad = torch.randn(600)
    o2.step()
    before = snapshot([dst], o2)
    with pytest.raises(ValueError) as err:
        o2.load_state_dict(o1.state_dict())
    msg = str(err.value)
    assert "n=1000" in msg and "n=600" in msg and "reshard" in msg
    assert_same(before, snapshot([dst], o2))


def test_a_state_that_no_longer_fits_fails_the_step_in_every_group(seed):
    """A group whose block sizes changed after its state was made fails the step before any
    group is stepped: the first group's params and state stay as they were."""
    a, b = torch.nn.Parameter(torch.randn(3000)), torch.nn.Parameter(torch.randn(2000))
    opt = MicroAdam([{"params": [a]}, {"params": [b]}], topk_block=256, quant_block=64)
    a.grad, b.grad = torch.randn(3000), torch.randn(2000)
    opt.step()
    opt.param_groups[1]["quant_block"] = 128  # b's state was laid out for 64
    a.grad, b.grad = torch.randn(3000), torch.randn(2000)
    before = snapshot([a, b], opt)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\].*reshard"):
        opt.step()
    assert_same(before, snapshot([a, b], opt))


def test_corrupt_state_entry_is_refused():
    p = torch.nn.Parameter(torch.randn(100))
    opt = MicroAdam([p])
    p.grad = torch.randn(100)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["win_val"] = sd["state"][0]["win_val"].float()
    with pytest.raises(ValueError, match="win_val.*corrupt"):
        MicroAdam([p]).load_state_dict(sd)
    del sd["state"][0]["ef"]
    with pytest.raises(ValueError, match="lacks"):
        MicroAdam([p]).load_state_dict(sd)


# -- gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip_leaves_everything_untouched(bad, seed):
    params, opt = _model_and_opt(seed)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(params, opt)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[17] = bad
    opt.step()
    assert opt.nonfinite_skips == 1
    assert_same(before, snapshot(params, opt))
    assert opt.state_dict()["microadam"]["nonfinite_skips"] == 1


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_rejected_first_step_creates_no_state(mode, seed):
    """The states of a param's first step are created before the gradient check has answered
    (the host plans while the GPU checks); a skipped or raising step drops them again."""
    params, opt = _model_and_opt(seed, nonfinite=mode)
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad.view(-1)[-1] = float("nan")
    before = [p.detach().clone() for p in params]
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            opt.step()
    else:
        opt.step()
    assert len(opt.state) == 0 and not opt._layouts
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    params[-1].grad.view(-1)[-1] = 0.0
    opt.step()
    assert all(int(opt.state[p]["step"]) == 1 for p in params)


def test_nonfinite_raise_names_the_tensor_and_changes_nothing(seed):
    params, opt = _model_and_opt(seed, nonfinite="raise")
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[2\]"):
        opt.step()
    assert all(not opt.state[p] for p in params)


def test_nonfinite_off_does_not_check(seed):
    params, opt = _model_and_opt(seed, nonfinite="off")
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert opt.nonfinite_skips == 0 and int(opt.state[params[0]]["step"]) == 1


def test_sparse_and_complex_gradients_are_rejected():
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        MicroAdam([p]).step()
    c = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    c.grad = torch.randn(4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        MicroAdam([c]).step()


def test_params_without_grad_or_elements_are_skipped(seed):
    a, b, e = (torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50)),
               torch.nn.Parameter(torch.zeros(0)))
    opt = MicroAdam([a, b, e])
    a.grad, e.grad = torch.randn(50), torch.zeros(0)
    b0 = b.detach().clone()
    opt.step()
    assert opt.state[a] and not opt.state[b] and not opt.state[e]
    assert torch.equal(b, b0)


def test_closure_and_scheduler_lr_is_read_every_step(seed):
    from test_core_reference import global_rows

    p = torch.nn.Parameter(torch.randn(64))
    opt = MicroAdam([p], lr=1.0, m=3, density=0.25, topk_block=64, quant_block=64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for t in range(1, 5):
        theta0 = p.detach().double().numpy().copy()

        def closure():
            opt.zero_grad()
            loss = (p ** 2).sum()
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.isclose(loss, torch.tensor(theta0 ** 2).sum().float())
        st = opt.state[p]
        rows = global_rows(st["win_idx"].long().numpy(), st["win_val"].double().numpy(), 64, 64, 0.25)
        m_hat, v_hat = oracle.moments(rows, 64, t, 3, 0.9, 0.999)
        lr = 0.5 ** (t - 1)
        np.testing.assert_allclose(p.detach().double().numpy(), theta0 - lr * m_hat / (np.sqrt(v_hat) + 1e-8),
                                   rtol=1e-5, atol=1e-6)
        sched.step()


@pytest.mark.parametrize("pdtype,gdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                           (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_low_precision_params_and_grads_follow_fp32(pdtype, gdtype, seed):
    """Same start and gradients: the update in another dtype equals the fp32 one up to that dtype's rounding."""
    base = torch.randn(3000)
    p32 = torch.nn.Parameter(base.to(pdtype).float())
    plo = torch.nn.Parameter(base.to(pdtype))
    kw = dict(lr=1e-2, m=4, density=0.02, topk_block=512, quant_block=128)
    if gdtype != pdtype:
        plo.grad_dtype = None  # let this param take a gradient of another dtype (torch >= 2.10)
    o32, olo = MicroAdam([p32], **kw), MicroAdam([plo], **kw)
    for _ in range(8):
        g = torch.randn(3000).to(gdtype)
        p32.grad, plo.grad = g.float(), g
        o32.step()
        olo.step()
        # the lower-precision run must end each step at the fp32 result rounded to its dtype,
        # allowing for the accumulated rounding of earlier steps
        with torch.no_grad():
            err = (plo.float() - p32).abs()
            tol = 8 * torch.finfo(pdtype).eps * p32.abs().max() + 1e-6
            assert err.max() <= tol
    assert plo.dtype == pdtype and olo.state[plo]["win_val"].dtype == torch.bfloat16


def test_layout_tensor_round_trip():
    lay = Layout.for_numel(12345, MicroAdamConfig(topk_block=1000, density=0.013, quant_block=77, m=3))
    assert Layout.from_tensor(lay.to_tensor()) == lay
    assert lay.k_block == 13 and lay.k_last == oracle.k_for(0.013, 345)
    assert lay.k_total == 12 * 13 + lay.k_last
    assert np.isclose(lay.state_bytes(), state_bytes(12345, topk_block=1000, density=0.013, quant_block=77, m=3))


# -- every hyper-parameter, every kind of bad value ------------------------------------------

INVALID = {
    "lr": [-1e-3, float("nan"), float("inf"), "0.1", True, 1j],
    "betas": [(0.9, 1.0), (-0.1, 0.9), (0.9, float("nan")), ("a", 0.9), 0.9, (0.9,), (0.9, 0.99, 0.999)],
    "eps": [0.0, -1.0, float("inf"), "1e-8"],
    "weight_decay": [-0.1, float("nan"), float("inf"), "0"],
    "m": [0, -1, 1025, 2.5, True, "10"],
    "density": [0.0, -0.1, 1.5, float("nan"), "0.01"],
    "topk_block": [0, -8, 32769, 64.0, True],
    "quant_block": [0, -3, 2 ** 31, 128.5, "4096"],
    "ef_rounding": ["up", "", 1, "Nearest"],
    "alpha": [-0.1, 1.0, -2, -1, float("nan"), "0.1", True],
    "nonfinite": ["ignore", True, ""],
    "backend": ["triton", "", None],
}
# The fragment that states the allowed range (or choices) in each field's message.
ALLOWED = {"lr": "[0.0, inf]", "betas": "[0", "eps": "(0.0, inf]", "weight_decay": "[0.0, inf]",
           "m": "[1, 1024]", "density": "(0.0, 1.0]", "topk_block": "[1, 32768]",
           "quant_block": "[1, 2147483647]", "ef_rounding": "'nearest', 'stochastic'",
           "alpha": "[0.0, 1.0)", "nonfinite": "'skip', 'raise', 'off'", "backend": "'auto', 'reference', 'cuda'"}


def test_every_field_has_a_validation_case():
    assert set(INVALID) == set(ALLOWED) == set(MicroAdamConfig.field_names())


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in INVALID.items() for v in vs])
def test_every_invalid_value_is_a_value_error_naming_field_value_and_range(field, value):
    """At construction, in a param group, and in a group edited after construction
    (refused at the next step, with nothing changed)."""
    p = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError) as err:
        MicroAdam([p], **{field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg and ALLOWED[field] in msg, msg
    q = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=r"param_groups\[1\]") as err:
        MicroAdam([{"params": [p]}, {"params": [q], field: value}])
    assert field in str(err.value) and ALLOWED[field] in str(err.value)
    opt = MicroAdam([p], density=0.25, topk_block=4, quant_block=4)
    p.grad = torch.randn(8)
    opt.step()
    before = snapshot([p], opt)
    opt.param_groups[0][field] = value
    p.grad = torch.randn(8)
    with pytest.raises(ValueError, match=r"param_groups\[0\]") as err:
        opt.step()
    assert field in str(err.value) and repr(value) in str(err.value)
    assert_same(before, snapshot([p], opt))


# -- shapes ----------------------------------------------------------------------------------

def test_any_shape_steps_as_its_flat_row_major_view(seed):
    """0-d, 1-d, 4-d, channels_last and transposed (non-contiguous) params step exactly
    like a flat 1-d param holding the same elements in row-major order."""
    shapes = [(), (1,), (3, 4, 5, 6), (2, 3, 4, 5)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params[3] = torch.nn.Parameter(params[3].detach().to(memory_format=torch.channels_last))
    params.append(torch.nn.Parameter(torch.randn(9, 7).t()))  # (7, 9), strides (1, 7)
    assert not params[3].is_contiguous() and not params[4].is_contiguous()
    flats = [torch.nn.Parameter(p.detach().reshape(-1).clone()) for p in params]
    kw = dict(lr=1e-2, m=3, density=0.2, topk_block=16, quant_block=10, weight_decay=0.1, backend="reference")
    opt, ref = MicroAdam(params, **kw), MicroAdam(flats, **kw)
    for _ in range(5):
        for p, f in zip(params, flats):
            g = torch.randn(p.shape)
            p.grad, f.grad = g.clone(), g.reshape(-1).clone()
        opt.step()
        ref.step()
        for p, f in zip(params, flats):
            assert p.shape == p.grad.shape and torch.equal(p.detach().reshape(-1), f.detach())
            for k in opt.state[p]:
                assert torch.equal(opt.state[p][k], ref.state[f][k]), k
    assert params[3].is_contiguous(memory_format=torch.channels_last)  # updated in place


def test_nonfinite_check_with_an_empty_local_gradient(seed):
    """A rank holding no element of a param (FSDP) hands an empty gradient; the check skips
    it, still catches a NaN elsewhere, and steps the others."""
    from microadam_dist import MicroAdam
    full = torch.nn.Parameter(torch.randn(300))
    empty = torch.nn.Parameter(torch.randn(0))
    opt = MicroAdam([full, empty], lr=1e-2)
    full.grad, empty.grad = torch.randn(300), torch.randn(0)
    assert opt._start_gradient_check([(opt._group_config(opt.param_groups[0], 0),
                                       [(empty, empty, empty.grad, (0, 1))])]) is None  # nothing to check
    before = full.detach().clone()
    opt.step()
    assert not torch.equal(full.detach(), before)
    full.grad = torch.full((300,), float("nan"))
    after = full.detach().clone()
    opt.step()
    assert opt.nonfinite_skips == 1 and torch.equal(full.detach(), after)


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_init_optim_state_only_allocates(seed):
    """torch.distributed.checkpoint's `_init_optim_state` (run by get/set_optimizer_state_dict
    on an optimizer with no state): zero gradients, lr 0, one step(). The state must appear
    with step 0, a zero window and zero EF, params untouched, lr restored; the next real step
    must equal a fresh optimizer's first step."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 11), (300,), (5,)]
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    hyper = dict(lr=3e-3, m=3, density=0.1, topk_block=64, quant_block=32, backend="reference")
    opt = MicroAdam([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}], **hyper)
    fresh = MicroAdam([{"params": twins[:2]}, {"params": twins[2:], "lr": 1e-2}], **hyper)
    before = [p.detach().clone() for p in params]
    _init_optim_state(opt)
    assert [grp["lr"] for grp in opt.param_groups] == [3e-3, 1e-2]
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and all(p.grad is None for p in params)
    assert len(opt.state) == 3
    for p in params:
        st = opt.state[p]
        assert int(st["step"]) == 0
        assert not st["win_idx"].any() and not st["win_val"].any() and not st["ef"].any()
        assert Layout.from_tensor(st["layout"]) == Layout.for_numel(p.numel(), MicroAdamConfig(**{
            k: v for k, v in hyper.items() if k != "backend"}))
    grads = [torch.randn(s, generator=g) for s in shapes]
    for ps, o in ((params, opt), (twins, fresh)):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        o.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        assert all(torch.equal(v, fresh.state[q][k]) for k, v in opt.state[p].items())
    # A real first step with lr 0 but a non-zero gradient is a step (it counts).
    p = torch.randn(8, requires_grad=True)
    o = MicroAdam([p], lr=0.0, m=2, density=0.5, topk_block=8, quant_block=8, backend="reference")
    p.grad = torch.randn(8, generator=g)
    o.step()
    assert int(o.state[p]["step"]) == 1 and o.state[p]["win_val"].any()
