"""Backend choice without a GPU: auto -> reference, cuda -> clear error, failed build ->
one warning and the reference; and the kernel sources compile where nvcc exists."""

import os
import shutil
import subprocess
import warnings

import pytest
import torch

import oracle
from microadam_dist import MicroAdam
from microadam_dist.ops import builder, cuda as cuda_ops, run_reference, select_backend
from microadam_dist.ops.build_flags import SOURCES

CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")


@pytest.fixture
def fresh_builder(monkeypatch):
    builder.reset()
    cuda_ops._warned.clear()
    yield
    builder.reset()
    cuda_ops._warned.clear()


def test_auto_on_cpu_is_reference(seed):
    name, run = select_backend("auto", torch.device("cpu"))
    assert name == "reference" and run is run_reference
    # And the optimizer really steps through it: the result equals a direct reference step.
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the CPU: nothing is missing
        MicroAdam([p], lr=1e-2).step()
    MicroAdam([q], lr=1e-2, backend="reference").step()
    assert torch.equal(p, q)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors.*cpu"):
        MicroAdam([p], backend="cuda").step()


def test_failed_build_warns_once_and_falls_back(fresh_builder, monkeypatch):
    """A build that cannot work: 'auto' gives one RuntimeWarning naming the cause, then the
    reference; 'cuda' raises with the same cause. Resolution needs no GPU."""
    monkeypatch.setenv("MICROADAM_JIT", "0")
    dev = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="MICROADAM_JIT=0") as rec:
        name, run = cuda_ops.resolve("auto", dev, run_reference)
        name2, _ = cuda_ops.resolve("auto", dev, run_reference)
    assert (name, name2) == ("reference", "reference") and run is run_reference
    assert len([w for w in rec if "MicroAdam" in str(w.message)]) == 1
    with pytest.raises(RuntimeError, match="backend='cuda' was requested.*MICROADAM_JIT=0"):
        cuda_ops.resolve("cuda", dev, run_reference)


def test_compiler_error_is_reported_not_raised(fresh_builder, monkeypatch):
    """A just-in-time build that fails inside the compiler: one warning with its last line."""
    monkeypatch.setattr(builder, "_jit_problem", lambda: None)

    def broken_build(verbose):
        raise RuntimeError("Error building extension 'microadam_dist_cuda'\nnvcc fatal: unsupported gpu arch")
    monkeypatch.setattr(builder, "_jit_build", broken_build)
    with pytest.warns(RuntimeWarning, match="just-in-time build failed: nvcc fatal: unsupported gpu arch"):
        name, _ = cuda_ops.resolve("auto", torch.device("cuda", 0), run_reference)
    assert name == "reference"


