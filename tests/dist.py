"""Run a function on N real torch.distributed (gloo) processes on this machine.

Multi-rank tests use this one helper: every rank runs ``fn(rank, world_size, *args)``
in its own spawned process with the default process group initialised; the return
values come back ordered by rank, and a failure on any rank fails the test with that
rank's traceback.
"""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from dapo_megatron.ports import free_port


def _worker(rank, world_size, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 600.0):
    """Spawn ``world_size`` gloo ranks running ``fn(rank, world_size, *args)``.

    ``fn`` must be a module-level function (it is pickled). Returns the list of
    per-rank return values; raises RuntimeError with the first failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    if len(results) != world_size:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"distributed test lost ranks (exit codes {codes}, timeout {timeout}s)")
    return [results[r] for r in range(world_size)]


__all__ = ["run_distributed"]
