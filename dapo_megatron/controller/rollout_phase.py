"""Generate, score and filter: DAPO's oversample-and-filter loop for one train batch.

Each round draws `rollout.gen_batch_size` prompts (with `rollout.adaptive_gen_batch`, as many
as the keep rate so far says the batch still needs: `BatchAssembler.round_size`), samples G
responses per prompt on the engines, scores every response as its chunk of prompts
completes, and hands the groups to the dynamic-sampling `BatchAssembler`. As soon as enough
groups are kept, the in-flight chunks are aborted; the round limit (`algo.max_gen_batches`)
bounds the loop.

What a step cost is what the engines generated (`RolloutResult.generated`: kept, dropped,
aborted part-way, and the rest of a chunk left unscored once the batch was full), not the
groups scored; `used_responses` / `used_tokens` are the part the train batch holds.

With `rollout.partial_rollouts` the aborted and unscored groups are not thrown away: they
come back as `RolloutResult.carried` (rollout/partial.py), and the next step's first round
continues them before it draws fresh prompts. A group whose oldest token is more than
`staleness_bound` versions behind the policy that trains on it is dropped and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from dapo_megatron.algo import BatchAssembler, Group, SamplingStats
from dapo_megatron.data.datasets import PromptExample
from dapo_megatron.rollout import partial
from dapo_megatron.rollout.manager import GenerationCount
from dapo_megatron.rollout.partial import CarriedGroup
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
    # Partial rollouts: the groups this step leaves for the next one (rollout/partial.py).
    carried: list[CarriedGroup] = dataclasses.field(default_factory=list)
    finished_partials: int = 0  # carried responses that finished in this step
    stale_dropped_groups: int = 0  # groups over the staleness bound, never trained on
    stale_dropped_responses: int = 0
    train_version: int = 0  # the policy version that trains on this result

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
            "partial/continued_responses": float(self.generated.continued),
            "partial/finished_responses": float(self.finished_partials),
            "partial/carried_groups": float(len(self.carried)),
            "partial/carried_responses": float(sum(len(c.unfinished) for c in self.carried)),
            "staleness/dropped_groups": float(self.stale_dropped_groups),
            "staleness/dropped_responses": float(self.stale_dropped_responses),
            **partial.summary([s for g in self.groups for s in g.samples], self.train_version),
        }


def staleness_bound(rollout_cfg) -> int:
    """Versions a trained-on response's oldest token may lag behind the policy: rollout.
    max_staleness, and at least 1 with partial rollouts (a carried response is one version
    old by construction; a response carried twice is two)."""
    return max(rollout_cfg.max_staleness, 1 if rollout_cfg.partial_rollouts else 0)


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
                         assembler: BatchAssembler, carried: list[CarriedGroup] | None = None,
                         train_version: int | None = None) -> RolloutResult:
    """Run generation rounds until `assembler` holds a full train batch (or the round limit).

    `engines` is an `EnginePool` (controller/engines.py); `scorer` has score(texts, refs).
    Generation seeds derive from (trainer.seed, step, round), so a resumed run regenerates
    exactly what the uninterrupted run would have. `carried`: the previous step's
    `RolloutResult.carried` (partial rollouts). `train_version`: the weight version of the
    policy that will train on the result (default: the engines' current one, as in the
    synchronous loop); staleness is measured against it.
    """
    a, r = cfg.algo, cfg.rollout
    if train_version is None:
        train_version = getattr(engines, "weight_version", None)
    bound = staleness_bound(r)
    if train_version is None or not (r.partial_rollouts or r.max_staleness):
        bound = None  # the synchronous loop: every sample is at the policy's version
    t_gen = t_rew = 0.0
    timeouts = finished = stale_groups = stale_responses = 0
    produced_before = engines.produced
    carry_out: list[CarriedGroup] = []
    carry_in = []
    for c in carried or []:
        if bound is not None and partial.stale([s for s in c.samples if s.token_ids], train_version, bound):
            stale_groups += 1
            stale_responses += sum(1 for s in c.samples if s.token_ids)
        else:
            carry_in.append(c)
    round_idx = 0
    while not assembler.done:
        # The first round continues the carried groups, then fills up with fresh prompts.
        carry_round, carry_in = carry_in, []
        fresh = max(0, assembler.round_size(r.gen_batch_size) - len(carry_round))
        examples: list[PromptExample] = sampler.next_batch(fresh) if fresh else []
        seed = _round_seed(cfg.trainer.seed, step, round_idx)
        params = sampling_params(cfg, n=a.group_size, seed=seed, stop_ids=tokenizer.stop_ids)
        ready = [c for c in carry_round if c.complete]  # finished last step, never scored
        resumed = [c for c in carry_round if not c.complete]
        payloads = [c.payload for c in resumed] + examples
        prompt_ids = [c.prompt_ids for c in resumed] + [tokenizer.encode_prompt(ex.messages) for ex in examples]
        resume = [partial.resume_requests(c) for c in resumed] + [None] * len(examples)
        needed = assembler.groups_needed
        kept_this_round = 0
        round_groups: list[Group] = []
        consumed: set[int] = set()

        def take(items) -> bool:
            """Score (payload, prompt ids, samples) items into the round; True once full."""
            nonlocal t_rew, timeouts, kept_this_round, stale_groups, stale_responses
            fresh_items = []
            for item in items:
                if bound is not None and partial.stale(item[2], train_version, bound):
                    stale_groups += 1
                    stale_responses += len(item[2])
                else:
                    fresh_items.append(item)
            if not fresh_items:
                return False
            groups, secs, n_timeouts = score_groups(*zip(*fresh_items), tokenizer, scorer)
            t_rew += secs
            timeouts += n_timeouts
            for g in groups:
                group = Group(payload=g, rewards=torch.tensor(g.scores), correct=torch.tensor(g.correct))
                round_groups.append(group)
                kept_this_round += int(group.has_signal or not a.dynamic_sampling)
            return kept_this_round >= needed

        full = take([(c.payload, c.prompt_ids, c.samples) for c in ready])
        aborted = False
        if not full and prompt_ids:
            t0 = time.perf_counter()
            stream = engines.generate_streaming(prompt_ids, params, tag=f"s{step}r{round_idx}",
                                                **({"resume": resume} if resumed else {}))
            for chunk, samples in stream:
                t_gen += time.perf_counter() - t0
                items = []
                for i, got in zip(chunk, samples):
                    consumed.add(i)
                    if i < len(resumed):
                        finished += len(got)
                        got = partial.stitch(resumed[i].samples, got)
                    items.append((payloads[i], prompt_ids[i], got))
                if take(items):
                    engines.abort_all()  # the batch is full: stop the chunks still in flight
                    aborted = True
                    break
                t0 = time.perf_counter()
        if r.partial_rollouts:
            left = {g.prompt_index: g for g in engines.take_leftovers()} if aborted else {}
            for i in range(len(prompt_ids)):
                if i in consumed:
                    continue
                if i < len(resumed):
                    c = resumed[i]
                    if i in left:  # continued part-way (or finished, unscored)
                        c = dataclasses.replace(c, samples=partial.stitch(c.samples, left[i].samples))
                    carry_out.append(c)  # else never started: carried as it was
                elif i in left:
                    carry_out.append(CarriedGroup(payloads[i], prompt_ids[i], left[i].samples, seed,
                                                  left[i].request_id))
        assembler.add_round(round_groups)
        round_idx += 1
    carry_out += carry_in  # a round limit of 0 rounds never reached them
    batch = assembler.take()
    # Complete here: every round was either exhausted or aborted with wait.
    generated = engines.produced - produced_before
    return RolloutResult(
        groups=[g.payload for g in batch.groups], stats=batch.stats,
        seconds_generate=t_gen, seconds_reward=t_rew, generated=generated, reward_timeouts=timeouts,
        carried=carry_out, finished_partials=finished, stale_dropped_groups=stale_groups,
        stale_dropped_responses=stale_responses, train_version=train_version or 0,
    )


def _round_seed(seed: int, step: int, round_idx: int) -> int:
    return (seed * 1_000_003 + step * 1009 + round_idx) % (2**31 - 1)
