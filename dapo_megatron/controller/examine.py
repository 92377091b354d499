"""What the model writes: a few decoded responses per data source in the log, every step
(`logging.num_examine`, as verl's reward managers print them) and at every evaluation.

The responses are the texts the reward phase already decoded (`ScoredGroup.texts`); the
reward shown is the rule reward (+1 / -1, before length shaping), the length is in tokens.
"""

from __future__ import annotations

import logging

from dapo_megatron.controller.rollout_phase import ScoredGroup

logger = logging.getLogger("dapo_megatron.examine")

PROMPT_TAIL_CHARS = 300  # the end of a prompt is the question; templates repeat the rest
RESPONSE_MAX_CHARS = 4000


def pick_examples(groups: list[ScoredGroup], per_source: int) -> list[tuple[ScoredGroup, int]]:
    """(group, sample index) pairs: ``per_source`` per data source, one sample from each
    group before a second from any (first samples first), in the groups' order."""
    if per_source <= 0:
        return []
    width = max((len(g.texts) for g in groups), default=0)
    counts: dict[str, int] = {}
    picked = []
    for i in range(width):
        for g in groups:
            source = g.example.data_source
            if i < len(g.texts) and counts.get(source, 0) < per_source:
                counts[source] = counts.get(source, 0) + 1
                picked.append((g, i))
    return picked


def format_example(group: ScoredGroup, i: int, tag: str) -> str:
    sample = group.samples[i]
    prompt = group.example.prompt_text
    if len(prompt) > PROMPT_TAIL_CHARS:
        prompt = "..." + prompt[-PROMPT_TAIL_CHARS:]
    response = group.texts[i]
    if len(response) > RESPONSE_MAX_CHARS:
        response = response[:RESPONSE_MAX_CHARS] + f"... [{len(group.texts[i])} chars]"
    verdict = "correct" if group.correct[i] else "wrong"
    truncated = ", truncated" if sample.finish_reason == "length" else ""
    return (f"[{tag}] data_source={group.example.data_source or '-'} reward={group.scores[i]:+g} "
            f"({verdict}) length={len(sample.token_ids)} tokens{truncated}\n"
            f"[prompt] {prompt}\n[response] {response}\n[ground_truth] {group.example.ground_truth}")


def log_examples(groups: list[ScoredGroup], per_source: int, tag: str) -> list[str]:
    """Log ``per_source`` decoded responses per data source; returns the logged blocks."""
    blocks = [format_example(g, i, tag) for g, i in pick_examples(groups, per_source)]
    for block in blocks:
        logger.info("%s", block)
    return blocks
