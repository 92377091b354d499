"""Overlong reward shaping (DAPO Sec. 3.4): soft punishment and overlong filtering.

Soft overlong punishment (DAPO eq. 13) adds to the reward of a response y

    R_len(y) = 0                                   if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
             = -1                                  if |y| > L_max

which falls linearly from 0 to -1 across the last L_cache tokens (continuous at both
ends). Overlong filtering instead masks truncated responses out of the loss; the two are
separate switches and can be combined.
"""

from __future__ import annotations

import torch

from ._checks import compute_dtype


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, cache_len: int, factor: float = 1.0,
) -> torch.Tensor:
    """Soft overlong punishment R_len(|y|), scaled by ``factor``.

    Args:
        lengths: [batch] response lengths |y| in tokens (int or float).
        max_len: L_max, the generation budget in tokens.
        cache_len: L_cache, the length of the soft-punishment band, 0 <= L_cache < L_max
            (0 turns the band off: only |y| > L_max is punished).
        factor: multiplies R_len (1.0 in the paper).

    Returns:
        [batch] float32 penalties in [-factor, 0].
    """
    if max_len <= 0:
        raise ValueError(f"max_len (L_max) must be positive, got {max_len}")
    if not 0 <= cache_len < max_len:
        raise ValueError(
            f"cache_len (L_cache) must satisfy 0 <= cache_len < max_len={max_len}, got {cache_len}"
        )
    lengths = lengths.to(compute_dtype(lengths))
    soft_start = max_len - cache_len
    # max(cache_len, 1) only guards the division; with cache_len 0 the band is empty.
    in_band = (soft_start - lengths) / max(cache_len, 1)
    penalty = torch.where(lengths <= soft_start, torch.zeros_like(lengths), in_band)
    penalty = torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)
    return penalty * factor


def overlong_filter_mask(truncated: torch.Tensor) -> torch.Tensor:
    """Which samples stay in the loss under overlong filtering (DAPO Sec. 3.4).

    Args:
        truncated: [batch] bool, True for responses cut off at the length limit (no EOS).

    Returns:
        [batch] bool, False for truncated samples. Apply it to the loss mask as
        ``response_mask & keep[:, None]``; a fully masked sequence then drops out of the
        loss and of its normaliser (see aggregate.py).
    """
    if truncated.dim() != 1:
        raise ValueError(f"truncated must be [batch], got shape {tuple(truncated.shape)}")
    return ~truncated.bool()
