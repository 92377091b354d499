"""Where a run's checkpoints live: `<checkpoint dir>/step_<N>/`, newest = highest complete N.

A checkpoint is written into `step_<N>.tmp/` and renamed when complete, so a crash while
saving leaves the previous checkpoint as the newest; only `checkpoint.keep_last` are kept.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Callable

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dirs(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest(cfg) -> str | None:
    dirs = step_dirs(cfg.checkpoint_dir)
    return dirs[-1][1] if dirs else None


def save(cfg, step: int, write: Callable[[str], None]) -> str:
    """Call `write(tmp_dir)` to fill a new checkpoint, then publish it atomically."""
    root = cfg.checkpoint_dir
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in step_dirs(root)[: -cfg.checkpoint.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final
