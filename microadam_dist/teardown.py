"""End a torch.distributed worker process without racing the backend's threads at exit.

`finish()` is the last call of a worker that trained to completion: a final barrier
(every rank got there, so a failure anywhere is still reported), `destroy_process_group`,
exit handlers and stdio flushed, then `os._exit`, so the interpreter is never finalized
while a communication thread can still touch Python objects.

Why (torch 2.13, gloo, Python 3.11; seen as a flaky "terminate called without an
active exception" / SIGABRT of one rank after its training had finished, which makes
torchrun SIGTERM the others): a gloo worker thread signals a collective's completion
*before* it drops its own reference to the work. When it is descheduled in between
(likely with several ranks on 2 cores), the main thread returns from the final
barrier, `destroy_process_group` (which leaves the backend's threads running: the
ProcessGroupGloo outlives it) and reaches `Py_FinalizeEx`. The worker then destroys
the work, whose tensors hold Python objects; their decref takes the GIL, which
during finalization calls `pthread_exit`; the forced unwind crosses the noexcept
`~AsyncWork` and std::terminate aborts. Core dump backtrace of the crashed rank:

    ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllreduceWork -> ~AsyncWork
    -> TensorImpl::decref_pyobject -> gil_scoped_acquire -> take_gil
    -> PyThread_exit_thread -> pthread_exit -> std::terminate  (main thread: Py_FinalizeEx)

(https://github.com/pytorch/pytorch/issues/179291 describes the same finalization crash for
gloo's threads.)
Leaving with `os._exit` after everything has been flushed removes the window; it is
only reached after the work and the final barrier succeeded, so it hides no failure.
"""

from __future__ import annotations

import atexit
import os
import sys

import torch


def finish(exit_code: int = 0) -> None:
    """Final barrier, destroy the process group(s), flush, and leave with `exit_code`.

    Call it as the last statement of a worker's successful run. If a process group is
    initialized this never returns (`os._exit`); an error in the barrier (a peer died)
    propagates as usual, so the process fails as it would have. Without a process
    group it just flushes and returns, so single-process runs exit normally.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        _flush()
        return
    dist.barrier()
    dist.destroy_process_group()
    # Exit handlers still run (logging.shutdown among them) while the interpreter is whole.
    atexit._run_exitfuncs()
    _finalize_mpi()
    _flush()
    os._exit(exit_code)


def _finalize_mpi() -> None:
    """mpirun counts a rank that exits without MPI_Finalize as failed; mpi4py finalizes from
    the interpreter's own exit (which os._exit skips), so do it here when it is in use
    (DeepSpeed's rank discovery under mpirun imports it)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or redirected to a closed pipe
            pass


__all__ = ["finish"]
