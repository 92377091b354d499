"""The local cluster the trainer starts ends at interpreter exit without Ray's SIGTERM grace.

_init_ray starts Ray's processes with SIGTERM blocked (so a scancel reaches only the driver),
which made ray.shutdown's 1 s grace per process run out five times at the end of every run.
`stop_local_ray` (registered at exit) disconnects the driver and SIGKILLs them at once,
together with the raylet's children (its agents), which would otherwise outlive it.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

PROBE = textwrap.dedent("""
    import atexit, psutil, ray
    from ray._private import node as node_mod
    from dapo_megatron.config import load_config
    from dapo_megatron.controller.loop import _init_ray

    graceful = []
    real = node_mod.Node.kill_all_processes

    def spy(self, *args, **kwargs):
        graceful.append(kwargs.get("allow_graceful"))
        return real(self, *args, **kwargs)

    node_mod.Node.kill_all_processes = spy
    # Registered before _init_ray registers its own, so it runs after it (atexit is LIFO).
    atexit.register(lambda: print("graceful", graceful, flush=True))
    _init_ray(load_config(None, []))
    node = ray._private.worker._global_node
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
    raylet = node.all_processes["raylet"][0].process.pid
    pids += [child.pid for child in psutil.Process(raylet).children(recursive=True)]
    print("pids", *pids, flush=True)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_exit_kills_every_ray_process_at_once():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.stdout.splitlines()
             if line.startswith(("pids", "graceful"))}
    # Only stop_local_ray killed them, without the grace; Ray's own handler found nothing left.
    assert lines["graceful"] == "[False]"
    pids = [int(p) for p in lines["pids"].split()]
    assert len(pids) >= 4  # raylet, GCS, monitors, and the raylet's agents
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in pids if not _gone(p)] == []
