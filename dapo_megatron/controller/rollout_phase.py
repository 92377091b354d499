"""Generate, score and filter: DAPO's oversample-and-filter loop for one train batch.

Each round draws `rollout.gen_batch_size` prompts, samples G responses per prompt on the
engines, scores every response as its chunk of prompts completes, and hands the groups to
the dynamic-sampling `BatchAssembler`. As soon as enough groups are kept, the in-flight
chunks are aborted; the round limit (`algo.max_gen_batches`) bounds the loop.

What a step cost is what the engines generated (`RolloutResult.generated`: kept, dropped,
aborted part-way, and the rest of a chunk left unscored once the batch was full), not the
groups scored; `used_responses` / `used_tokens` are the part the train batch holds.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from dapo_megatron.algo import BatchAssembler, Group, SamplingStats
from dapo_megatron.data.datasets import PromptExample
from dapo_megatron.rollout.manager import GenerationCount
from dapo_megatron.rollout.protocol import Sample, SamplingParams

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScoredGroup:
    """The G scored responses to one prompt (the payload of an algo `Group`)."""

    example: PromptExample
    prompt_ids: list[int]
    samples: list[Sample]
    texts: list[str]
    correct: list[bool]
    scores: list[float]  # rule reward (+1 / -1) before length shaping
    reasons: list[str | None]

    @property
    def truncated(self) -> list[bool]:
        return [s.finish_reason == "length" for s in self.samples]


@dataclasses.dataclass
class RolloutResult:
    groups: list[ScoredGroup]
    stats: SamplingStats
    seconds_generate: float
    seconds_reward: float
    generated: GenerationCount  # everything the engines produced for this step
    reward_timeouts: int

    @property
    def used_responses(self) -> int:
        return sum(len(g.samples) for g in self.groups)

    @property
    def used_tokens(self) -> int:
        return sum(len(s.token_ids) for g in self.groups for s in g.samples)

    def metrics(self) -> dict[str, float]:
        """Generated vs used, responses and tokens, for the step's metrics."""
        return {
            "rollout/generated_responses": float(self.generated.responses),
            "rollout/generated_tokens": float(self.generated.tokens),
            "rollout/aborted_responses": float(self.generated.aborted),
            "rollout/aborted_tokens": float(self.generated.aborted_tokens),
            "rollout/used_responses": float(self.used_responses),
            "rollout/used_tokens": float(self.used_tokens),
        }


def sampling_params(cfg, *, n: int, seed: int, stop_ids: tuple[int, ...], eval_mode: bool = False) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        n=n,
        temperature=cfg.eval.temperature if eval_mode else r.temperature,
        top_p=cfg.eval.top_p if eval_mode else r.top_p,
        top_k=-1 if eval_mode else r.top_k,
        max_new_tokens=cfg.algo.max_response_length,
        stop_token_ids=stop_ids,
        seed=seed,
        # Evaluation needs no log-probs, and SGLang cannot return them under top_p < 1.
        return_logprobs=not eval_mode,
        # r3 replays them; r2 only measures against them (routing/* metrics).
        return_routed_experts=not eval_mode and cfg.algo.routing_replay != "none",
    )


def score_groups(examples, prompt_ids, samples_per_prompt, tokenizer, scorer) -> tuple[list[ScoredGroup], float, int]:
    """Decode and score every response; returns the groups, seconds spent, timeouts."""
    t0 = time.perf_counter()
    texts = [[tokenizer.decode(s.token_ids) for s in samples] for samples in samples_per_prompt]
    flat_texts = [t for ts in texts for t in ts]
    flat_refs = [ex.ground_truth for ex, ts in zip(examples, texts) for _ in ts]
    results = scorer.score(flat_texts, flat_refs)
    groups, k, timeouts = [], 0, 0
    for ex, ids, samples, ts in zip(examples, prompt_ids, samples_per_prompt, texts):
        res = results[k : k + len(ts)]
        k += len(ts)
        timeouts += sum(1 for r in res if r.reason == "timeout")
        groups.append(ScoredGroup(
            example=ex, prompt_ids=ids, samples=samples, texts=ts,
            correct=[bool(r.correct) for r in res], scores=[float(r.score) for r in res],
            reasons=[r.reason for r in res],
        ))
    return groups, time.perf_counter() - t0, timeouts


def collect_train_groups(*, cfg, step: int, sampler, tokenizer, engines, scorer,
                         assembler: BatchAssembler) -> RolloutResult:
    """Run generation rounds until `assembler` holds a full train batch (or the round limit).

    `engines` is an `EnginePool` (controller/engines.py); `scorer` has score(texts, refs).
    Generation seeds derive from (trainer.seed, step, round), so a resumed run regenerates
    exactly what the uninterrupted run would have.
    """
    a = cfg.algo
    t_gen = t_rew = 0.0
    timeouts = 0
    produced_before = engines.produced
    round_idx = 0
    while not assembler.done:
        examples: list[PromptExample] = sampler.next_batch(cfg.rollout.gen_batch_size)
        prompt_ids = [tokenizer.encode_prompt(ex.messages) for ex in examples]
        params = sampling_params(cfg, n=a.group_size, seed=_round_seed(cfg.trainer.seed, step, round_idx),
                                 stop_ids=tokenizer.stop_ids)
        needed = assembler.groups_needed
        kept_this_round = 0
        round_groups: list[Group] = []
        t0 = time.perf_counter()
        for chunk, samples in engines.generate_streaming(prompt_ids, params, tag=f"s{step}r{round_idx}"):
            t_gen += time.perf_counter() - t0
            groups, secs, n_timeouts = score_groups(
                [examples[i] for i in chunk], [prompt_ids[i] for i in chunk], samples, tokenizer, scorer)
            t_rew += secs
            timeouts += n_timeouts
            for g in groups:
                group = Group(payload=g, rewards=torch.tensor(g.scores), correct=torch.tensor(g.correct))
                round_groups.append(group)
                kept_this_round += int(group.has_signal or not a.dynamic_sampling)
            if kept_this_round >= needed:
                engines.abort_all()  # the batch is full: stop the chunks still in flight
                break
            t0 = time.perf_counter()
        assembler.add_round(round_groups)
        round_idx += 1
    batch = assembler.take()
    # Complete here: every round was either exhausted or aborted with wait.
    generated = engines.produced - produced_before
    return RolloutResult(
        groups=[g.payload for g in batch.groups], stats=batch.stats,
        seconds_generate=t_gen, seconds_reward=t_rew, generated=generated, reward_timeouts=timeouts,
    )


def _round_seed(seed: int, step: int, round_idx: int) -> int:
    return (seed * 1_000_003 + step * 1009 + round_idx) % (2**31 - 1)
