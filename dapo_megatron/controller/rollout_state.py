"""What a step checkpoint keeps of the rollout in flight: carried partial responses
(`rollout.partial_rollouts`), the next step's prefetched rollout (`rollout.max_staleness`)
and the kept groups waiting for the next batch (`algo.surplus: carry`).

Written by the driver as `rollout_state.json` inside the checkpoint directory (so the
manifest seals it with the rest), as plain JSON: the policy's common state is loaded with
torch.load(weights_only=True), which refuses these dataclasses, and a checkpoint should
not need unpickling to be read. Floats round-trip exactly (repr), so a resumed run trains
on bit-identical log-probs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from dapo_megatron.algo import Group, SamplingStats
from dapo_megatron.controller.rollout_phase import RolloutResult, ScoredGroup
from dapo_megatron.data.datasets import PromptExample
from dapo_megatron.rollout.manager import GenerationCount
from dapo_megatron.rollout.partial import CarriedGroup
from dapo_megatron.rollout.protocol import Sample, compact_expert_ids

FILE = "rollout_state.json"


def _plain(obj: Any) -> Any:
    """json.dumps fallback for row metadata (numpy scalars and arrays from parquet)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _sample(d: dict) -> Sample:
    if d.get("routed_experts") is not None:  # JSON holds it as nested lists
        d = {**d, "routed_experts": compact_expert_ids(torch.tensor(d["routed_experts"], dtype=torch.int32))}
    return Sample(**d)


def _example(d: dict) -> PromptExample:
    return PromptExample(**d)


def _carried(d: dict) -> CarriedGroup:
    return CarriedGroup(payload=_example(d["payload"]), prompt_ids=d["prompt_ids"],
                        samples=[_sample(s) for s in d["samples"]], seed=d["seed"], stream_id=d["stream_id"])


def _scored(d: dict) -> ScoredGroup:
    return ScoredGroup(**{**d, "example": _example(d["example"]), "samples": [_sample(s) for s in d["samples"]]})


def _rollout(d: dict) -> RolloutResult:
    return RolloutResult(**{
        **d, "groups": [_scored(g) for g in d["groups"]], "stats": SamplingStats(**d["stats"]),
        "generated": GenerationCount(**d["generated"]), "carried": [_carried(c) for c in d["carried"]],
    })


def _surplus_group(d: dict) -> Group:
    correct = d["correct"]
    return Group(payload=_scored(d["payload"]), rewards=torch.tensor(d["rewards"], dtype=torch.float32),
                 correct=None if correct is None else torch.tensor(correct, dtype=torch.bool))


def write(path: str, carried: list[CarriedGroup], prefetched: RolloutResult | None,
          surplus: list[Group] = ()) -> None:
    """Write the rollout state into checkpoint directory `path` (nothing when there is none).
    surplus: the batch assembler's carried groups (payload a ScoredGroup)."""
    if not carried and prefetched is None and not surplus:
        return
    state = {"carried": [dataclasses.asdict(c) for c in carried],
             "prefetched": dataclasses.asdict(prefetched) if prefetched is not None else None,
             "surplus": [{"payload": dataclasses.asdict(g.payload), "rewards": g.rewards.tolist(),
                          "correct": None if g.correct is None else g.correct.tolist()} for g in surplus]}
    with open(os.path.join(path, FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, default=_plain)


def read(path: str) -> tuple[list[CarriedGroup], RolloutResult | None, list[Group]]:
    """(carried partials, prefetched rollout, surplus groups) of checkpoint directory `path`."""
    file = os.path.join(path, FILE)
    if not os.path.exists(file):
        return [], None, []
    with open(file, encoding="utf-8") as f:
        state = json.load(f)
    prefetched = state.get("prefetched")
    return ([_carried(c) for c in state.get("carried", [])], _rollout(prefetched) if prefetched else None,
            [_surplus_group(g) for g in state.get("surplus", [])])
