"""One run per run directory: a lock naming its holder, and no silent reuse of an old run.

`claim_run_dir` is the first thing a training launch does. It takes an exclusive `flock`
on `<run dir>/.lock` (released by the kernel when the process dies, so a kill -9 leaves no
stale lock) and writes the holder's pid, host and start time into it; a second launch on
the same directory fails at once naming that holder. A launch with
`checkpoint.resume: false` on a directory that already holds a run (metrics or
checkpoints) is refused, unless `checkpoint.overwrite: true`, which moves the old run
aside to `<run dir>.replaced-<UTC time>/` first.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used for this launch; the message says why and what to do."""


class RunDirLock:
    """An exclusive lock on a run directory for the life of this process (or `release`)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"trainer.run_dir: {self.run_dir} is in use by {describe_holder(self.path)}; "
                "wait for it, stop it, or choose another trainer.run_dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def describe_holder(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8") as f:
            h = json.loads(f.read() or "{}")
        return f"process {h['pid']} on {h['host']} (started {h['started']})"
    except (OSError, ValueError, KeyError):
        return "another process (holder unknown)"


def holds_a_run(cfg) -> list[str]:
    """What in the run's directories shows an earlier run (empty: a fresh directory)."""
    found = []
    metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        found.append(metrics)
    ckpt = cfg.checkpoint_dir
    if os.path.isdir(ckpt) and any(n.startswith("step_") for n in os.listdir(ckpt)):
        found.append(ckpt)
    return found


def claim_run_dir(cfg) -> RunDirLock:
    """Lock the run directory and check this launch may use it (see the module docstring)."""
    lock = RunDirLock(cfg.run_dir).acquire()
    try:
        previous = holds_a_run(cfg)
        if previous and not cfg.checkpoint.resume:
            if not cfg.checkpoint.overwrite:
                raise RunDirError(
                    f"checkpoint.resume is false but {cfg.run_dir} already holds a run ({', '.join(previous)}): "
                    "set checkpoint.resume=true to continue it, checkpoint.overwrite=true to move it "
                    "aside and start over, or choose another trainer.run_dir")
            aside = move_run_aside(cfg)
            logger.warning("checkpoint.overwrite: the previous run in %s was moved to %s", cfg.run_dir, aside)
    except BaseException:
        lock.release()
        raise
    return lock


def move_run_aside(cfg) -> str:
    """Move the earlier run's files (and an external checkpoint.dir) to a sibling directory."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = os.path.normpath(cfg.run_dir)
    aside = f"{run_dir}.replaced-{stamp}"
    os.makedirs(aside)
    for name in os.listdir(run_dir):
        if name != LOCK_NAME:
            os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    ckpt = os.path.normpath(cfg.checkpoint_dir)
    if os.path.isdir(ckpt) and not ckpt.startswith(run_dir + os.sep):
        os.replace(ckpt, os.path.join(aside, "checkpoint.dir-" + os.path.basename(ckpt)))
    return aside
