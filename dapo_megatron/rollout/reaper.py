"""Ends a server's process group when the process that started it dies without cleaning up.

An SGLang server runs in a session of its own (so `SGLangEngine._kill` can end its whole
process group), which also means it outlives an engine actor that is SIGKILLed (ray.kill,
the OOM killer, a crashed raylet): the server and its scheduler children keep their GPU
memory, and the next engine on that GPU cannot start. SGLang's own children already die
with the server's main process (`kill_itself_when_parent_died` in
sglang/srt/utils/common.py, PR_SET_PDEATHSIG); the server's main process has nobody
watching its parent. PR_SET_PDEATHSIG on it would fire when the *thread* that spawned it
exits (prctl(2)), and a Ray actor's calls run on pool threads, so a small reaper process
does it instead: started by the engine, in a session of its own, it polls its parent and
SIGKILLs the server's group once the parent is gone; it exits by itself when the group
ends first (a normal shutdown).

    python -m dapo_megatron.rollout.reaper <server process group id>
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def spawn_reaper(pgid: int) -> subprocess.Popen:
    """Start a reaper for process group pgid, watching the calling process."""
    return subprocess.Popen([sys.executable, "-m", "dapo_megatron.rollout.reaper", str(pgid)],
                            start_new_session=True, stdin=subprocess.DEVNULL)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def watch(pgid: int, parent: int) -> None:
    while _group_exists(pgid):
        if os.getppid() != parent:  # re-parented: the engine died without ending the server
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(POLL_S)


def main() -> None:
    watch(int(sys.argv[1]), os.getppid())


if __name__ == "__main__":
    main()
