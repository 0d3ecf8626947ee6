"""The fused CUDA step against the reference step (GPU only; skipped without CUDA).

Both optimizers start from the same random state (EF codes and ranges, window,
params, step) and take the same fresh random gradient. The reference runs on the CPU,
where its sums are sequential, so the kernel, doing the same float32 operations in the
same order, is expected to agree exactly: top-k sets, window values, EF bytes and ranges.
Params are compared with a tolerance of one unit in the last place of their dtype.
The window row the step writes is poisoned first, so an unwritten entry fails.
"""

import pytest
import torch

import oracle
from microadam_dist import MicroAdam

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def set_grad(p, g):
    """Assign a gradient whose dtype may differ from the param's (as ZeRO/FSDP hand them)."""
    if g.dtype != p.dtype and hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # torch >= 2.10 checks grad dtypes unless told not to
    p.grad = g


def random_state(st, n, t, gen):
    """Fill one param's state (CPU) with a valid random state as it is before step t."""
    st["step"].fill_(t - 1)
    codes = torch.randint(0, 256, st["ef"].shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    if n % 2:
        codes[-1] &= 0x0F  # the unused high nibble of an odd n is 0
    st["ef"].copy_(codes)
    span = torch.rand(st["ef_min"].shape, generator=gen) * 0.02
    st["ef_min"].copy_(-span * torch.rand(st["ef_min"].shape, generator=gen))
    st["ef_max"].copy_(st["ef_min"] + span)
    wi, wv = st["win_idx"], st["win_val"]
    B = int(st["layout"][2])
    k_block, k_last = int(st["layout"][3]), int(st["layout"][4])
    nb = -(-n // B)
    cols = []
    for j in range(nb):
        length = min(B, n - j * B)
        kj = k_last if j == nb - 1 else k_block
        cols.append(torch.stack([torch.randperm(length, generator=gen)[:kj].sort().values
                                 for _ in range(wi.shape[0])]))
    wi.copy_(torch.cat(cols, dim=1).to(torch.int16))
    wv.copy_((torch.randn(wv.shape, generator=gen) * 0.01).to(torch.bfloat16))


def at_offset(t, offset):
    """t copied into a fresh buffer at `offset` elements from its start (0: t itself)."""
    if not offset:
        return t
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def make_pair(sizes, pdtype, gdtype, t, seed, offset=0, **hyper):
    """offset: the GPU params start that many elements into their storage (unaligned for 16-byte access)."""
    gen = torch.Generator().manual_seed(seed)
    cpu = [torch.nn.Parameter(torch.randn(n, generator=gen).to(pdtype)) for n in sizes]
    gpu = [torch.nn.Parameter(at_offset(p.detach().cuda(), offset)) for p in cpu]
    opt_c = MicroAdam(cpu, backend="reference", nonfinite="off", **hyper)
    opt_g = MicroAdam(gpu, backend="cuda", nonfinite="off", **hyper)
    # Create the state with one zero-gradient step on both sides, then overwrite it.
    for pc, pg in zip(cpu, gpu):
        set_grad(pc, torch.zeros_like(pc, dtype=gdtype))
        set_grad(pg, torch.zeros_like(pg, dtype=gdtype))
    opt_c.step()
    opt_g.step()
    for pc, pg, n in zip(cpu, gpu, sizes):
        random_state(opt_c.state[pc], n, t, gen)
        for k, v in opt_c.state[pc].items():
            opt_g.state[pg][k].copy_(v)
        pg.data.copy_(pc.data)
    return cpu, gpu, opt_c, opt_g, gen


def gaussian(n, gen):
    return torch.randn(n, generator=gen) * 0.05


def step_pair(cpu, gpu, opt_c, opt_g, gdtype, gen, poison=True, make_grad=gaussian):
    m = opt_c.param_groups[0]["m"]
    for pc, pg in zip(cpu, gpu):
        g = make_grad(pc.numel(), gen).reshape(pc.shape).to(gdtype)
        set_grad(pc, g)
        set_grad(pg, g.cuda())
        if poison:
            st = opt_g.state[pg]
            row = int(st["step"]) % m  # the row this step writes
            st["win_idx"][row].fill_(-1)
            st["win_val"][row].fill_(float("nan"))
    opt_c.step()
    opt_g.step()
    torch.cuda.synchronize()


def assert_same(cpu, gpu, opt_c, opt_g, pdtype):
    for i, (pc, pg) in enumerate(zip(cpu, gpu)):
        sc, sg = opt_c.state[pc], opt_g.state[pg]
        what = f"tensor {i} (n={pc.numel()})"
        for k in ("win_idx", "win_val", "ef", "ef_min", "ef_max"):
            a, b = sc[k], sg[k].cpu()
            if k == "win_val":
                same = torch.equal(a.view(torch.int16), b.view(torch.int16))
            else:
                same = torch.equal(a, b)
            if not same:
                diff = (a.view(torch.int16) != b.view(torch.int16)) if k == "win_val" else (a != b)
                where = diff.nonzero()[:5]
                raise AssertionError(f"{what}: state {k!r} differs in {int(diff.sum())} entries, first at "
                                     f"{where.tolist()}: reference {[a[tuple(w)].item() for w in where]}, "
                                     f"kernel {[b[tuple(w)].item() for w in where]}")
        ref = pc.detach().float()
        got = pg.detach().float().cpu()
        # Two ulps of the param or of a step of size 10*lr (the reference's float32 sums of
        # a position repeated across window rows may be ordered differently), in the param's dtype.
        lr = opt_c.param_groups[0]["lr"]
        tol = 2 * ULP[pdtype] * torch.maximum(ref.abs(), torch.full_like(ref, 10 * lr))
        err = (got - ref).abs()
        bad = int((err > tol).sum())
        assert bad == 0, (f"{what}: {bad} params differ by more than one ulp "
                          f"(worst {float((err / tol).max()):.2f} ulp)")


SIZES = [1, 7, 4095, 4096, 4097, 12345, 100003]


@pytest.mark.parametrize("pdtype,gdtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("quant_block", [4096, 64, 100000, 1000])
def test_one_step_matches_reference(pdtype, gdtype, quant_block, seed):
    t = 1 + seed % 37
    pair = make_pair(SIZES, pdtype, gdtype, t, seed, quant_block=quant_block, lr=1e-2)
    cpu, gpu, opt_c, opt_g, gen = pair
    step_pair(cpu, gpu, opt_c, opt_g, gdtype, gen)
    assert_same(cpu, gpu, opt_c, opt_g, pdtype)


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_block", [4096, 64, 100000])
@pytest.mark.parametrize("offset", [0, 1])
def test_weight_decay_writes_every_param(pdtype, quant_block, offset, seed):
    """With weight decay every param changes: the lean instances' weight-decay twins decay and
    update 8 params at a time where the storage allows 16-byte access, one by one where it does
    not (offset 1) and at a tensor's ragged end; every dtype, two steps."""
    pair = make_pair(SIZES, pdtype, torch.bfloat16, 1 + seed % 13, seed, offset=offset,
                     quant_block=quant_block, weight_decay=1.0, lr=0.05)  # decay 0.95: visible in bf16
    cpu, gpu, opt_c, opt_g, gen = pair
    assert offset == 0 or all(p.data_ptr() % 16 for p in gpu)
    before = [p.detach().clone() for p in gpu]
    for _ in range(2):
        step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen)
        assert_same(cpu, gpu, opt_c, opt_g, pdtype)
    # Decay moved (nearly) every param, not only the window's positions.
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(gpu, before))
    assert moved >= 0.9 * sum(SIZES)


@pytest.mark.parametrize("pdtype,gdtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16)])
@pytest.mark.parametrize("quant_block", [4096, 64, 1000, 100000])
@pytest.mark.parametrize("alpha", [0.1, 0.75])
def test_alpha_matches_reference(pdtype, gdtype, quant_block, alpha, seed):
    """Step 7 (alpha > 0) after the EF is final: every param loses lr * alpha * Q^-1(EF) and the
    ranges are scaled by 1 - alpha, byte for byte as the reference, for one-pass tensors and
    second-pass ones (quant blocks 1000 and 100000 straddle top-k blocks), every dtype, with
    weight decay at quant block 64; three steps. fp32 params all move, not only the window's."""
    wd = 0.1 if quant_block == 64 else 0.0
    cpu, gpu, opt_c, opt_g, gen = make_pair(SIZES, pdtype, gdtype, 1 + seed % 13, seed, quant_block=quant_block,
                                            lr=0.05, alpha=alpha, weight_decay=wd)
    before = [p.detach().clone() for p in gpu]
    for _ in range(3):
        step_pair(cpu, gpu, opt_c, opt_g, gdtype, gen)
        assert_same(cpu, gpu, opt_c, opt_g, pdtype)
    if pdtype == torch.float32:
        moved = sum(int((p.detach() != b).sum()) for p, b in zip(gpu, before))
        assert moved >= 0.99 * sum(SIZES)


@pytest.mark.parametrize("topk_block,quant_block,density,m", [
    (1001, 7, 0.05, 3), (4096, 4096, 0.01, 1), (32768, 32768, 0.01, 4), (2048, 100000, 0.2, 5),
    (4096, 3, 0.01, 2), (1, 1, 1.0, 2), (8192, 64, 0.01, 10), (4096, 64, 0.01, 40),
    (4096, 1024, 0.01, 4), (4096, 16, 0.02, 3), (1000, 16, 0.03, 2), (512, 100000, 0.05, 32),
    (30720, 768, 0.01, 3)])
@pytest.mark.parametrize("ef_rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_block_shapes_rounding_decay(topk_block, quant_block, density, m, ef_rounding, weight_decay, seed):
    t = 1 + seed % 11
    sizes = [3, 999, 70001] if topk_block > 1 else [5, 300]
    pair = make_pair(sizes, torch.float32, torch.bfloat16, t, seed, topk_block=topk_block,
                     quant_block=quant_block, density=density, m=m, ef_rounding=ef_rounding,
                     weight_decay=weight_decay, lr=3e-3)
    cpu, gpu, opt_c, opt_g, gen = pair
    for _ in range(3):
        step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen)
        assert_same(cpu, gpu, opt_c, opt_g, torch.float32)


def _zero_ef_step(sizes, pdtype, gdtype, seed, make_grad, **kw):
    pair = make_pair(sizes, pdtype, gdtype, 1 + seed % 7, seed, **kw)
    cpu, gpu, opt_c, opt_g, gen = pair
    for pc, pg in zip(cpu, gpu):
        for st in (opt_c.state[pc], opt_g.state[pg]):
            st["ef"].zero_(); st["ef_min"].zero_(); st["ef_max"].zero_()
    step_pair(cpu, gpu, opt_c, opt_g, gdtype, gen, make_grad=make_grad)
    assert_same(cpu, gpu, opt_c, opt_g, pdtype)


def test_ties_take_lower_index(seed):
    """Gradients with many equal magnitudes (fresh EF): the kept set is the lowest indices."""
    _zero_ef_step([8192, 4097], torch.bfloat16, torch.bfloat16, seed,
                  lambda n, gen: torch.randint(-3, 4, (n,), generator=gen).float())


def test_crowded_candidate_bin_falls_back(seed):
    """Top-k blocks of 8192 whose largest magnitude is shared by ~2/7 of the entries: the
    candidates fit the list (<= 4096) but one histogram bin holds more than 2048 of them,
    so the fast path hands the block to the general one; the lowest indices are kept."""
    _zero_ef_step([16384, 8193], torch.bfloat16, torch.bfloat16, seed,
                  lambda n, gen: torch.randint(-3, 4, (n,), generator=gen).float(), topk_block=8192)


def test_ties_at_the_threshold_among_candidates(seed):
    """bf16 Gaussian gradients with zero EF: a holds bf16 values, so the k-th largest
    magnitude is often shared by several entries, all above the fast path's guess."""
    _zero_ef_step([8192, 4097, 300], torch.float32, torch.bfloat16, seed, gaussian)


def test_sparse_gradient_falls_back_to_the_general_top_k(seed):
    """Fewer nonzeros than k per block: no rung of the block's maximum holds k keys, so
    the general path keeps every nonzero and the lowest-indexed zeros."""
    def sparse(n, gen):
        g = torch.randn(n, generator=gen)
        return g * (torch.rand(n, generator=gen) < 0.003)
    _zero_ef_step([8192, 4097, 300], torch.bfloat16, torch.bfloat16, seed, sparse)


@pytest.mark.parametrize("shape", ["big_positive_small_negative", "all_negative", "gaussian"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("quant_block", [4096, 100000])
def test_one_signed_candidates_take_the_range_pass(shape, weight_decay, quant_block, seed):
    """A top-k block inside one quant block (quant block = top-k block: lean instance 3; or
    100000, a second-pass tensor: instance 2) takes its new range from the top-k's candidates
    not kept when they hold both signs. Here they hold one sign only (large positive entries
    among small negative ones, or all negative), so the range needs the pass over the block;
    the EF must still match the reference byte for byte."""
    def grad(n, gen):
        g = torch.randn(n, generator=gen)
        if shape == "big_positive_small_negative":
            return torch.where(torch.rand(n, generator=gen) < 0.5, g.abs(), -0.01 * g.abs())
        return -g.abs() if shape == "all_negative" else g
    _zero_ef_step([8192, 4097, 300], torch.bfloat16, torch.bfloat16, seed, grad, quant_block=quant_block,
                  weight_decay=weight_decay)


@pytest.mark.parametrize("ef_rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("quant_block", [64, 1000, 4096, 100000])
def test_subnormal_ef_ranges(quant_block, ef_rounding, seed):
    """float32 gradients of about 1e-39 (subnormal): the EF's scale (max - min) / 15 falls
    below 2^-128, where its reciprocal overflows, so codes must come from the division."""
    _zero_ef_step([8192 + 40, 4097, 300], torch.float32, torch.float32, seed,
                  lambda n, gen: torch.randn(n, generator=gen) * 1e-39, quant_block=quant_block,
                  ef_rounding=ef_rounding)


@pytest.mark.parametrize("quant_block", [64, 4096, 100000])
def test_gradient_scale_jumps_between_steps(quant_block, seed):
    """Steps from real windows (each block's previous row guides its top-k) while the
    gradient's scale jumps up and down by 100x: the guess misses and the search recovers."""
    pair = make_pair([8192 + 40, 4097, 300], torch.bfloat16, torch.bfloat16, 1, seed, quant_block=quant_block,
                     lr=1e-2)
    cpu, gpu, opt_c, opt_g, gen = pair
    for scale in (1.0, 1.0, 100.0, 100.0, 0.01, 1.0):
        step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen, make_grad=lambda n, g: gaussian(n, g) * scale)
        assert_same(cpu, gpu, opt_c, opt_g, torch.bfloat16)


def test_replaced_state_tensors_and_param_data_between_steps(seed):
    """The launch entry cached per param must follow a state tensor replaced in the state
    dict and a param whose .data was reassigned: a stale pointer would update the old
    tensors (kept alive here) and leave the new ones behind the reference."""
    pair = make_pair([4097, 100003], torch.bfloat16, torch.bfloat16, 1 + seed % 5, seed, quant_block=100000)
    cpu, gpu, opt_c, opt_g, gen = pair
    step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen)
    kept = []
    for pg in gpu:
        st = opt_g.state[pg]
        for k in ("ef", "ef_min", "ef_max", "win_idx", "win_val"):
            kept.append(st[k])
            st[k] = st[k].clone()
        kept.append(pg.data)
        pg.data = pg.data.clone()
    for _ in range(2):
        step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen)
        assert_same(cpu, gpu, opt_c, opt_g, torch.bfloat16)


def steps_agree(cpu, gpu, opt_c, opt_g, gen, steps):
    """`steps` bf16 steps on both sides, each compared (step counters included)."""
    for _ in range(steps):
        step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen)
        assert_same(cpu, gpu, opt_c, opt_g, torch.bfloat16)
        for pc, pg in zip(cpu, gpu):
            assert int(opt_g.state[pg]["step"]) == int(opt_c.state[pc]["step"])


@pytest.mark.parametrize("quant_block", [64, 100000])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_launches_go_out_while_later_tensors_are_prepared(quant_block, alpha, seed, monkeypatch):
    """run_cuda launches a group as soon as it holds FIRST_LAUNCH_BLOCKS top-k blocks, then
    at 4x as many: with a threshold of one block this step makes several launches (counted),
    each record carrying its tensor's new step, and every tensor still matches the reference
    over three steps, step counters included."""
    from microadam_dist.ops import cuda as cuda_ops
    monkeypatch.setattr(cuda_ops, "FIRST_LAUNCH_BLOCKS", 1)
    launches = []
    real = cuda_ops._launch

    def counting(module, batch, hp, go):
        launches.append(len(batch))
        real(module, batch, hp, go)
    monkeypatch.setattr(cuda_ops, "_launch", counting)
    sizes = [4097, 1, 100003, 5000, 8192 * 3 + 1, 7, 12345]
    cpu, gpu, opt_c, opt_g, gen = make_pair(sizes, torch.bfloat16, torch.bfloat16, 1 + seed % 9, seed,
                                            quant_block=quant_block, lr=1e-2, alpha=alpha)
    launches.clear()
    steps_agree(cpu, gpu, opt_c, opt_g, gen, 3)
    expected = oracle.launch_sizes(sizes, 4096, 1)
    assert len(expected) >= 3 and launches == expected * 3, (launches, expected)


def test_gradient_check_on_the_gpu(seed, monkeypatch):
    """nonfinite="skip" on one CUDA device: the kernels go out with the check's flag before
    the host has read it back, and with finite gradients the step equals the reference's
    (one-pass and second-pass tensors, several launches); a NaN on a param's first step leaves
    no state behind, and a flag that reads false makes every kernel write nothing."""
    from microadam_dist.ops import cuda as cuda_ops
    monkeypatch.setattr(cuda_ops, "FIRST_LAUNCH_BLOCKS", 1)
    flags = []
    real = cuda_ops._launch

    def recording(module, batch, hp, go):
        flags.append(go)
        real(module, batch, hp, go)
    monkeypatch.setattr(cuda_ops, "_launch", recording)
    sizes = [4097, 100003, 7, 8192 * 3 + 1]
    for quant_block in (64, 100000):
        cpu, gpu, opt_c, opt_g, gen = make_pair(sizes, torch.bfloat16, torch.bfloat16, 1 + seed % 9, seed,
                                                quant_block=quant_block, lr=1e-2)
        opt_g.param_groups[0]["nonfinite"] = "skip"
        flags.clear()
        steps_agree(cpu, gpu, opt_c, opt_g, gen, 2)
        # The flag of the check kernel (csrc/nonfinite.cu): one element of its flags.
        assert len(flags) >= 4 and all(f is not None and f.is_cuda and f.shape == (1,) for f in flags)
    # A skipped first step creates no state.
    p = torch.nn.Parameter(torch.randn(5000, device="cuda"))
    opt = MicroAdam([p], backend="cuda")
    p.grad = torch.randn(5000, device="cuda")
    p.grad[4999] = float("nan")
    before = p.detach().clone()
    opt.step()
    assert opt.nonfinite_skips == 1 and p not in opt.state and torch.equal(p.detach(), before)
    p.grad[4999] = 0.0
    opt.step()
    assert int(opt.state[p]["step"]) == 1 and not torch.equal(p.detach(), before)
    # The runner alone, with a flag that reads false: nothing is written, nothing advanced.
    for quant_block in (64, 100000):
        cpu, gpu, opt_c, opt_g, gen = make_pair(sizes, torch.bfloat16, torch.bfloat16, 3, seed,
                                                quant_block=quant_block)
        for pg in gpu:
            set_grad(pg, torch.randn(pg.shape, device="cuda", dtype=torch.bfloat16))
        saved = [(pg.detach().clone(), {k: v.clone() for k, v in opt_g.state[pg].items()}) for pg in gpu]
        from microadam_dist.ops import ShardJob
        jobs = [ShardJob(pg, pg.grad, opt_g.state[pg], opt_g._layouts[id(pg)][2], (0, i), {})
                for i, pg in enumerate(gpu)]
        hp = cuda_ops.StepHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                ef_rounding="nearest")
        finish = cuda_ops.run_cuda(cuda_ops.builder.load(), jobs, hp, fallback=None,
                                   go=torch.zeros((), dtype=torch.bool, device="cuda"))
        torch.cuda.synchronize()
        assert callable(finish)
        for pg, (p0, s0) in zip(gpu, saved):
            assert torch.equal(pg.detach().view(torch.int16), p0.view(torch.int16))
            for k, v in s0.items():
                now = opt_g.state[pg][k]
                assert torch.equal(now.view(torch.int16) if v.dtype == torch.bfloat16 else now,
                                   v.view(torch.int16) if v.dtype == torch.bfloat16 else v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_check_kernel(dtype, seed):
    """ops.finite_flags on CUDA (csrc/nonfinite.cu) against torch.isfinite, per tensor: sizes
    around its 16-byte units and its chunks, the largest finite values of the dtype (finite),
    a NaN, Inf or -Inf at the first, the last or a random element, and views that start one
    element past a 16-byte boundary (its element-wise path)."""
    import random
    from microadam_dist.ops import builder, finite_flags
    per_chunk = builder.load().CHECK_CHUNK // torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    sizes = [1, 7, 8, 9, 4097, per_chunk - 1, per_chunk, per_chunk + 3, 3 * per_chunk + 5, 100003]
    dev = torch.device("cuda")
    for rnd in range(4):
        grads = []
        for i, n in enumerate(sizes):
            shift = (i + rnd) % 2
            g = torch.randn(n + shift, device="cuda", generator=gen).to(dtype)[shift:]
            for _ in range(3):
                g[rng.randrange(n)] = rng.choice([1, -1]) * torch.finfo(dtype).max
            kind = "ok" if rnd == 0 else rng.choice(["ok", "nan", "inf", "-inf"])
            if kind != "ok":
                g[rng.choice([0, n - 1, rng.randrange(n)])] = float(kind)
            grads.append(g)
        finite, go = finite_flags(grads, dev, True)
        expect = torch.stack([torch.isfinite(g).all() for g in grads])
        assert go is not None and go.shape == (1,)
        assert torch.equal(finite, expect), (rnd, finite.tolist(), expect.tolist())
        assert bool(go) == bool(expect.all())
    # The last element of the largest gradient alone.
    grads = [torch.randn(n, device="cuda", generator=gen).to(dtype) for n in sizes]
    grads[-2][-1] = float("nan")
    finite, go = finite_flags(grads, dev, True)
    assert finite.tolist() == [i != len(sizes) - 2 for i in range(len(sizes))] and not bool(go)


def test_load_state_dict_releases_the_replaced_state_tensors(seed):
    """The launch entries cached per param hold the state tensors; after load_state_dict
    the replaced ones must be freed (no second copy of the state kept on the device)."""
    import gc
    import weakref
    cpu, gpu, opt_c, opt_g, gen = make_pair([4097, 100003], torch.bfloat16, torch.bfloat16, 2, seed)
    step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen)
    old = [weakref.ref(opt_g.state[pg][k]) for pg in gpu for k in ("ef", "ef_min", "ef_max", "win_idx", "win_val")]
    opt_g.load_state_dict(opt_g.state_dict())
    gc.collect()
    assert all(r() is None for r in old), "replaced state tensors are still referenced"
    step_pair(cpu, gpu, opt_c, opt_g, torch.bfloat16, gen)
    assert_same(cpu, gpu, opt_c, opt_g, torch.bfloat16)


