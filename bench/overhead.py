"""Where the embedded default's fixed time goes: start-up, weight syncs, checkpoints, shutdown.

Runs the real trainer (`dapo_megatron.controller.loop.train`) on `examples/tiny_cpu.yaml`
with timers wrapped around its phases, and prints one line per phase: total seconds and
calls. Everything that is not a train step is overhead a longer run pays once (start-up,
shutdown) or per save (checkpoint).

    python bench/overhead.py                                   # 2 steps, a save after each
    python bench/overhead.py trainer.max_steps=5 checkpoint.save_every=5
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import tempfile
import time

T0 = time.perf_counter()  # before the heavy imports below: they are part of start-up

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dapo_megatron.config import load_config  # noqa: E402
from dapo_megatron.controller import loop  # noqa: E402

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t)
    return wrapper


def main(overrides: list[str]) -> None:
    TIMES["import dapo_megatron.controller.loop (torch, ray, ...)"].append(time.perf_counter() - T0)
    run_dir = tempfile.mkdtemp(prefix="overhead_")
    cfg = load_config(os.path.join(ROOT, "examples/tiny_cpu.yaml"),
                      ["trainer.max_steps=2", "checkpoint.save_every=1", "eval.every=0",
                       f"trainer.run_dir={run_dir}", *overrides])
    # PolicyGroup returns before its ranks are ready (they build while the engines start):
    # its line is placement only; Trainer.__init__ is the start-up's wall time.
    for name in ("load_task", "_init_ray", "PolicyGroup", "EnginePool", "RewardPool"):
        setattr(loop, name, timed(f"start: {name}", getattr(loop, name)))
    loop.Trainer.__init__ = timed("start: Trainer.__init__ (all of start-up)", loop.Trainer.__init__)
    for name in ("sync_weights", "save", "train_step", "evaluate", "shutdown"):
        setattr(loop.Trainer, name, timed(name, getattr(loop.Trainer, name)))
    loop.plot_metrics = timed("plot_metrics", loop.plot_metrics)
    t = time.perf_counter()
    loop.train(cfg)
    TIMES["train() in all"].append(time.perf_counter() - t)
    total = time.perf_counter() - T0
    steps = sum(TIMES["train_step"])
    print(f"{'phase':58s} {'seconds':>8s} {'calls':>5s}")
    for name, values in TIMES.items():
        print(f"{name:58s} {sum(values):8.2f} {len(values):5d}")
    print(f"{'process total':58s} {total:8.2f}")
    print(f"{'overhead (process total - train steps)':58s} {total - steps:8.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
