"""The reference optimizer against the float64 oracle, step by step (teacher forcing).

Each step, the oracle starts from the package's own state (EF codes, ranges, window
and params, read back as float64) and the same gradient; the package's new state is
then checked against the oracle: top-k sets, window values, EF ranges and codes, the
EF error bound, and the parameter update.
"""

import numpy as np
import pytest
import torch

import oracle
from microadam_dist import MicroAdam

BF16_REL = 2.0 ** -8


def global_rows(win_idx, win_val, n, topk_block, density):
    """Window rows as (global index, value) arrays, from the documented column layout."""
    ks = [oracle.k_for(density, min(topk_block, n - s)) for s in range(0, n, topk_block)]
    block_of = np.concatenate([np.full(kj, j) for j, kj in enumerate(ks)])
    rows = []
    for r in range(win_idx.shape[0]):
        rows.append((block_of * topk_block + win_idx[r], win_val[r].copy()))
    return rows


def check_step(p, st_before, theta0, g, group, t, seed):
    """Run the oracle from the state before the step and compare with the state after."""
    n = p.numel()
    hp = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
              weight_decay=group["weight_decay"], m=group["m"], density=group["density"],
              topk_block=group["topk_block"], quant_block=group["quant_block"], alpha=group["alpha"])
    B, Q, m = hp["topk_block"], hp["quant_block"], hp["m"]
    if st_before is None:
        ost = oracle.fresh_state(n, Q, m)
    else:
        codes = oracle.unpack_nibbles(st_before["ef"].numpy(), n)
        rows = global_rows(st_before["win_idx"].to(torch.int64).numpy(),
                           st_before["win_val"].to(torch.float64).numpy(), n, B, hp["density"])
        ost = oracle.OracleState(codes, st_before["ef_min"].double().numpy(),
                                 st_before["ef_max"].double().numpy(), rows, t - 1)
    # The package forms a = g + Q^-1(EF) in float32: its error follows the addends, which can
    # be far larger than a itself when the gradient's scale drops and the EF cancels it.
    addends = float(np.abs(g).max() + np.abs(oracle.dequantize(ost, n, Q)).max())
    res = oracle.step(theta0, g, ost, **hp)
    res.addends = addends
    return res


def compare(res, opt, p, group, t, seed, rounding="nearest"):
    n = p.numel()
    st = opt.state[p]
    B, Q, m, density = group["topk_block"], group["quant_block"], group["m"], group["density"]
    keep = 1.0 - group["alpha"]  # step 7 scales the new ranges by (1 - alpha)
    assert int(st["step"]) == t
    rows = global_rows(st["win_idx"].to(torch.int64).numpy(), st["win_val"].to(torch.float64).numpy(),
                       n, B, density)
    sel, vals = rows[(t - 1) % m]
    a = res.a_before_zero
    # 1. top-k sets (a near-tie at the threshold may legitimately swap entries)
    if not np.array_equal(sel, res.selected):
        diff = np.setxor1d(sel, res.selected)
        for i in diff:
            blk = i // B
            s = blk * B
            thr = np.sort(np.abs(a[s:s + B]))[::-1][oracle.k_for(density, min(B, n - s)) - 1]
            assert abs(abs(a[i]) - thr) <= 1e-6 * max(thr, res.addends), f"top-k differs at {i} (seed {seed}, step {t})"
    # ascending inside each block
    for s in range(0, n, B):
        in_blk = sel[(sel >= s) & (sel < s + B)]
        assert np.all(np.diff(in_blk) > 0)
    # 2. window values are bf16(a)
    np.testing.assert_allclose(vals, a[sel], rtol=BF16_REL, atol=1e-30)
    # 3. EF ranges and codes, recomputed with the package's selection
    az = a.copy()
    az[sel] = 0.0
    codes, qmin, qmax, qpos = oracle.quantize(az, Q)
    tol = 1e-6 * max(np.abs(az).max(), res.addends)
    np.testing.assert_allclose(st["ef_min"].double().numpy(), keep * qmin, rtol=1e-6, atol=tol)
    np.testing.assert_allclose(st["ef_max"].double().numpy(), keep * qmax, rtol=1e-6, atol=tol)
    got = oracle.unpack_nibbles(st["ef"].numpy(), n)
    frac = qpos - np.floor(qpos)
    # A code may differ where qpos lies within the float32 error of a (in units of the scale).
    a_err = 2.0 ** -22 * res.addends
    scale_e = np.repeat((qmax - qmin) / 15.0, Q)[:n]
    qtol = np.maximum(1e-3, a_err / np.where(scale_e > 0, scale_e, np.inf))
    if rounding == "nearest":
        boundary = np.abs(frac - 0.5) < qtol
        assert np.array_equal(got[~boundary], codes[~boundary]), f"EF codes (seed {seed}, step {t})"
    else:
        xi = np.array([oracle.xi(t, i) for i in range(n)])
        expect = np.clip(np.floor(qpos + xi), 0, 15)
        scale_pos = scale_e > 0
        expect = np.where(scale_pos, expect, 0)
        boundary = np.abs((qpos + xi) - np.round(qpos + xi)) < qtol
        assert np.array_equal(got[~boundary], expect[~boundary]), f"EF codes (seed {seed}, step {t})"
    # EF error bound per element, measured on the package's own decoded EF
    lo = np.repeat(st["ef_min"].double().numpy() / keep, Q)[:n]
    hi = np.repeat(st["ef_max"].double().numpy() / keep, Q)[:n]
    deq = lo + got * (hi - lo) / 15.0
    bound = (hi - lo) / (30.0 if rounding == "nearest" else 15.0)
    assert np.all(np.abs(deq - az) <= bound * (1 + 1e-5) + 1e-7 * np.abs(az).max() + a_err), f"EF error (seed {seed})"
    return rows


