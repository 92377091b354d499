"""The per-token surrogate objectives of the loss family: DAPO, GSPO, CISPO, Dr. GRPO.

Each gives J_it, the term of token t of sequence i to *maximise*; ``policy_loss``
aggregates -J. With r_it = pi_theta(o_it) / pi_old(o_it) and advantage A_it:

- ``dapo`` (arXiv 2503.14476, eq. 8): min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
  with dual clip max(., c A) for A < 0 when ``clip_ratio_c`` is set.
- ``gspo`` (arXiv 2507.18071, the GSPO objective and its GSPO-token form): the same clipped
  min on the sequence ratio s_i = exp(mean_t log r_it), written per token as
  s_it = sg(s_i) * pi_theta(o_it) / sg(pi_theta(o_it)), whose value is s_i and whose
  gradient is s_i grad log pi_theta(o_it). A whole sequence is clipped or not. Under
  "seq-mean-token-mean" aggregation this is the paper's objective exactly (its clip range
  is tiny, 3e-4 / 4e-4, in its experiments).
- ``cispo`` (MiniMax-M1, arXiv 2506.13585, eq. 4): sg(min(r, 1 + eps_high)) A log pi_theta,
  REINFORCE weighted by a clipped, stop-gradient IS weight; no token loses its gradient.
  The paper imposes no lower bound on the weight (Sec. 3.1), so eps_low is not used.
- ``drgrpo`` (arXiv 2503.20783): DAPO's clipped term; what makes it Dr. GRPO
  lives elsewhere: advantages without the std (``group_advantages(scale_by_std=False)``)
  and the constant normaliser (aggregation "seq-mean-token-sum-norm").

``LOSS_AGG`` is each loss's own aggregation, used when the config leaves it unset.
"""

from __future__ import annotations

import torch

from ._checks import check_choice

LOSS_TYPES = ("dapo", "gspo", "cispo", "drgrpo")

LOSS_AGG = {
    "dapo": "token-mean",                 # DAPO Sec. 3.3
    "gspo": "seq-mean-token-mean",        # GSPO: 1/G sum_i over sequence terms
    "cispo": "token-mean",                # CISPO eq. 4: 1 / sum_i |o_i|
    "drgrpo": "seq-mean-token-sum-norm",  # Dr. GRPO: sum_t / L_max, mean over sequences
}


def resolve_agg(loss_type: str, agg: str | None) -> str:
    """``agg`` if set, else the loss's own aggregation (``algo.loss_agg: null``)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    return agg or LOSS_AGG[loss_type]


def token_objective(
    loss_type: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """J_it and which tokens are clipped, for one loss of LOSS_TYPES.

    Args:
        logprobs: [batch, seq] log pi_theta in the compute dtype; gradients flow here.
        old_logprobs: [batch, seq] log pi_old (constant).
        advantages: [batch, seq] A_it, 0 outside the mask, detached.
        response_mask: [batch, seq] bool.
        eps_low, eps_high: clip range of the ratio (of the IS weight's top for cispo).
        clip_ratio_c: dual clip (dapo and drgrpo only).

    Returns:
        (objective, log_ratio, clipped_low, clipped_high), all [batch, seq]: J_it; the
        token log-ratio log r_it (0 outside the mask, detached); bool masks of the tokens
        where the lower / upper bound is active (for gspo, every token of a clipped
        sequence; for cispo, clipped_high marks a truncated IS weight, clipped_low is empty).
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if clip_ratio_c is not None and loss_type in ("gspo", "cispo"):
        raise ValueError(f"clip_ratio_c (dual clip) applies to the PPO-clip losses, not {loss_type!r}")
    mask = response_mask
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Masked positions get log-ratio 0: padding never produces inf or NaN through exp().
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach().to(logprobs.dtype), zero)
    none = torch.zeros_like(mask)

    if loss_type == "cispo":
        weight = torch.exp(log_ratio.detach()).clamp(max=1.0 + eps_high)
        safe_lp = torch.where(mask, logprobs, zero)
        objective = weight * advantages * safe_lp
        return objective, log_ratio.detach(), none, mask & (weight < torch.exp(log_ratio.detach()))

    if loss_type == "gspo":
        count = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(logprobs.dtype)
        seq_log_ratio = (log_ratio.detach().sum(dim=-1, keepdim=True) / count).expand_as(log_ratio)
        # Value s_i, gradient s_i * d log pi_theta: sg(log s_i) + (log r - sg(log r)).
        ratio = torch.exp(seq_log_ratio + log_ratio - log_ratio.detach())
    else:
        ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    objective = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    if clip_ratio_c is not None:
        objective = torch.where(advantages < 0, torch.maximum(objective, clip_ratio_c * advantages),
                                objective)
    value = ratio.detach()
    clipped_low = mask & (advantages < 0) & (value < 1.0 - eps_low)
    clipped_high = mask & (advantages > 0) & (value > 1.0 + eps_high)
    return objective, log_ratio.detach(), clipped_low, clipped_high
