"""trainer.device=cuda means CUDA or a clear error, never a silent CPU/gloo rank (issue 14,
finding 10)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from dapo_megatron.policy import parallel

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")


@needs_no_gpu
def test_cuda_without_cuda_raises_with_the_reason():
    with pytest.raises(RuntimeError) as e:
        parallel.resolve_device("cuda")
    msg = str(e.value)
    assert "trainer.device=cuda" in msg and "CPU/gloo" in msg
    assert torch.__version__ in msg or "CUDA_VISIBLE_DEVICES" in msg
    with pytest.raises(RuntimeError, match="trainer.device=cuda"):
        parallel.init_parallel(device="cuda")  # before any process group or CPU layer


@needs_no_gpu
def test_auto_and_cpu_without_cuda_run_on_cpu():
    assert parallel.resolve_device("auto") is False
    assert parallel.resolve_device("cpu") is False
    with pytest.raises(ValueError, match="trainer.device"):
        parallel.resolve_device("gpu")


@needs_no_gpu
def test_auto_in_a_ray_gpu_worker_without_cuda_raises(monkeypatch):
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_gpu_ids=lambda: [3])
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    with pytest.raises(RuntimeError, match=r"Ray assigned GPUs \[3\]"):
        parallel.resolve_device("auto")


@needs_no_gpu
def test_policy_trainer_with_device_cuda_refuses_on_cpu():
    from dapo_megatron.config import load_config
    from dapo_megatron.policy.train import PolicyTrainer

    cfg = load_config(None, ["trainer.device=cuda", "model.num_layers=1", "model.hidden_size=32",
                             "model.intermediate_size=64"])
    with pytest.raises(RuntimeError, match="trainer.device=cuda"):
        PolicyTrainer.from_config(cfg, cfg.model.hf_config_dict(vocab_size=64))