def expected_params(opt, p, group, theta0, rows, t):
    """Steps 5-7 in float64 from the package's window (bf16 values) and, for alpha > 0, its
    own new EF (codes, and ranges before the (1 - alpha) scaling).

    Returns the expected params and, per element, the float32 rounding the package's update may
    carry: a few ulps of the largest term it adds, not of the result (with alpha the EF term can
    nearly cancel theta, leaving a small param that carries the terms' absolute error)."""
    n, alpha, lr = p.numel(), group["alpha"], group["lr"]
    m_hat, v_hat = oracle.moments(rows, n, t, group["m"], *group["betas"])
    decayed = theta0 * (1 - lr * group["weight_decay"])
    adam = lr * m_hat / (np.sqrt(v_hat) + group["eps"])
    out, terms = decayed - adam, np.abs(decayed) + np.abs(adam)
    if alpha:
        st = opt.state[p]
        keep = 1.0 - alpha
        lo = st["ef_min"].double().numpy() / keep
        hi = st["ef_max"].double().numpy() / keep
        ost = oracle.OracleState(oracle.unpack_nibbles(st["ef"].numpy(), n), lo, hi, rows, t)
        out = out - lr * alpha * oracle.dequantize(ost, n, group["quant_block"])
        # Q^-1 = lo + code*(hi - lo)/15 rounds at the scale of the block's range
        reach = np.repeat(np.maximum(np.abs(lo), np.abs(hi)), group["quant_block"])[:n]
        terms = terms + 2 * lr * alpha * reach
    return out, 8 * np.finfo(np.float32).eps * terms


def assert_params(p, expect, rounding_err, msg):
    got = p.detach().double().reshape(-1).numpy()
    bad = np.abs(got - expect) > 2e-6 + 2e-6 * np.abs(expect) + rounding_err
    assert not bad.any(), (f"{msg}: {bad.sum()} of {bad.size} params differ, first at {np.flatnonzero(bad)[0]}: "
                           f"{got[bad][0]!r} against {expect[bad][0]!r}")


