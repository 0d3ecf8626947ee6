"""Launching the distributed workers of tests/dist_scripts/ from a test, once per pytest run."""

import fcntl
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script: str, nproc: int, args: list[str], timeout: int = 600) -> None:
    """`torchrun --standalone --nproc_per_node=nproc tests/dist_scripts/<script> args` on gloo
    (one thread a process); fails the test with the tail of both streams."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "dist_scripts", script), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def once(shared: Path, name: str, launch: Callable[[Path], None]) -> Path:
    """`launch(out)` once for this pytest run: under xdist the first worker to take the lock
    runs it and the others read its results. Returns `out` (shared / f"{name}_out")."""
    out = shared / f"{name}_out"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done").exists():
                out.mkdir(exist_ok=True)
                launch(out)
                (out / "done").write_text("ok")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out
