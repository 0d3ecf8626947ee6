"""Run an unmodified training script with MicroAdam registered.

    python -m microadam_dist.run train.py --deepspeed ds.json ...
    python -m microadam_dist.run -m my_pkg.train --deepspeed ds.json ...
    deepspeed --module microadam_dist.run train.py --deepspeed ds.json
    torchrun --nproc_per_node 8 -m microadam_dist.run train.py ...

The script runs as if started directly (`__name__ == "__main__"`, `sys.argv[0]` is
the script, `sys.path` as `python script.py` sets it), after `"type": "MicroAdam"` has been
made valid for DeepSpeed. Launchers that pass `--local_rank=N` before the script
(the deepspeed launcher does) have it moved behind the script's name, where a
directly launched script would have received it.

When the script returns normally with a process group still initialized, the run
ends through `teardown.finish()` (final barrier, destroy_process_group, flush,
`os._exit(0)`): with torch 2.13 + gloo a normal interpreter exit can abort a rank
after its work is done (see microadam_dist/teardown.py). An exception or
`sys.exit` in the script propagates unchanged.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = ("usage: python -m microadam_dist.run [--local_rank=N] (SCRIPT.py | -m MODULE) [ARGS ...]\n"
         "Registers MicroAdam with DeepSpeed, then runs SCRIPT (or MODULE) as __main__ with ARGS.")


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading launcher options (--local_rank=N, --local-rank N) and the rest."""
    forwarded: list[str] = []
    rest = list(argv)
    while rest and (rest[0].startswith("--local_rank") or rest[0].startswith("--local-rank")):
        opt = rest.pop(0)
        if "=" not in opt:
            if not rest:
                raise SystemExit(f"{opt} needs a value\n{USAGE}")
            opt = f"{opt}={rest.pop(0)}"
        forwarded.append(opt)
    return forwarded, rest


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` defaults to sys.argv[1:]. Exceptions and exit codes of the script propagate."""
    forwarded, rest = _split(sys.argv[1:] if argv is None else argv)
    if not rest or rest[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if rest else 2)

    from .integrations import register

    register()
    if rest[0] == "-m":
        if len(rest) < 2:
            raise SystemExit(f"-m needs a module name\n{USAGE}")
        module, args = rest[1], rest[2:]
        sys.argv = [module] + forwarded + args  # runpy replaces argv[0] with the module's path
        # sys.path is already what `python -m MODULE` gives: this wrapper was started with -m.
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        _finish()
        return
    script, args = rest[0], rest[1:]
    if not os.path.isfile(script):
        raise SystemExit(f"microadam_dist.run: no such script: {script!r}\n{USAGE}")
    sys.argv = [script] + forwarded + args
    if not getattr(sys.flags, "safe_path", False):
        # The one entry `python script.py` itself differs by: CPython puts the script's folder
        # (symlinks resolved) where `-m microadam_dist.run` put the working directory (neither
        # under -P), and runpy.run_path leaves sys.path alone. Scripts import siblings through it.
        sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")
    _finish()


def _finish() -> None:
    from .teardown import finish

    finish()


if __name__ == "__main__":
    main()
