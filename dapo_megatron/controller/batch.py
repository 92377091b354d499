"""From scored groups to what the policy trains on: shaped rewards, advantages, masks.

    R_i   = rule reward (+1 / -1) + R_len(|o_i|)      (soft overlong punishment, if on)
    A_i   = (R_i - mean_G R) / (std_G R + eps)        (algo.group_advantages)
    mask  = response tokens, minus truncated samples  (overlong filtering, if on)
"""

from __future__ import annotations

import dataclasses

import torch

from dapo_megatron.algo import group_advantages, overlong_filter_mask, overlong_penalty
from dapo_megatron.controller.rollout_phase import ScoredGroup


@dataclasses.dataclass
class RolloutBatch:
    """One step's training sequences, flat over groups (group-major, G per group).

    input_ids:        per sequence, prompt + response token ids
    prompt_lengths:   per sequence, tokens of the prompt
    advantages:       [num_seqs] one advantage per response (broadcast over its tokens)
    loss_weights:     [num_seqs] 1.0, or 0.0 for samples masked out by overlong filtering
    engine_logprobs:  per sequence, the engine's log-probs of the response tokens
    rewards:          [num_seqs] shaped rewards; correct: [num_seqs] bool
    routed_experts:   per sequence, the engine's experts [prompt + response - 1, layers,
                      top_k] (MoE with algo.routing_replay), else None
    """

    input_ids: list[list[int]]
    prompt_lengths: list[int]
    advantages: torch.Tensor
    loss_weights: torch.Tensor
    engine_logprobs: list[list[float]]
    rewards: torch.Tensor
    correct: torch.Tensor
    truncated: torch.Tensor
    routed_experts: list[torch.Tensor | None] | None = None

    @property
    def response_lengths(self) -> list[int]:
        return [len(ids) - p for ids, p in zip(self.input_ids, self.prompt_lengths)]

    @property
    def num_response_tokens(self) -> int:
        return int(sum(n * float(w) for n, w in zip(self.response_lengths, self.loss_weights)))


def build_rollout_batch(groups: list[ScoredGroup], algo) -> RolloutBatch:
    """Shape rewards, compute group advantages and loss masks for the kept groups."""
    scores = torch.tensor([g.scores for g in groups], dtype=torch.float64)  # [groups, G]
    lengths = torch.tensor([[len(s.token_ids) for s in g.samples] for g in groups])
    truncated = torch.tensor([g.truncated for g in groups])
    rewards = scores
    if algo.soft_overlong:
        penalty = overlong_penalty(
            lengths.flatten(), algo.max_response_length, algo.overlong_buffer, algo.overlong_penalty_factor
        )
        rewards = rewards + penalty.view_as(rewards).to(torch.float64)
    advantages = group_advantages(rewards, eps=algo.adv_eps, unbiased=algo.adv_std_unbiased,
                                  scale_by_std=algo.loss != "drgrpo")  # Dr. GRPO: no std
    weights = torch.ones_like(rewards)
    if algo.overlong_filter:
        weights = overlong_filter_mask(truncated.flatten()).view_as(weights).to(weights.dtype)
    input_ids, prompt_lengths, engine_lp, routes = [], [], [], []
    for g in groups:
        for s in g.samples:
            input_ids.append(list(g.prompt_ids) + list(s.token_ids))
            prompt_lengths.append(len(g.prompt_ids))
            engine_lp.append(list(s.logprobs))
            routes.append(s.routed_experts)
    return RolloutBatch(
        input_ids=input_ids, prompt_lengths=prompt_lengths,
        advantages=advantages.flatten().float(), loss_weights=weights.flatten().float(),
        engine_logprobs=engine_lp, rewards=rewards.flatten().float(),
        correct=torch.tensor([c for g in groups for c in g.correct]), truncated=truncated.flatten(),
        routed_experts=routes if any(r is not None for r in routes) else None,
    )


def batch_metrics(batch: RolloutBatch) -> dict[str, float]:
    lengths = torch.tensor(batch.response_lengths, dtype=torch.float32)
    return {
        "reward/mean": float(batch.rewards.mean()),
        "train/accuracy": float(batch.correct.float().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": float(batch.truncated.float().mean()),
        "train/num_sequences": float(len(batch.input_ids)),
        "train/response_tokens": float(batch.num_response_tokens),
    }
