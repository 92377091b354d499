"""GPU-only settings refused in config validation before a cluster starts (issue 14, finding 9)."""

from __future__ import annotations

import pytest

from dapo_megatron import config as config_mod
from dapo_megatron.config import ConfigError, load_config


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["parallel.sequence_parallel=true"])
    assert "parallel.sequence_parallel" in str(e.value) and "parallel.tp" in str(e.value)
    # the same refusal megatron-core makes, only later and on a GPU
    from megatron.core.model_parallel_config import ModelParallelConfig

    with pytest.raises(ValueError, match="sequence parallelism"):
        ModelParallelConfig(sequence_parallel=True, tensor_model_parallel_size=1)
    cfg = load_config(None, ["parallel.sequence_parallel=true", "parallel.tp=2",
                             "parallel.gpus_per_node=2"])
    assert cfg.parallel.sequence_parallel


@pytest.mark.parametrize("cc,ok", [(None, False), ((9, 0), False), ((10, 0), True), ((12, 0), True)])
def test_mxfp8_needs_compute_capability_10(monkeypatch, cc, ok):
    monkeypatch.setattr(config_mod, "visible_compute_capability", lambda: cc)
    overrides = ["model.fp8=e4m3", "model.fp8_recipe=mxfp8"]
    if ok:
        assert load_config(None, overrides).model.fp8_recipe == "mxfp8"
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "model.fp8_recipe" in msg and "10.0" in msg
    assert ("9.0" in msg) if cc else ("no GPU" in msg)


def test_other_fp8_recipes_are_not_gated(monkeypatch):
    monkeypatch.setattr(config_mod, "visible_compute_capability", lambda: None)
    for recipe in ("delayed", "tensorwise", "blockwise"):
        assert load_config(None, ["model.fp8=e4m3", f"model.fp8_recipe={recipe}"]).model.fp8


def test_visible_compute_capability_is_none_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert config_mod.visible_compute_capability() is None
