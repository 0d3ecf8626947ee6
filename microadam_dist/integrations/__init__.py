"""Glue between MicroAdam and the training engines (DeepSpeed, FSDP, HF Trainer).

`register()` makes `"type": "MicroAdam"` valid in a DeepSpeed JSON. It is called
by `import microadam_dist` and never imports DeepSpeed itself: if DeepSpeed is
already loaded it is patched at once, otherwise an import hook patches it the
moment its modules load (DeepSpeed's import is slow and may not be installed).
"""

from __future__ import annotations


def register() -> None:
    """Register MicroAdam with every engine that can be patched lazily (idempotent)."""
    from . import deepspeed as _ds

    _ds.register()


register()

__all__ = ["register"]
