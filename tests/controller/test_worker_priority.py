"""Ray workers started by the trainer run at the driver's priority unless configured.

Ray's raylet adds its `worker_niceness` (15 by default) to its own niceness for every worker
process, so on a shared machine the policy ranks and engines lost CPU to any other job.
The probe runs in a fresh process started at niceness +2, starts Ray the way the trainer
does, and reads an actor's niceness with os.nice(0). (trainer.worker_niceness is passed to
the same setting; a probe of it, 3 -> driver + 3, took another Ray start and was left out.)
"""

import os
import subprocess
import sys
import textwrap

import pytest

from dapo_megatron.config import ConfigError, load_config

pytest.importorskip("ray")

PROBE = textwrap.dedent("""
    import os, sys, ray
    from dapo_megatron.config import load_config
    from dapo_megatron.controller.loop import _init_ray

    @ray.remote(num_cpus=0)
    class Probe:
        def nice(self):
            return os.nice(0)

    _init_ray(load_config(None, []))
    print("driver", os.nice(0), "worker", ray.get(Probe.remote().nice.remote(), timeout=120), flush=True)
    ray.shutdown()
""")


def test_workers_run_at_the_driver_niceness():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    out = subprocess.run(["nice", "-n", "2", sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("driver")]
    driver = os.nice(0) + 2
    assert [(int(l[1]), int(l[3])) for l in lines] == [(driver, driver)]  # Ray's default: driver + 15


def test_worker_niceness_is_range_checked():
    with pytest.raises(ConfigError, match="trainer.worker_niceness"):
        load_config(None, ["trainer.worker_niceness=-1"])
    with pytest.raises(ConfigError, match="trainer.sample_budget"):
        load_config(None, ["trainer.sample_budget=-5"])
