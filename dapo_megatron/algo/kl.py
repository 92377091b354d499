"""KL(pi_theta || pi_ref) estimators, per token, and a KL loss term (off by default).

DAPO drops the KL term (Sec. 2.3: the policy is meant to move away from the initial
model in long-CoT RL); GRPO keeps one (Shao et al. 2024, eq. 4, with the k3 estimator).
With x sampled from the policy and d = log pi_theta(x) - log pi_ref(x), the estimators of
Schulman's note "Approximating KL divergence" (2020) are:

- k1 = d                        unbiased, can be negative, high variance
- k2 = d^2 / 2                  biased, >= 0, low variance
- k3 = exp(-d) - 1 + d          unbiased, >= 0, low variance (GRPO's choice)

``kl_penalty`` gives the per-token values (for a KL-in-reward shaping, or to log);
``kl_loss`` aggregates them like the policy loss so that ``policy_loss(...,
ref_logprobs=..., kl_coef=beta)`` is a GRPO-with-KL baseline.
"""

from __future__ import annotations

import torch

from ._checks import check_choice, check_same_shape, compute_dtype
from .aggregate import aggregate_loss

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3",
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref).

    Args:
        logprobs: [batch, seq] (any shape) log pi_theta of the sampled tokens; gradients
            flow through it.
        ref_logprobs: same shape, log pi_ref of the same tokens (treated as constant).
        kind: "k1", "k2" or "k3" (module docstring).

    Returns:
        Same shape as ``logprobs``, in at least float32.
    """
    check_choice("kind", kind, KL_KINDS)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    dtype = compute_dtype(logprobs)
    log_ratio = logprobs.to(dtype) - ref_logprobs.detach().to(dtype)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    # expm1 keeps k3 accurate for small |d|, where exp(-d) - 1 would cancel.
    return torch.expm1(-log_ratio) + log_ratio


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kind: str = "k3",
    agg: str = "token-mean",
    loss_scale_tokens: int | float | torch.Tensor | None = None,
    loss_scale_seqs: int | float | torch.Tensor | None = None,
    norm_len: int | float | None = None,
) -> torch.Tensor:
    """KL(pi_theta || pi_ref) estimate aggregated over response tokens: a 0-d tensor.

    ``response_mask`` [batch, seq]; ``agg``, the loss scales and ``norm_len`` mean what they mean for
    :func:`dapo_megatron.algo.aggregate.aggregate_loss`, so the term splits across
    micro-batches exactly like the policy loss. Add ``beta * kl_loss(...)`` to the loss.
    """
    mask = response_mask.bool()
    # Estimate 0 at masked positions, so garbage there cannot reach the backward pass
    # (exp() of a NaN log-ratio would, even behind the aggregation's where()).
    check_same_shape("logprobs", logprobs, response_mask=response_mask)
    logprobs = torch.where(mask, logprobs, ref_logprobs.detach().to(logprobs.dtype))
    per_token = kl_penalty(logprobs, ref_logprobs, kind)
    return aggregate_loss(
        per_token, response_mask, agg,
        loss_scale_tokens=loss_scale_tokens, loss_scale_seqs=loss_scale_seqs, norm_len=norm_len,
    )
