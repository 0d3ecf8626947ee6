"""Names shared by the FSDP checkpoint helpers (integrations/fsdp.py) and the offline
tools (checkpoint/dcp.py): the keys of the rank-keyed format, which FSDP1 checkpoints
use and older FSDP2 / DDP checkpoints hold, and the wrapper-free parameter names."""

from __future__ import annotations

META_KEY = "microadam_meta"
INFO_KEY = "_info"
# Wrapper modules that FSDP1, activation checkpointing and torch.compile insert into
# parameter names; stripped so that a checkpoint's names are the model's own.
_WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def rank_key(rank: int) -> str:
    """The checkpoint key under which global rank `rank` stores its MicroAdam state."""
    return f"microadam_rank{rank}"


def clean_fqn(name: str) -> str:
    """A parameter name without the wrapper modules FSDP1 / checkpointing / compile insert."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


__all__ = ["META_KEY", "INFO_KEY", "rank_key", "clean_fqn"]
