"""The files of a DeepSpeed ZeRO checkpoint, for the offline reshard (zero.py, zero3.py):
their names, reading them, MicroAdam's hyper-parameters from a saved param group, and
publishing a resharded tag atomically with its layout record."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import torch

from ..config import MicroAdamConfig
from ..integrations import ds_partitions as partitions
from . import io as ckio
from .io import CheckpointError

MODEL_FILE = "mp_rank_00_model_states.pt"
LAYOUT_FILE = "microadam_layout.json"
BF16_PREFIX = "bf16_"  # DeepSpeed names the optimizer files of bf16 runs bf16_zero_pp_rank_...


def optim_file(rank: int, prefix: str = "") -> str:
    """The optimizer-states file of data-parallel rank `rank` (`prefix`: "" or BF16_PREFIX)."""
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def model_file_zero3(rank: int) -> str:
    """ZeRO-3 writes one model-states file per data-parallel rank."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def load(path: str) -> Any:
    """The object in DeepSpeed checkpoint file `path`; CheckpointError if missing or unreadable."""
    try:
        # DeepSpeed's own files: they hold its objects (enums, namedtuples), so not weights_only.
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"DeepSpeed checkpoint file {path} is missing") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read DeepSpeed checkpoint file {path} (truncated or corrupt?): {exc}") from exc


def config_of_group(group: dict) -> MicroAdamConfig:
    """MicroAdam's hyper-parameters from a param group of a saved optimizer state_dict."""
    d = {k: group[k] for k in MicroAdamConfig.field_names() if k in group}
    d["betas"] = tuple(d["betas"])
    return MicroAdamConfig(**d)


def publish(dst: str, tag: str, files: dict[str, Any], meta0: dict) -> None:
    """Write `files` ({name: object}) and the layout record of rank 0's partition metadata
    as `dst/tag` atomically: staged in a hidden dir, every file read back, renamed into
    place, then `dst/latest` written."""
    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    stage = os.path.join(dst, f".tmp-{tag}-{uuid.uuid4().hex[:8]}")
    os.makedirs(stage)
    try:
        for name, obj in files.items():
            torch.save(obj, os.path.join(stage, name))
        sig = partitions.signature(meta0)
        record = {"format": 1, "signature": sig, "describe": partitions.describe(sig), "rank0": meta0}
        with open(os.path.join(stage, LAYOUT_FILE), "w") as f:
            json.dump(record, f, indent=1)
        for name in os.listdir(stage):  # verify before publishing: every file reads back
            if name.endswith(".pt"):
                load(os.path.join(stage, name))
        ckio.replace_dir(stage, os.path.join(dst, tag))
        ckio.atomic_write_bytes(os.path.join(dst, "latest"), tag.encode())
    finally:
        shutil.rmtree(stage, ignore_errors=True)
