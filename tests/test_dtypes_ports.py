"""The one dtype-name table and the one free-port helper."""

from __future__ import annotations

import socket

import pytest
import torch

from dapo_megatron import dtypes
from dapo_megatron.ports import free_port


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_config_torch_and_hf_names_agree(dtype):
    torch_name = str(dtype).removeprefix("torch.")  # what HF configs and SGLang requests carry
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[torch_name]
    for name in (short, torch_name, str(dtype), dtype):
        assert dtypes.to_torch(name) is dtype
        assert dtypes.name_of(name) == torch_name
    assert getattr(torch, dtypes.name_of(short)) is dtype


def test_auto_is_bf16_on_gpu_fp32_on_cpu_and_unknown_names_are_refused():
    assert dtypes.params_dtype("auto", on_gpu=True) is torch.bfloat16
    assert dtypes.params_dtype(None, on_gpu=False) is torch.float32
    assert dtypes.params_dtype("bf16", on_gpu=False) is torch.bfloat16
    with pytest.raises(ValueError, match="'fp8'.*bf16"):
        dtypes.to_torch("fp8")


def test_sglang_engine_gets_torch_names():
    from dapo_megatron.config import load_config
    from dapo_megatron.rollout.sglang_engine import sglang_config_from

    for given, expected in (("bf16", "bfloat16"), ("fp32", "float32"), ("auto", "auto")):
        # /x has no config.json: the layout check (resolve) is not what this test is about.
        cfg = load_config(None, ["model.hf_dir=/x", "rollout.engine_tp=1", f"model.params_dtype={given}"],
                          check_layout=False)
        assert sglang_config_from(cfg).dtype == expected


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
