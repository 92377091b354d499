"""Group-relative advantages (GRPO / DAPO): each response scored against its own group.

A_i = (R_i - mean(R)) / (std(R) + eps) over the G responses of one prompt (DAPO eq. 9),
the same value for every token of o_i.

Std convention: the unbiased (Bessel-corrected, divide by G - 1) sample standard
deviation, as ``torch.std`` computes it by default and as verl's GRPO advantage (the
implementation DAPO was released on) uses. ``unbiased=False`` gives the population std
(divide by G). For +-1 rewards the two differ by a factor sqrt(G / (G - 1)), e.g. 3% at
G = 16. A group whose rewards are all equal (std 0, or G = 1) carries no signal and gets
advantage exactly 0, whatever eps.

``scale_by_std=False`` is Dr. GRPO's advantage A_i = R_i - mean(R) (arXiv 2503.20783:
dividing by the std weights groups whose rewards barely differ, too easy or too hard, up).
"""

from __future__ import annotations

import torch

from ._checks import compute_dtype


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, *, unbiased: bool = True,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Normalise rewards within each group.

    Args:
        rewards: [num_groups, G] scalar reward of each response, grouped by prompt.
        eps: added to the std to bound the advantage when the std is tiny.
        unbiased: divide the variance by G - 1 (default) or by G (population std).
        scale_by_std: divide by std + eps (GRPO, DAPO) or not (Dr. GRPO).

    Returns:
        [num_groups, G] advantages, float32 or the input's float dtype if wider; zero for
        groups whose rewards are all equal.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards = rewards.to(compute_dtype(rewards))
    if rewards.shape[1] == 0:
        return rewards.clone()
    advantages = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale_by_std:
        if rewards.shape[1] > 1:
            std = rewards.std(dim=-1, keepdim=True, correction=1 if unbiased else 0)
        else:
            std = torch.zeros_like(advantages[:, :1])  # the unbiased std of one sample is NaN
        advantages = advantages / (std + eps)
    # Compare values rather than std == 0: the mean of equal floats can differ from them
    # by an ulp, which divided by eps would give a small spurious advantage.
    all_equal = (rewards == rewards[:, :1]).all(dim=-1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)