def test_trajectory_100_steps(seed):
    sizes = [4096 * 3 + 5, 777, 50000]
    pair = make_pair(sizes, torch.float32, torch.float32, 1, seed, lr=1e-2, weight_decay=0.01)
    cpu, gpu, opt_c, opt_g, gen = pair
    start = [p.detach().clone() for p in cpu]
    for _ in range(100):
        step_pair(cpu, gpu, opt_c, opt_g, torch.float32, gen, poison=False)
    for pc, pg, p0 in zip(cpu, gpu, start):
        moved = (pc.detach() - p0).norm()
        err = (pg.detach().cpu() - pc.detach()).norm()
        assert err <= 1e-4 * moved + 1e-6, f"trajectory drifted: |gpu-ref|={err:.3e}, |moved|={moved:.3e}"


def test_huge_tensor_64bit_offsets(seed):
    """A tensor of more than 2^31 elements: its first and last blocks match the reference
    run on the corresponding slices (blocks are local, so a slice aligned to both block
    sizes is its own shard)."""
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 4096 * 5 + 77
    if free < 4 * n + 2**31:
        pytest.skip("not enough GPU memory for a 2^31-element tensor")
    B = Q = 4096
    p = torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    p.data.normal_(generator=gen)
    p.grad = torch.empty_like(p).normal_(generator=gen)
    opt = MicroAdam([p], backend="cuda", nonfinite="off", lr=1e-2)
    head, tail_start = 3 * B, n - (n % B) - 2 * B
    pieces = {}
    for name, (s, e) in {"head": (0, head), "tail": (tail_start, n)}.items():
        pieces[name] = (s, e, torch.nn.Parameter(p.detach()[s:e].cpu().clone()), p.grad[s:e].cpu().clone())
    opt.step()
    torch.cuda.synchronize()
    st = opt.state[p]
    for name, (s, e, pc, gc) in pieces.items():
        pc.grad = gc
        ref = MicroAdam([pc], backend="reference", nonfinite="off", lr=1e-2)
        ref.step()
        rs = ref.state[pc]
        j0 = s // B
        k = int(st["layout"][3])
        cols = slice(j0 * k, j0 * k + rs["win_idx"].shape[1])
        assert torch.equal(st["win_idx"][0, cols].cpu(), rs["win_idx"][0]), name
        assert torch.equal(st["win_val"][0, cols].cpu().view(torch.int16), rs["win_val"][0].view(torch.int16)), name
        assert torch.equal(st["ef"][s // 2:(e + 1) // 2].cpu(), rs["ef"]), name
        assert torch.equal(st["ef_min"][s // Q:-(-e // Q)].cpu(), rs["ef_min"]), name
        assert torch.equal(st["ef_max"][s // Q:-(-e // Q)].cpu(), rs["ef_max"]), name
        assert torch.equal(p.detach()[s:e].cpu().view(torch.int16), pc.detach().view(torch.int16)), name


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("quant_block,alpha", [(4096, 0.0), (100000, 0.0), (4096, 0.5), (100000, 0.5)])
def test_nonfinite_gradient_skips_the_step_on_cuda(gdtype, bad, quant_block, alpha, seed):
    """nonfinite="skip" on CUDA tensors: one NaN/Inf anywhere leaves every param and state
    tensor bitwise unchanged and counts the step; a later finite step runs. The kernels are
    launched before the host knows (they read the check's flag on the GPU), the second-pass
    kernels too (quant block 100000), and step 7's (alpha)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen)) for n in (4097, 12345)]
    opt = MicroAdam(params, backend="cuda", lr=1e-2, quant_block=quant_block, alpha=alpha)
    for p in params:
        set_grad(p, torch.randn(p.shape, device="cuda", generator=gen).to(gdtype))
    opt.step()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    for p in params:
        set_grad(p, torch.randn(p.shape, device="cuda", generator=gen).to(gdtype))
    at = int(torch.randint(0, 12345, (1,), generator=torch.Generator().manual_seed(seed)))
    params[1].grad[at] = bad
    opt.step()
    assert opt.nonfinite_skips == 1
    for p, (p0, s0) in zip(params, before):
        assert torch.equal(p.detach(), p0)
        for k, v in s0.items():
            assert torch.equal(opt.state[p][k].view(torch.uint8) if v.dtype == torch.bfloat16 else opt.state[p][k],
                               v.view(torch.uint8) if v.dtype == torch.bfloat16 else v), k
    params[1].grad[at] = 0.0
    opt.step()
    assert opt.nonfinite_skips == 1 and int(opt.state[params[0]]["step"]) == 2
    assert not torch.equal(params[0].detach(), before[0][0])