@pytest.mark.parametrize("shape,B,Q,density,m", [
    ((1001,), 128, 64, 0.05, 4),      # n odd, not a multiple of either block
    ((37,), 64, 16, 0.1, 3),          # smaller than one block
    ((10, 100), 96, 40, 0.03, 5),     # 2-D, ragged blocks
    ((3000,), 256, 1000, 0.01, 4),    # quant block larger than the top-k block
    ((1,), 4096, 4096, 0.01, 2),      # a single element
])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_reference_matches_oracle(shape, B, Q, density, m, rounding, alpha, seed):
    steps = 22
    p = torch.nn.Parameter(torch.randn(shape))
    opt = MicroAdam([p], lr=3e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, m=m,
                    density=density, topk_block=B, quant_block=Q, ef_rounding=rounding,
                    alpha=alpha, backend="reference")
    group = opt.param_groups[0]
    for t in range(1, steps + 1):
        g = torch.randn(shape) * (1 + t % 3)
        theta0 = p.detach().double().reshape(-1).numpy().copy()
        st_before = {k: v.clone() for k, v in opt.state[p].items()} if opt.state[p] else None
        res = check_step(p, st_before, theta0, g.double().reshape(-1).numpy(), group, t, seed)
        p.grad = g
        opt.step()
        rows = compare(res, opt, p, group, t, seed, rounding)
        # 4. the update, from the package's window (bf16 values) in float64
        expect, rounding_err = expected_params(opt, p, group, theta0, rows, t)
        assert_params(p, expect, rounding_err, f"seed {seed}, step {t}")


def steps_against_oracle(opt, steps, seed, grad_of):
    """`steps` steps of `opt` (every group, every param, gradient grad_of(p)); each is checked
    against the oracle: EF, top-k and window (check_step/compare), then the update."""
    for t in range(1, steps + 1):
        snaps = []
        for group in opt.param_groups:
            for p in group["params"]:
                g = grad_of(p)
                theta0 = p.detach().double().reshape(-1).numpy().copy()
                st_before = {k: v.clone() for k, v in opt.state[p].items()} if opt.state[p] else None
                res = check_step(p, st_before, theta0, g.double().reshape(-1).numpy(), group, t, seed)
                p.grad = g
                snaps.append((p, group, theta0, res))
        opt.step()
        for p, group, theta0, res in snaps:
            rows = compare(res, opt, p, group, t, seed, group["ef_rounding"])
            expect, rounding_err = expected_params(opt, p, group, theta0, rows, t)
            assert_params(p, expect, rounding_err, f"seed {seed}, step {t}, shape {tuple(p.shape)}")


def test_param_groups_each_follow_their_hyperparameters(seed):
    a = torch.nn.Parameter(torch.randn(700))
    b = torch.nn.Parameter(torch.randn(33, 9))
    opt = MicroAdam([{"params": [a], "lr": 1e-2, "m": 3, "density": 0.05, "topk_block": 100,
                      "quant_block": 30},
                     {"params": [b], "lr": 5e-2, "betas": (0.5, 0.9), "weight_decay": 0.3,
                      "k_init": 0.1, "topk_block": 50, "quant_block_size": 64}],
                    backend="reference")
    steps_against_oracle(opt, 20, seed, torch.randn_like)


@pytest.mark.parametrize("alpha", [0.1, 0.75])
def test_alpha_moves_every_param_and_keeps_1_minus_alpha_of_the_ef(alpha, seed):
    """From a zero EF, one step with alpha and one without (same gradient) write the same
    window and EF codes; with alpha the ranges are float32(1 - alpha) times the others, every
    param with a nonzero EF moved (without: only the window's positions), and the state
    holds the same tensors of the same sizes."""
    n, lr = 5000, 1e-2
    g = torch.randn(n)
    runs = {}
    for a in (0.0, alpha):
        p = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed % 2**31)))
        opt = MicroAdam([p], lr=lr, alpha=a, topk_block=512, quant_block=64, backend="reference")
        theta0 = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        runs[a] = (p.detach(), theta0, opt.state[p])
    (p0, t0, s0), (p1, t1, s1) = runs[0.0], runs[alpha]
    assert {k: (v.shape, v.dtype) for k, v in s0.items()} == {k: (v.shape, v.dtype) for k, v in s1.items()}
    for k in ("ef", "win_idx", "win_val"):
        assert torch.equal(s0[k], s1[k]), k
    keep = torch.tensor(1.0 - alpha, dtype=torch.float32)
    assert torch.equal(s1["ef_min"], s0["ef_min"] * keep) and torch.equal(s1["ef_max"], s0["ef_max"] * keep)
    window = np.zeros(n, dtype=bool)
    window[global_rows(s0["win_idx"].to(torch.int64).numpy(), s0["win_val"].double().numpy(), n, 512, 0.01)[0][0]] = True
    assert np.array_equal((p0 != t0).numpy(), window)  # alpha = 0: only the kept entries move
    e = oracle.dequantize(oracle.OracleState(oracle.unpack_nibbles(s0["ef"].numpy(), n), s0["ef_min"].double().numpy(),
                                             s0["ef_max"].double().numpy(), [], 1), n, 64)
    moved = (p1 != t1).numpy()
    # Every param whose alpha term is at least a float32 ulp of it moved (a smaller one may
    # round away: a dequantized EF can lie arbitrarily close to 0); the next line checks sizes.
    visible = np.abs(lr * alpha * e) >= np.spacing(np.abs(t1.numpy()))
    assert np.all(moved[visible]) and moved.sum() > 0.9 * n
    np.testing.assert_allclose((p1 - p0).double().numpy(), -lr * alpha * e, rtol=1e-5, atol=3e-7)


