"""Atomic, checksummed checkpoint files and directories.

A *checked file* is `MAGIC | payload length (u64 LE) | sha256(payload) | payload`, the
payload being `torch.save` bytes. Loading checks the magic, the length (a truncated
file is named as such) and the digest before unpickling anything, so a damaged file
raises `CheckpointError` and never yields a partial object.

Writes go to a temporary name in the same directory, are flushed and fsynced, read
back and verified, and only then renamed over the target (`os.replace` is atomic on
POSIX). A checkpoint *directory* is staged as `ROOT/.tmp-TAG`, gets its `meta.json`
(listing every file with its size and digest) last, is verified, and is then renamed
to `ROOT/TAG`; `ROOT/latest` names the newest complete one. A process killed at any
moment therefore leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import uuid
import warnings
from typing import Any, Callable

import torch

MAGIC = b"MADCKPT\x01"
_HEADER = struct.Struct("<8sQ32s")
META_NAME = "meta.json"
LATEST_NAME = "latest"
STAGING_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file or directory is missing, incomplete, truncated or corrupt."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, verify: Callable[[str], None] | None = None,
                       _chunk_hook: Callable[[int], None] | None = None) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`.

    `verify(tmp_path)` runs on the fsynced temporary before it replaces `path`.
    `_chunk_hook(bytes_written)` is a test hook called between 1 MiB chunks.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.partial")
    try:
        with open(tmp, "wb") as f:
            step = 1 << 20
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                if _chunk_hook is not None:
                    f.flush()
                    _chunk_hook(i + step)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def encode(obj: Any) -> bytes:
    """Serialize `obj` (torch.save) and frame it with magic, length and sha256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def _read_checked(path: str) -> bytes:
    """The verified payload of a checked file, or CheckpointError saying what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    if len(raw) < _HEADER.size:
        raise CheckpointError(f"checkpoint file {path} is truncated: {len(raw)} bytes, "
                              f"shorter than the {_HEADER.size}-byte header")
    magic, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a microadam_dist checkpoint file (magic {magic!r}, "
                              f"expected {MAGIC!r})")
    payload = raw[_HEADER.size:]
    if len(payload) != length:
        kind = "truncated" if len(payload) < length else "longer than its header says"
        raise CheckpointError(f"checkpoint file {path} is {kind}: payload of {len(payload)} bytes, "
                              f"header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint file {path} is corrupt: sha256 mismatch")
    return payload


def verify_file(path: str) -> None:
    """Raise CheckpointError unless `path` is a complete, uncorrupted checked file."""
    _read_checked(path)


def save_file(obj: Any, path: str, _chunk_hook: Callable[[int], None] | None = None) -> dict:
    """Atomically write `obj` as a checked file; returns {"bytes", "sha256"} of the file."""
    data = encode(obj)
    atomic_write_bytes(path, data, verify=verify_file, _chunk_hook=_chunk_hook)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_file(path: str, map_location: Any = "cpu") -> Any:
    """Load a checked file after verifying it completely (CheckpointError otherwise)."""
    payload = _read_checked(path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # a valid digest over bad content: written by something else
        raise CheckpointError(f"checkpoint file {path} passed its checksum but cannot be "
                              f"unpickled: {exc}") from exc


def file_digest(path: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


# -- checkpoint directories ------------------------------------------------------------

def staging_dir(root: str, tag: str) -> str:
    """Where the files of checkpoint `tag` are written before it is published."""
    _check_tag(tag)
    return os.path.join(root, STAGING_PREFIX + tag)


def _check_tag(tag: str) -> None:
    if not tag or tag.startswith(".") or os.sep in tag or tag in (LATEST_NAME, META_NAME):
        raise ValueError(f"Invalid checkpoint tag: {tag!r}; expected a plain name such as 'step_000100'")


def replace_dir(stage: str, final: str) -> None:
    """Rename the finished directory `stage` to `final` (same file system). An existing
    `final` is moved aside first and removed after, so a crash leaves one of the two whole."""
    parent = os.path.dirname(os.path.abspath(final))
    if os.path.exists(final):
        old = os.path.join(parent, f".old-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(stage, final)
    _fsync_dir(parent)


def publish_dir(root: str, tag: str, meta: dict) -> str:
    """Finish checkpoint `tag`: verify every file in its staging dir, write meta.json
    (with each file's size and sha256), rename the dir into place, point `latest` at it.

    Called once (rank 0) after every rank has written its files into `staging_dir`.
    Returns the published path.
    """
    stage = staging_dir(root, tag)
    files = {}
    for name in sorted(os.listdir(stage)):
        if name == META_NAME or name.startswith("."):
            continue
        p = os.path.join(stage, name)
        verify_file(p)
        files[name] = file_digest(p)
    meta = dict(meta, format_version=FORMAT_VERSION, tag=tag, files=files)
    text = json.dumps(meta, indent=1, sort_keys=True).encode()
    atomic_write_bytes(os.path.join(stage, META_NAME), text)
    final = os.path.join(root, tag)
    replace_dir(stage, final)
    atomic_write_bytes(os.path.join(root, LATEST_NAME), tag.encode())
    return final


def read_meta(path: str, verify: bool = True) -> dict:
    """meta.json of a published checkpoint dir; with verify, every listed file is checked
    (size and sha256) first, so that nothing is loaded from a damaged checkpoint."""
    mp = os.path.join(path, META_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        with open(mp, "rb") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint: {META_NAME} is missing "
                              "(a save was interrupted?)") from None
    except ValueError as exc:
        raise CheckpointError(f"{mp} is corrupt: {exc}") from None
    if not isinstance(meta, dict) or "format_version" not in meta or "files" not in meta:
        raise CheckpointError(f"{mp} lacks 'format_version' or 'files': not a microadam_dist checkpoint")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta['format_version']}; this "
                              f"microadam_dist reads up to {FORMAT_VERSION}: upgrade it")
    for name, want in meta["files"].items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {path} lacks its file {name}")
        size = os.path.getsize(p)
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint file {p} has {size} bytes, meta.json says "
                                  f"{want['bytes']}: truncated or replaced")
        if verify and file_digest(p)["sha256"] != want["sha256"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: sha256 differs from meta.json")
    return meta


def list_complete(root: str) -> list[str]:
    """Published checkpoint tags under `root` (dirs with a meta.json), newest first
    (by the 'step' in their meta, then by name)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        p = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(p) or not os.path.exists(os.path.join(p, META_NAME)):
            continue
        try:
            with open(os.path.join(p, META_NAME)) as f:
                step = int(json.load(f).get("step", -1))
        except (ValueError, OSError):
            step = -1
        found.append((step, name))
    return [name for _, name in sorted(found, reverse=True)]


def latest_complete(root: str, verify: bool = True) -> str | None:
    """Path of the newest checkpoint under `root` that verifies, or None.

    Newer ones that fail verification are skipped with a warning: a resume after a
    crash continues from the last checkpoint that is whole.
    """
    for tag in list_complete(root):
        path = os.path.join(root, tag)
        try:
            read_meta(path, verify=verify)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint {path}: {exc}")
    return None


def clean_staging(root: str) -> list[str]:
    """Remove staging and moved-aside dirs left by interrupted saves; returns their names."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        if name.startswith(STAGING_PREFIX) or name.startswith(".old-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


__all__ = ["CheckpointError", "MAGIC", "FORMAT_VERSION", "atomic_write_bytes", "encode", "verify_file",
           "save_file", "load_file", "file_digest", "staging_dir", "publish_dir", "read_meta",
           "list_complete", "latest_complete", "clean_staging"]