def test_env_report_names_backend_and_reason():
    from microadam_dist import env
    lines = dict(env.report(build=False))
    assert "backend (auto)" in lines and lines["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert lines["backend (auto)"].startswith("reference")
    assert lines["kernel sources"].endswith("csrc")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", [s for s in SOURCES if s.endswith(".cu")])
def test_kernels_compile_with_nvcc(source, tmp_path):
    """Each CUDA translation unit (they include no torch header) compiles for sm_90; the
    torch binding needs a CUDA torch, so only the GPU machine's build compiles it."""
    out = tmp_path / "k.o"
    cmd = ["nvcc", "-c", "-std=c++17", "-O1", "-gencode=arch=compute_90,code=sm_90",
           "-Xptxas", "-v", os.path.join(CSRC, source), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert out.stat().st_size > 0
    assert "error" not in res.stderr.lower()


class RecordingKernels:
    """Stands in for the compiled module on the CPU: records what each launch would run."""

    CHUNK2 = 32768

    def __init__(self):
        self.launches, self.flags = [], []

    def one_pass(self, n, topk_block, quant_block):  # one top-k block, or quant blocks nested in them
        return n <= topk_block or topk_block % quant_block == 0

    def step(self, table, ntensors, total_blocks, table2, ntensors2, chunks2, *rest):
        self.launches.append((table[:ntensors * cuda_ops.REC].view(ntensors, cuda_ops.REC).clone(),
                              total_blocks, ntensors2))
        self.flags += table[:ntensors * cuda_ops.REC].view(ntensors, cuda_ops.REC)[:, cuda_ops.F_GO].tolist()


def test_cuda_runner_launch_plan(seed, monkeypatch):
    """The host side of the CUDA runner, on a recording stand-in for the kernels: launches
    go out as a group reaches 1, 4, 16, ... x FIRST_LAUNCH_BLOCKS top-k blocks; every tensor is
    in exactly one record, which carries its new step and its block range; the step counters
    are advanced once; ineligible jobs go to the fallback."""
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)  # CPU tensors pass as device 0
    monkeypatch.setattr(cuda_ops, "_to_device", lambda flat, device: torch.tensor(flat, dtype=torch.int64))
    monkeypatch.setattr(cuda_ops, "FIRST_LAUNCH_BLOCKS", 3)
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(n) for n in torch.randint(1, 5 * 4096, (12,), generator=gen)]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = MicroAdam(params, backend="reference", quant_block=100000, nonfinite="off")
    for p in params:
        p.grad = torch.randn(p.numel(), generator=gen)
    opt.step()  # creates the state
    kernels = RecordingKernels()
    hp = cuda_ops.StepHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, ef_rounding="nearest")
    from microadam_dist.ops import ShardJob
    jobs = [ShardJob(p, p.grad, opt.state[p], opt._layouts[id(p)][2], (0, i), {}) for i, p in enumerate(params)]
    # A param that is not contiguous: the kernels cannot take it.
    odd = jobs[0]._replace(param=torch.zeros(8)[::2], grad=torch.zeros(4), memo={})
    fell_back = []
    before = [int(opt.state[p]["step"]) for p in params]
    cuda_ops.run_cuda(kernels, jobs + [odd], hp, fallback=lambda js, h: fell_back.extend(js))
    assert fell_back == [odd]
    assert [len(t) for t, _, _ in kernels.launches] == oracle.launch_sizes(sizes, 4096, 3)
    rows = torch.cat([t for t, _, _ in kernels.launches])
    assert rows[:, cuda_ops.F_PARAM].tolist() == [p.data_ptr() for p in params]
    assert rows[:, cuda_ops.F_GRAD].tolist() == [p.grad.data_ptr() for p in params]
    assert rows[:, cuda_ops.F_STEP].tolist() == [b + 1 for b in before]
    assert [int(opt.state[p]["step"]) for p in params] == [b + 1 for b in before]
    for table, total_blocks, ntensors2 in kernels.launches:
        nblocks = [-(-int(n) // 4096) for n in table[:, cuda_ops.F_N]]
        assert table[:, cuda_ops.F_START].tolist() == [sum(nblocks[:i]) for i in range(len(nblocks))]
        assert total_blocks == sum(nblocks)
        # Quant block 100000 straddles top-k blocks of 4096 for every tensor over one block.
        assert ntensors2 == sum(int(n) > 4096 for n in table[:, cuda_ops.F_N])


def test_cuda_runner_waits_for_the_gradient_check_before_finishing(seed, monkeypatch):
    """With the check's flag (go), every launch carries it and the runner returns `finish`:
    the step counters and the fallback jobs wait for it (a failed check never calls it)."""
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setattr(cuda_ops, "_to_device", lambda flat, device: torch.tensor(flat, dtype=torch.int64))
    monkeypatch.setattr(cuda_ops, "FIRST_LAUNCH_BLOCKS", 2)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(int(n))) for n in torch.randint(1, 4 * 4096, (6,), generator=gen)]
    opt = MicroAdam(params, backend="reference", nonfinite="off")
    for p in params:
        p.grad = torch.randn(p.numel(), generator=gen)
    opt.step()
    from microadam_dist.ops import ShardJob
    jobs = [ShardJob(p, p.grad, opt.state[p], opt._layouts[id(p)][2], (0, i), {}) for i, p in enumerate(params)]
    odd = jobs[0]._replace(param=torch.zeros(8)[::2], grad=torch.zeros(4), memo={})
    hp = cuda_ops.StepHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, ef_rounding="nearest")
    kernels, fell_back, go = RecordingKernels(), [], torch.ones((), dtype=torch.bool)
    finish = cuda_ops.run_cuda(kernels, jobs + [odd], hp, fallback=lambda js, h: fell_back.extend(js), go=go)
    # Every record carries the flag's address (the kernels read it through F_GO).
    assert len(kernels.launches) > 1 and kernels.flags == [go.data_ptr()] * len(params)
    assert [int(opt.state[p]["step"]) for p in params] == [1] * len(params) and fell_back == []
    finish()
    assert [int(opt.state[p]["step"]) for p in params] == [2] * len(params) and fell_back == [odd]
    kernels = RecordingKernels()
    assert cuda_ops.run_cuda(kernels, jobs, hp, fallback=None) is None  # no flag: finished at once
    assert kernels.flags == [0] * len(params)


def test_first_launch_blocks_setting_is_checked():
    assert cuda_ops._first_launch_blocks("0") == 0 and cuda_ops._first_launch_blocks("4096") == 4096
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(ValueError, match=r"MICROADAM_FIRST_LAUNCH_BLOCKS=.*integer >= 0"):
            cuda_ops._first_launch_blocks(bad)
