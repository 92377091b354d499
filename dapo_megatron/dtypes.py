"""Dtype names, in one table: the config's short names (`model.params_dtype`: fp32, bf16,
fp16) and torch's names, which HF configs (`torch_dtype`), dist-checkpoint metadata and
SGLang's weight-update requests use ("bfloat16"). Safetensors' own codes ("BF16") are a file
format's and live with its reader (convert/hf_io.py)."""

from __future__ import annotations

import torch

_BY_NAME = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}


def to_torch(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a config/torch/HF name ("bf16", "bfloat16", "torch.bfloat16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _BY_NAME:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]


def name_of(dtype: str | torch.dtype) -> str:
    """torch's (and HF's) name of a dtype: torch.bfloat16 or "bf16" -> "bfloat16"."""
    return str(to_torch(dtype)).removeprefix("torch.")


def params_dtype(name: str | torch.dtype | None, on_gpu: bool) -> torch.dtype:
    """`model.params_dtype` as a torch dtype; "auto" (or None) is bf16 on GPU, fp32 on CPU."""
    if name is None or name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return to_torch(name)


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The precision sums, softmaxes and ratios are computed in: fp32 for half-precision (or
    integer) inputs, which lose too much there; the input's own for fp32 and fp64."""
    return torch.promote_types(dtype, torch.float32)


def engine_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """The embedded (CPU) engine's dtype for `model.params_dtype`: the policy's, at least
    fp32 (bf16 policies sample from fp32 copies of their weights; fp64 stays fp64)."""
    return at_least_fp32(params_dtype(name, on_gpu=False))
