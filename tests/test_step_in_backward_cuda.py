"""MicroAdam(step_in_backward=True) on the CUDA backend (GPU only; skipped without CUDA).

Gradients are made exact (loss = sum_i <p_i, G_i>, so each param's gradient is G_i with
no rounding), so the two modes see the same gradients. Oracles: the ordinary CUDA step
(bitwise: every tensor's update reads only its own tensors, so grouping cannot change a
result), and the reference step on the CPU within the kernels' stated tolerance
(tests/test_cuda_kernels.py: state exact, params within two ulps). The profiler counts the
step kernel's launches: one per group, not one per tensor. Peak memory shows that no
buffer of every gradient exists. FSDP2 runs on one GPU in a subprocess (its hooks run on
the reduce-scatter stream).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from microadam_dist import MicroAdam
from test_cuda_kernels import assert_same as assert_within_kernel_tolerance

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(64, 257), (4097,), (1000, 100), (7,), (300, 300), (12345,)]
HYPER = dict(lr=1e-2, weight_decay=0.01, m=4, density=0.05, quant_block=1000)


class Exact(torch.nn.Module):
    """loss = sum_i <p_i, G_i>: the gradient of p_i is exactly G_i."""

    def __init__(self, sizes, dtype, device, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype).to(device)) for s in sizes])

    def forward(self, gs):
        return sum((p * g).sum() for p, g in zip(self.ps, gs))


def exact_grads(model, gen, scale=0.05, bad: int | None = None):
    gs = [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype).to(p.device) for p in model.ps]
    if bad is not None:
        gs[bad].view(-1)[-1] = float("nan")
    return gs


def models(dtype, seed, bucket_mb, **over):
    """CPU reference (ordinary), CUDA ordinary, CUDA step_in_backward: same params."""
    hyper = {**HYPER, **over}
    ref = Exact(SIZES, dtype, "cpu", seed)
    gpu = Exact(SIZES, dtype, "cuda", seed)
    sib = Exact(SIZES, dtype, "cuda", seed)
    return ((ref, MicroAdam(ref.parameters(), backend="reference", **hyper)),
            (gpu, MicroAdam(gpu.parameters(), backend="cuda", **hyper)),
            (sib, MicroAdam(sib.parameters(), backend="cuda", step_in_backward=True, backward_bucket_mb=bucket_mb,
                            **hyper)))


def ordinary(model, opt, gs):
    opt.zero_grad()
    model(gs).backward()
    opt.step()


def assert_bitwise(ma, oa, mb, ob, what):
    for i, (pa, pb) in enumerate(zip(ma.parameters(), mb.parameters())):
        assert torch.equal(pa, pb), f"{what}: param {i}"
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        assert sa.keys() == sb.keys(), f"{what}: state {i} keys"
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{what}: state {i} {k!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bucket_mb", [0.05, 1e3])
def test_equals_ordinary_cuda_step_and_reference(dtype, bucket_mb, seed):
    (mr, orf), (mg, og), (mb, ob) = models(dtype, seed % 1000, bucket_mb)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, 4):
        gs = exact_grads(mg, gen)
        ordinary(mr, orf, [g.cpu() for g in gs])
        ordinary(mg, og, gs)
        mb(gs).backward()
        assert all(p.grad is None for p in mb.parameters())
        ob.step()
        torch.cuda.synchronize()
        assert_bitwise(mg, og, mb, ob, f"step {step}")
        assert_within_kernel_tolerance(list(mr.parameters()), list(mb.parameters()), orf, ob, dtype)
        assert {int(s["step"]) for s in ob.state.values()} == {step}
    # One group per backward, or several (50 KiB buckets).
    assert ob._backward.flushes == 3 if bucket_mb > 1 else ob._backward.flushes > 6


@pytest.mark.parametrize("first", [True, False])
def test_nonfinite_tensor_skipped_on_the_gpu(seed, first):
    """The per-tensor flag gates that tensor's kernels on the GPU (no host sync in backward):
    its param and state stay, no state is left from a skipped first step; the others step as
    the ordinary step does without it; step() counts it; "raise" names it."""
    (_, _), (mg, og), (mb, ob) = models(torch.bfloat16, seed % 1000, 0.05)
    gen = torch.Generator().manual_seed(seed)
    bad = 2
    for step in range(1, 4):
        poison = step == (1 if first else 2)
        gs = exact_grads(mg, gen, bad=bad if poison else None)
        og.zero_grad()
        mg(gs).backward()
        if poison:
            mg.ps[bad].grad = None
        og.step()
        before = mb.ps[bad].detach().clone()
        mb(gs).backward()
        ob.step()
        if poison:
            assert torch.equal(mb.ps[bad].detach(), before)
            assert (mb.ps[bad] in ob.state) == (not first)
        assert_bitwise(mg, og, mb, ob, f"step {step}")
    assert ob.nonfinite_skips == 1
    (_, _), (_, _), (mr, orr) = models(torch.bfloat16, seed % 1000, 0.05, nonfinite="raise")
    mr(exact_grads(mr, gen, bad=bad)).backward()
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[2\]"):
        orr.step()


def test_launches_grouped(seed):
    """One step-kernel launch and one gradient check per group (counted by the profiler),
    and far fewer groups than tensors."""
    sizes = [(256, 256)] * 24  # 256 KiB of fp32 gradient each
    model = Exact(sizes, torch.float32, "cuda", seed % 1000)
    opt = MicroAdam(model.parameters(), backend="cuda", step_in_backward=True, backward_bucket_mb=1.0, **HYPER)
    gen = torch.Generator().manual_seed(seed)
    model(exact_grads(model, gen)).backward()  # first step: states created
    opt.step()
    gs = exact_grads(model, gen)
    torch.cuda.synchronize()
    before = opt._backward.flushes
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(gs).backward()
        opt.step()
        torch.cuda.synchronize()
    groups = opt._backward.flushes - before
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    steps = sum("compress_update_kernel" in n for n in names)
    checks = sum("nonfinite_kernel" in n for n in names)
    assert groups == 6, groups  # 1 MiB buckets of 256 KiB gradients
    assert steps == groups and checks == groups, (steps, checks, groups)


def test_no_buffer_of_every_gradient(seed):
    """Peak memory of an iteration (after the first, which creates the state): stepping inside
    backward holds at most a bucket of gradients, the ordinary step all of them."""
    sizes = [(1024, 1024)] * 16  # 64 MiB of fp32 gradients
    peaks = {}
    for sib in (False, True):
        model = Exact(sizes, torch.float32, "cuda", seed % 1000)
        opt = MicroAdam(model.parameters(), backend="cuda", step_in_backward=sib, backward_bucket_mb=8.0, **HYPER)
        gen = torch.Generator().manual_seed(seed)
        gs = exact_grads(model, gen)
        for it in range(2):
            opt.zero_grad()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(gs).backward()
            opt.step()
            torch.cuda.synchronize()
            peaks[sib] = torch.cuda.max_memory_allocated() - base
        del model, opt, gs
    mib = {k: v / 2**20 for k, v in peaks.items()}
    # Ordinary: all 64 MiB of gradients at once. In backward: an 8 MiB bucket and the 4 MiB
    # gradient that fills it, a few MiB of transients.
    assert peaks[False] >= 64 * 2**20 and peaks[True] <= 24 * 2**20, mib


def test_fsdp2_on_one_gpu_equals_ordinary(tmp_path):
    """FSDP2 (world of one, NCCL): its hooks run on the reduce-scatter stream; same shards
    and states as the ordinary step, bitwise, after every step."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "tests", "dist_scripts", "backward_scenarios.py"), "--out", str(tmp_path),
           "--device", "cuda"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.load(open(tmp_path / "rank0.json"))
    for kind in ("fsdp2_per_tensor", "fsdp2_one_group", "fsdp2_mp"):
        sc = res[kind]
        assert sc["equal"] == [True] * 4 and sc["released"] == [True] * 4 and sc["moved"], (kind, sc)


class Deep(torch.nn.Module):
    """A stack of linear layers: backward frees and reallocates activations' gradients
    while earlier layers' params are being stepped."""

    def __init__(self, seed, width=512, depth=8):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().mean()


def test_deep_model_equals_ordinary(seed, monkeypatch):
    """A real backward (linear layers, activations' gradients freed and reallocated while
    earlier layers' params are stepped, the next forward reading the stepped params): params
    and states after three iterations equal the ordinary step's, bitwise."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(seed)).cuda()
    hyper = dict(HYPER, lr=1e-3)
    runs = []
    for sib in (False, True):
        model = Deep(seed % 1000).cuda()
        opt = MicroAdam(model.parameters(), backend="cuda", step_in_backward=sib, backward_bucket_mb=0.5, **hyper)
        for _ in range(3):
            model(x).backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        runs.append((model, opt))
    assert runs[1][1]._backward.flushes >= 3 * 4
    assert_bitwise(*runs[0], *runs[1], "deep model")
