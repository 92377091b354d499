"""Token entropy from logits, to monitor entropy collapse (DAPO Sec. 3.1, Figure 2)."""

from __future__ import annotations

import torch

from ._checks import compute_dtype


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of softmax(logits) over the last dimension.

    Args:
        logits: [..., vocab] in any float dtype; -inf entries (masked vocabulary) are
            allowed, NaN is not.

    Returns:
        [...] float32 (or float64 for float64 input), computed in that precision from
        log_softmax, so large logits neither overflow nor lose the small probabilities.
    """
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-d tensor")
    logits = logits.to(compute_dtype(logits))
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    # p log p -> 0 as p -> 0, but 0 * (-inf) is NaN for masked entries: zero log p there
    # first (not after the product, or the backward pass would still meet 0 * -inf).
    log_probs = log_probs.masked_fill(probs == 0, 0.0)
    return -(probs * log_probs).sum(dim=-1)