def test_stochastic_rounding_is_unbiased(seed):
    """Averaged over many steps, the stochastic EF decodes to the value it encodes."""
    from microadam_dist.ops import reference

    n, Q, T = 256, 64, 3000
    x = torch.randn(n, dtype=torch.float32)
    acc = torch.zeros(n, dtype=torch.float64)
    for t in range(1, T + 1):
        ef, lo, hi = reference.quantize_ef(x, Q, "stochastic", t)
        deq = reference.dequantize_ef(ef, lo, hi, n, Q).double()
        scale = np.repeat(((hi - lo) / 15).double().numpy(), Q)[:n]
        err = (deq - x.double()).abs().numpy()
        assert np.all(err <= scale * (1 + 1e-5))  # one level at most
        acc += deq
    mean = (acc / T).numpy()
    scale = np.repeat(((hi - lo) / 15).double().numpy(), Q)[:n]
    # Bernoulli rounding: std of one draw <= scale/2; 6 sigma over T draws
    assert np.all(np.abs(mean - x.double().numpy()) <= 6 * scale / 2 / np.sqrt(T) + 1e-7)
    # nearest rounding is biased towards the grid: its mean is the grid point, not x
    ef, lo, hi = reference.quantize_ef(x, Q, "nearest", 1)
    near = reference.dequantize_ef(ef, lo, hi, n, Q).double().numpy()
    assert np.abs(near - x.double().numpy()).mean() > 5 * np.abs(mean - x.double().numpy()).mean()


def _random_shape(rng, max_numel):
    """A shape of 0 to 4 dims whose element count is at most max_numel (0-dim: one element)."""
    ndim = int(rng.integers(0, 5))
    shape = []
    for _ in range(ndim):
        left = max_numel // max(1, int(np.prod(shape)) if shape else 1)
        shape.append(int(rng.integers(1, max(2, min(left, 60 if ndim > 1 else max_numel)) + 1)))
    return tuple(shape)


def test_reference_matches_oracle_on_random_shapes_and_groups(seed):
    """Fresh shapes, block sizes, densities, windows and roundings every run; 3 param groups
    (one with two params), 21 steps, each step checked against the oracle."""
    rng = np.random.default_rng(seed)
    groups = []
    for gi in range(3):
        # n smaller than one block, or ragged against both block sizes, with an odd n among them
        B = int(rng.integers(8, 300))
        Q = int(rng.integers(3, 400))
        shapes = [_random_shape(rng, int(rng.integers(1, 1500))) for _ in range(1 + (gi == 0))]
        if gi == 1:
            shapes = [(int(rng.integers(1, B)) | 1,)]  # odd and smaller than one top-k block
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        groups.append({"params": params, "lr": float(rng.uniform(1e-3, 5e-2)),
                       "betas": (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.999))),
                       "weight_decay": float(rng.choice([0.0, 0.05])), "m": int(rng.integers(1, 7)),
                       "density": float(rng.uniform(0.01, 0.3)), "topk_block": B, "quant_block": Q,
                       "ef_rounding": str(rng.choice(["nearest", "stochastic"])),
                       "alpha": float(rng.choice([0.0, 0.1, 0.9]))})
    print([[tuple(p.shape) for p in g["params"]] for g in groups])
    opt = MicroAdam(groups, eps=1e-8, backend="reference")
    steps_against_oracle(opt, 21, seed, lambda p: torch.randn_like(p) * float(rng.choice([0.01, 1.0, 100.0])))
