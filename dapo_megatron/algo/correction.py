"""Train/inference mismatch: its metrics, and the rollout correction that reweights for it.

The rollout engine samples token y_t from pi_engine, its own numerics of the policy
(another kernel set, another precision, FP8). The trainer's loss takes the ratio
pi_theta / pi_old with pi_old recomputed by the trainer, so every token also carries the
factor rho_t = pi_old(y_t) / pi_engine(y_t) that the loss ignores. The corrections below
put it back (or drop the tokens where it is too far from 1), as a detached per-token
weight w_t that multiplies the token's policy-gradient term:

- ``none``:       w = 1.
- ``token-tis``:  w = min(rho_t, C): truncated importance sampling (Yao et al. 2025,
  "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; slime
  ``--use-tis``, verl ``rollout_is``).
- ``token-mask``: w = 1 if low <= rho_t <= high else 0: IcePop's token masking (Ring-1T,
  arXiv 2510.18855; its [alpha, beta] is [low, high]).
- ``seq-tis``:    w = min(rho_i, C) for every token of sequence i, where rho_i is the
  geometric mean exp(mean_t log rho_t) of its token ratios (verl ``sequence`` /
  ``geometric`` level; NeMo-RL seq-mask-tis's ratio).
- ``seq-mask``:   w = 1 for every token of sequence i if low <= rho_i <= high, else 0.

C is ``high``; ``low`` defaults to 1 / high, the symmetric band [1/C, C]. A masked token
keeps its place in the loss normaliser (IcePop divides by all response tokens), so a
correction never changes how the loss splits over micro-batches or ranks.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_same_shape
from .kl import kl_penalty

CORRECTION_MODES = ("none", "token-tis", "token-mask", "seq-tis", "seq-mask")


def correction_bounds(high: float, low: float | None = None) -> tuple[float, float]:
    """(low, high) of the trusted ratio band; ``low`` None means 1 / high."""
    if not high > 0:
        raise ValueError(f"correction threshold high must be > 0, got {high}")
    low = 1.0 / high if low is None else low
    if not 0 <= low <= high:
        raise ValueError(f"correction threshold low must be in [0, high={high}], got {low}")
    return low, high


def log_ratios(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
               response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log rho per token and per sequence.

    Args:
        old_logprobs, engine_logprobs: [batch, seq] log pi_old and log pi_engine of the
            sampled tokens.
        response_mask: [batch, seq], True on response tokens.

    Returns:
        (token [batch, seq], 0 outside the mask; sequence [batch], the mean of the token
        log-ratios of each sequence, i.e. the log of their geometric mean; 0 for a sequence
        without response tokens). float64.
    """
    check_same_shape("old_logprobs", old_logprobs, engine_logprobs=engine_logprobs,
                     response_mask=response_mask)
    mask = response_mask.bool()
    diff = old_logprobs.detach().double() - engine_logprobs.detach().double()
    token = torch.where(mask, diff, torch.zeros((), dtype=torch.float64))
    count = mask.sum(dim=-1).clamp(min=1).double()
    return token, token.sum(dim=-1) / count


def correction_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                       response_mask: torch.Tensor, mode: str, *, high: float = 2.0,
                       low: float | None = None) -> torch.Tensor:
    """Per-token weight w [batch, seq] of the policy-gradient term (module docstring).

    float32, detached, 0 outside ``response_mask``. Multiply it into the per-token
    advantage: every loss here is linear in A at fixed ratio, so w * A applies the weight
    to the token's whole term (and its gradient), clip included.
    """
    check_choice("mode", mode, CORRECTION_MODES)
    low, high = correction_bounds(high, low)
    mask = response_mask.bool()
    token, seq = log_ratios(old_logprobs, engine_logprobs, response_mask)
    log_ratio = token if mode.startswith("token") else seq[:, None].expand_as(token)
    if mode == "none":
        weights = torch.ones_like(token)
    elif mode.endswith("tis"):
        weights = torch.exp(log_ratio).clamp(max=high)
    else:
        weights = _inside(log_ratio, low, high).double()
    return torch.where(mask, weights, torch.zeros((), dtype=weights.dtype)).float()


def mismatch_metrics(policy_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                     response_mask: torch.Tensor, *, high: float = 2.0,
                     low: float | None = None) -> dict[str, float]:
    """How far the engine's sampling distribution is from the trainer's, on one batch.

    Args:
        policy_logprobs: [batch, seq] the trainer's log-probs of the sampled tokens (pi_old
            recomputed by the policy).
        engine_logprobs: [batch, seq] the engine's log-probs of the same tokens.
        response_mask: [batch, seq] the tokens to measure.
        high, low: the trusted ratio band (``correction_bounds``), to count what lies out.

    Returns:
        Plain floats: ``logprob_abs_diff_mean`` / ``_max`` of |log pi_policy - log
        pi_engine|; ``kl_k3``, the k3 estimate of KL(pi_engine || pi_policy) (tokens were
        sampled from the engine, so k3 is unbiased and >= 0); ``ppl_ratio``, the policy's
        perplexity of the response tokens over the engine's, exp(mean(log pi_engine - log
        pi_policy)); ``token_outside_frac`` / ``seq_outside_frac``, the fraction of tokens
        (sequences, by the geometric-mean ratio) whose rho = pi_policy / pi_engine lies
        outside [low, high]. All 0 when the mask is empty.
    """
    low, high = correction_bounds(high, low)
    mask = response_mask.bool()
    names = ("logprob_abs_diff_mean", "logprob_abs_diff_max", "kl_k3", "ppl_ratio",
             "token_outside_frac", "seq_outside_frac")
    if not bool(mask.any()):
        return {name: (1.0 if name == "ppl_ratio" else 0.0) for name in names}
    token, seq = log_ratios(policy_logprobs, engine_logprobs, response_mask)
    diff = token[mask]
    has_tokens = mask.any(dim=-1)
    k3 = kl_penalty(engine_logprobs.double(), policy_logprobs.double(), "k3")[mask]
    outside = ~_inside(diff, low, high)
    seq_outside = ~_inside(seq, low, high)[has_tokens]
    return {
        "logprob_abs_diff_mean": float(diff.abs().mean()),
        "logprob_abs_diff_max": float(diff.abs().max()),
        "kl_k3": float(k3.mean()),
        "ppl_ratio": float(torch.exp(-diff.mean())),
        "token_outside_frac": float(outside.double().mean()),
        "seq_outside_frac": float(seq_outside.double().mean()),
    }


def _inside(log_ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """low <= rho <= high, compared in log space (one rule for weights and metrics)."""
    log_low = math.log(low) if low > 0 else float("-inf")
    return (log_ratio >= log_low) & (log_ratio <= math.log(high))
