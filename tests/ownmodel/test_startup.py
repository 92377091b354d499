"""trainer.device=cuda without a usable GPU: a clear error within seconds.

Before this was fixed the trainer waited on Ray's "No available node types can fulfill
resource request" (the policy's placement group asks for GPUs that never come).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_fails_fast_naming_the_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dapo_megatron.cli", "train", "examples/tiny_cpu.yaml",
             "trainer.device=cuda", f"trainer.run_dir={tmp_path / 'run'}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("trainer.device=cuda on a machine without a GPU did not fail within 180 s")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: trainer.device: cuda" in proc.stderr
    assert "trainer.device=cpu" in proc.stderr  # says what to do
    assert "Traceback" not in proc.stderr
    assert elapsed < 120  # seconds of imports on a loaded 2-core machine; no Ray actor starts


def test_cluster_check_counts_gpus(monkeypatch):
    """With a Ray cluster (RAY_ADDRESS) the check asks the cluster, not this machine."""
    import ray

    from dapo_megatron.config import ConfigError, load_config
    from dapo_megatron.controller.startup import check_cluster_device

    cfg = load_config(None, ["trainer.device=cuda", "parallel.nodes=2", "parallel.gpus_per_node=8"])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    with pytest.raises(ConfigError, match="needs 16 GPUs .* has 8"):
        check_cluster_device(cfg)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 16.0})
    check_cluster_device(cfg)
