"""Where a run's checkpoints live, and how they prove they are whole.

Layout of `<checkpoint dir>/`:
    step_<N>/          one checkpoint: the policy's files plus `manifest.json`
    step_<N>.tmp/      a save in progress (never read; removed by the next save)

A save fills `step_<N>.tmp/`, then writes `manifest.json` (every file's size and
SHA-256) last, fsyncs the files and the directory, and renames it to `step_<N>/` (one
atomic rename). A checkpoint counts as complete only when its manifest matches the files
on disk, so a truncated, partial or bit-rotted directory is skipped at resume with the
reason logged, and the newest one that verifies is loaded. Rotation keeps the newest
`checkpoint.keep_last` and never the one just written. A failed save removes its partial
directory and raises `CheckpointSaveError` with a one-line reason (a full disk is named
as such); the previous checkpoint stays the newest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^step_(\d+)\.tmp$")
_CHUNK = 8 << 20


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message is one line for the user."""


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none verifies."""


def step_dirs(root: str) -> list[tuple[int, str]]:
    """Published checkpoint directories under `root` (verified or not), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def is_checkpoint_root(path: str) -> bool:
    """True when `path` holds `step_<N>/` directories (rather than being one)."""
    return bool(step_dirs(path)) and not os.path.exists(os.path.join(path, MANIFEST))


# --------------------------------------------------------------------------- manifest


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Every regular file under `directory`, as sorted relative paths (the manifest aside)."""
    out = []
    for base, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: str, step: int) -> dict:
    """Checksum every file of `directory`, fsync them, write `manifest.json` last and fsync
    it and every directory, so a crash at any point leaves either no manifest or a true one."""
    files = {}
    for rel in _files(directory):
        full = os.path.join(directory, rel)
        files[rel] = {"bytes": os.path.getsize(full), "sha256": _sha256(full)}
        _fsync(full)
    manifest = {"format": 1, "step": int(step), "files": files}
    path = os.path.join(directory, MANIFEST)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for base, _, _ in os.walk(directory):
        _fsync(base)
    return manifest


def verify(directory: str, *, checksums: bool = True) -> str | None:
    """Why `directory` is not a whole checkpoint, or None when its manifest matches the disk.
    `checksums=False` checks presence and sizes only (fast)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (an interrupted save, or written by an older version)"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not files:
        return f"{MANIFEST} lists no files"
    for rel, want in sorted(files.items()):
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want["bytes"]:
            return f"{rel} is {size} bytes, the manifest says {want['bytes']} (truncated or partly written)"
    if checksums:
        for rel, want in sorted(files.items()):
            if _sha256(os.path.join(directory, rel)) != want["sha256"]:
                return f"{rel} does not match its SHA-256 in the manifest (corrupted on disk)"
    return None


def verified_newest_first(root: str) -> Iterator[tuple[str, str | None]]:
    """`(path, reason)` for each checkpoint under `root`, newest first; reason None means
    it verifies. Lazy: a caller that stops at the first good one checksums nothing older."""
    for _, path in reversed(step_dirs(root)):
        yield path, verify(path)


def newest_verified(root: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest checkpoint under `root` that verifies, and the newer ones skipped (with why)."""
    skipped = []
    for path, reason in verified_newest_first(root):
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def size_of(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, rel)) for rel in _files(directory))


# --------------------------------------------------------------------------- saving


def remove_partial_saves(root: str) -> list[str]:
    """Delete every `step_<N>.tmp/` left by an interrupted save (they only hold disk space)."""
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if _TMP_DIR.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    if removed:
        logger.info("removed partial checkpoint saves in %s: %s", root, ", ".join(sorted(removed)))
    return removed


def save(cfg, step: int, write: Callable[[str], None]) -> str:
    """Call `write(tmp_dir)` to fill a new checkpoint, seal it with a manifest, publish it
    atomically and rotate old ones. Raises `CheckpointSaveError` (partial removed) on failure."""
    root = cfg.checkpoint_dir
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    try:
        os.makedirs(root, exist_ok=True)
        remove_partial_saves(root)
        write(tmp)
        write_manifest(tmp, step)
        if os.path.exists(final):  # re-saving a step (e.g. after resuming past a bad one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            raise
        previous = newest_published(root)
        raise CheckpointSaveError(describe_save_failure(e, root, step, previous)) from e
    rotate(root, cfg.checkpoint.keep_last, keep=final)
    return final


def newest_published(root: str) -> str | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def rotate(root: str, keep_last: int, *, keep: str) -> list[str]:
    """Delete checkpoints beyond the newest `keep_last`, never `keep` (the one just written,
    which verified as it was sealed); returns the deleted paths."""
    deleted = []
    for _, old in step_dirs(root)[:-keep_last]:
        if os.path.abspath(old) != os.path.abspath(keep):
            shutil.rmtree(old, ignore_errors=True)
            deleted.append(old)
    return deleted


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "enospc",
                   # torch.save's zip writer reports ENOSPC only as this (inline_container.cc)
                   "file write failed")


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException, root: str, needed: int = 0) -> bool:
    for link in _chain(e):
        if isinstance(link, OSError) and link.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(link).lower() for t in _DISK_FULL_TEXT):
            return True
    return bool(needed) and free_bytes(root) < needed


def free_bytes(path: str) -> int:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe_save_failure(e: BaseException, root: str, step: int, previous: str | None) -> str:
    keep = (f"{os.path.basename(previous)} stays the newest checkpoint" if previous
            else "no earlier checkpoint exists")
    needed = size_of(previous) if previous else 0
    if is_disk_full(e, root, needed):
        need = f", the last checkpoint took {_gib(needed)}" if needed else ""
        return (f"checkpoint at step {step} failed: disk full at {root} ({_gib(free_bytes(root))} free"
                f"{need}); the partial save was removed and {keep}. Free space (or set checkpoint.dir "
                f"elsewhere) and rerun to resume")
    last = str(e).strip().splitlines()
    detail = f"{type(e).__name__}: {last[-1] if last else ''}"[:300]
    return (f"checkpoint at step {step} failed: {detail}; the partial save was removed and {keep}")


def check_free_space(root: str) -> None:
    """Refuse to start when the disk cannot hold one more checkpoint like the newest (a run
    would train until its first save and fail there, again and again)."""
    newest = newest_published(root)
    if newest is None:
        return
    needed, free = size_of(newest), free_bytes(root)
    if free < needed:
        raise CheckpointSaveError(
            f"checkpoint.dir: {root} has {_gib(free)} free, the newest checkpoint takes {_gib(needed)}: "
            "the next save would fail. Free space (or set checkpoint.dir elsewhere) and rerun")
