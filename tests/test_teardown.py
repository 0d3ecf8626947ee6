"""microadam_dist.teardown.finish: how every multi-process script here ends its process group.

A rank that got through its work leaves with exit status 0, its buffered output
flushed and its exit handlers run; a rank that failed still fails the launch.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    import torch
    import torch.distributed as dist
    from microadam_dist.teardown import finish

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = sys.argv[1]
    atexit.register(lambda: open(os.path.join(out, f"atexit{rank}"), "w").close())
    x = torch.full((1000,), float(rank))
    for _ in range(20):
        dist.all_reduce(x)
    sys.stdout.write(f"rank {rank} sum {float(x[0])} (unflushed)")  # no newline, no flush
    if rank == 1 and sys.argv[2] == "fail":
        raise RuntimeError("rank 1 failed after its collectives")
    finish()
    raise AssertionError("finish() returned")
""")


def launch(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", str(script), str(tmp_path), mode]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def test_finish_exits_zero_after_flushing_and_exit_handlers(tmp_path):
    proc = launch(tmp_path, "ok")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "finish() returned" not in proc.stderr
    for rank in (0, 1):
        # 20 all_reduces of 0 and 1: 2**19 everywhere
        assert f"rank {rank} sum {float(2 ** 19)} (unflushed)" in proc.stdout
        assert (tmp_path / f"atexit{rank}").exists()


def test_a_failing_rank_still_fails_the_launch(tmp_path):
    proc = launch(tmp_path, "fail")
    assert proc.returncode != 0
    assert "rank 1 failed after its collectives" in proc.stdout + proc.stderr


def test_without_a_process_group_it_returns():
    code = "from microadam_dist.teardown import finish; finish(); print('after')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "after"
