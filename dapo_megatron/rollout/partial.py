"""Partial rollouts: responses stopped by an abort are carried to the next step and continued.

When the train batch fills, a round's in-flight responses are aborted with their tokens,
per-token log-probs and weight version (`RolloutRound.leftovers`). Each such prompt
becomes a `CarriedGroup`; the next step continues its unfinished samples first
(`resume_requests`: prompt + partial response as the prefix, the same random stream,
protocol.Resume) under the weights of that step, and `stitch` joins the old and the new
tokens into one response. Every token keeps the version it was drawn under
(`Sample.token_versions`) and its behaviour log-prob from the engine, so the off-policy
correction (algo/correction.py) weighs each token against the distribution that drew it.

Staleness of a response trained at policy version v: v minus the oldest version among its
tokens. `stale` says whether a group exceeds the bound; the caller drops such groups and
counts them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dapo_megatron.rollout.protocol import Resume, Sample


@dataclasses.dataclass
class CarriedGroup:
    """One prompt's group left over by an aborted round.

    payload: the caller's record of the prompt (opaque here: e.g. its PromptExample).
    prompt_ids: the prompt's token ids.
    samples: [G] the responses so far, by sample_index; finish_reason "abort" marks the
        ones still to continue, the others are finished.
    seed, stream_id: the random stream the group started from (its round's seed and the
        request id it had there); every continuation draws from it.
    """

    payload: Any
    prompt_ids: list[int]
    samples: list[Sample]
    seed: int
    stream_id: str

    @property
    def unfinished(self) -> list[Sample]:
        return [s for s in self.samples if s.finish_reason == "abort"]

    @property
    def complete(self) -> bool:
        return not self.unfinished


def token_versions(sample: Sample) -> list[int]:
    """[T] the weight version of each token of sample."""
    if sample.token_versions is not None:
        return list(sample.token_versions)
    return [sample.weight_version] * len(sample.token_ids)


def oldest_version(sample: Sample) -> int:
    """The oldest weight version among the sample's tokens (its version if it has none)."""
    return min(token_versions(sample), default=sample.weight_version)


def staleness(samples: list[Sample], train_version: int) -> list[int]:
    """Per sample: how many versions its oldest token lags behind train_version."""
    return [max(0, train_version - oldest_version(s)) for s in samples]


def stale(samples: list[Sample], train_version: int, bound: int) -> bool:
    """True when any sample's oldest token is more than `bound` versions old."""
    return max(staleness(samples, train_version), default=0) > bound


def resume_requests(group: CarriedGroup) -> list[Resume]:
    """What the engine continues for this group: each unfinished sample from its tokens."""
    return [Resume(s.sample_index, tuple(s.token_ids), group.seed, group.stream_id) for s in group.unfinished]


def stitch(base: list[Sample], new: list[Sample]) -> list[Sample]:
    """The group's samples with each of `new` (continuations, new tokens only, matched by
    sample_index) appended to its base sample: tokens, log-probs, raw log-probs (when both
    have them) and per-token versions concatenated; finish reason and weight_version are
    the continuation's. Samples without a continuation are kept as they are."""
    by_index = {s.sample_index: s for s in new}
    unknown = set(by_index) - {s.sample_index for s in base}
    if unknown:
        raise ValueError(f"continuations for sample indices {sorted(unknown)} that the group does not have")
    out = []
    for old in base:
        cont = by_index.get(old.sample_index)
        if cont is None:
            out.append(old)
            continue
        if old.finish_reason != "abort":
            raise ValueError(f"sample {old.request_id}/{old.sample_index} finished ({old.finish_reason}); "
                             "only aborted samples are continued")
        raw = None
        if old.raw_logprobs is not None and cont.raw_logprobs is not None:
            raw = list(old.raw_logprobs) + list(cont.raw_logprobs)
        out.append(dataclasses.replace(
            cont,
            token_ids=list(old.token_ids) + list(cont.token_ids),
            logprobs=list(old.logprobs) + list(cont.logprobs),
            raw_logprobs=raw,
            prompt_index=old.prompt_index,
            request_id=old.request_id,
            token_versions=token_versions(old) + token_versions(cont),
        ))
    return out


def summary(samples: list[Sample], train_version: int) -> dict[str, float]:
    """Staleness of what a step trains on: mean and max over responses, and the share of
    tokens drawn under an older version than train_version."""
    ages = staleness(samples, train_version)
    versions = [v for s in samples for v in token_versions(s)]
    return {
        "staleness/mean": sum(ages) / max(len(ages), 1),
        "staleness/max": float(max(ages, default=0)),
        "staleness/old_token_frac": sum(v < train_version for v in versions) / max(len(versions), 1),
    }
