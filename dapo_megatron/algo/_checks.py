"""Argument checks shared by the algo/ functions: errors that name the offending argument."""

from __future__ import annotations

import torch

from dapo_megatron.dtypes import at_least_fp32


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    """Raise ValueError naming every tensor whose shape differs from ``reference``."""
    for name, tensor in others.items():
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {reference_name} has shape "
                f"{tuple(reference.shape)}; they must match"
            )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """At least float32: ratios and sums of half-precision log-probs lose too much."""
    return at_least_fp32(tensor.dtype)
