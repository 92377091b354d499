"""Partial rollouts, several calls per engine, and request-granular aborts.

- A response stopped part-way and continued (protocol.Resume) equals the response that was
  never interrupted, at the same weights: exactly on the scripted engine (through a real
  abort of a `RolloutRound` and its leftovers), and on the embedded engine with the same
  tokens and the same log-probs up to fp32 reassociation (a prefill of prompt + prefix
  against step-by-step decoding with a KV cache).
- Several generate calls in flight per engine keep the groups in prompt order and the
  count equal to what the engines produced.
- Once a round is aborted, its requests stop within one decode step, and calls still
  queued behind the engine's lock never run a forward pass.
"""

import dataclasses
import threading

import pytest
import torch

from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.manager import GenerationCount, RolloutManager
from dapo_megatron.rollout.partial import CarriedGroup, resume_requests, stale, staleness, stitch
from dapo_megatron.rollout.protocol import Resume, Sample, SamplingParams
from tests.rollout.reference import tiny_config
from tests.rollout.scripted import ScriptedEngine, scripted_logprob

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 8, 9, 10], [11], [3, 3, 3, 3]]


def _script(prompt, stream_id, j):
    # Lengths differ by prompt and sample; the tokens depend on the stream id, so a
    # continuation keyed by another id would come out different.
    n = 20 + 7 * (sum(prompt) % 5) + 3 * j
    base = sum(map(ord, stream_id)) % 50
    return [(base + 11 * t + j) % 97 for t in range(n)]


# ---------------------------------------------------------------- the scripted engine

def test_scripted_continuation_equals_uninterrupted_run():
    params = SamplingParams(n=3, max_new_tokens=1000, seed=0)
    reference_engine = ScriptedEngine(_script, step_s=0.0)
    reference = reference_engine.generate(PROMPTS, params, [f"a-{i}" for i in range(4)])

    engine = ScriptedEngine(_script, step_s=0.002)
    manager = RolloutManager([engine])
    first = manager.submit(PROMPTS, params, "a", prompts_per_call=2)
    it = iter(first)
    got = next(it)  # prompt 0 (its chunk finished); prompt 2's chunk is still generating
    first.abort(wait=True)
    left = first.leftovers()
    assert got.prompt_index == 0
    # Prompt 1 was complete but never yielded (the caller stopped after prompt 0): carried
    # whole; prompts 2 and 3 were stopped part-way.
    assert [g.prompt_index for g in left] == [1, 2, 3]
    assert all(s.finish_reason == "stop" for s in left[0].samples)
    partial = left[1:]
    assert all(s.finish_reason == "abort" and 0 < len(s.token_ids) < len(_script(PROMPTS[g.prompt_index], g.request_id, s.sample_index))
               for g in partial for s in g.samples)
    carried = [CarriedGroup(None, PROMPTS[g.prompt_index], g.samples, params.seed, g.request_id) for g in partial]

    second = manager.submit([c.prompt_ids for c in carried], params, "b", prompts_per_call=1,
                            resume=[resume_requests(c) for c in carried])
    groups = list(second)
    assert [g.prompt_index for g in groups] == [0, 1]
    for c, g in zip(carried, groups):
        done = stitch(c.samples, g.samples)
        ref = reference[PROMPTS.index(c.prompt_ids)]
        assert [s.token_ids for s in done] == [s.token_ids for s in ref]
        assert [s.logprobs for s in done] == [s.logprobs for s in ref]
        assert [s.finish_reason for s in done] == ["stop"] * 3
        assert all(s.token_versions == [0] * len(s.token_ids) for s in done)
    # Counting: a continued response is not a new one; its new tokens are.
    assert manager.produced == GenerationCount(
        responses=engine.responses, tokens=engine.tokens, aborted=engine.aborted,
        aborted_tokens=sum(len(s.token_ids) for g in partial for s in g.samples),
        continued=engine.continued)
    assert engine.continued == 6 and manager.produced.tokens == engine.tokens


def test_continuation_under_new_weights_keeps_each_tokens_version_and_logprob():
    params = SamplingParams(n=2, max_new_tokens=1000, seed=0)
    engine = ScriptedEngine(_script, step_s=0.0)
    full = engine.generate(PROMPTS[:1], params, ["x-0"])[0]
    cut = [dataclasses.replace(s, token_ids=s.token_ids[:5], logprobs=s.logprobs[:5], finish_reason="abort")
           for s in full]
    engine.weight_version = 3
    group = CarriedGroup(None, PROMPTS[0], cut, 0, "x-0")
    cont = engine.generate(PROMPTS[:1], params, ["y-0"], [resume_requests(group)])[0]
    done = stitch(cut, cont)
    for s, ref in zip(done, full):
        assert s.token_ids == ref.token_ids  # the script does not depend on the weights
        n = len(s.token_ids)
        assert s.token_versions == [0] * 5 + [3] * (n - 5)
        assert s.logprobs == [scripted_logprob(t, s.sample_index, 0 if t < 5 else 3) for t in range(n)]
        assert s.weight_version == 3 and s.request_id == "x-0"
    assert staleness(done, train_version=4) == [4, 4]
    assert stale(done, 4, bound=3) and not stale(done, 4, bound=4)


def test_several_calls_per_engine_keep_prompt_order_and_count():
    params = SamplingParams(n=2, max_new_tokens=1000, seed=0)
    engines = [ScriptedEngine(_script, step_s=0.001) for _ in range(2)]
    manager = RolloutManager(engines, calls_per_engine=3)
    prompts = [[i % 7 + 1, i % 5 + 2] for i in range(24)]
    groups = list(manager.submit(prompts, params, "c"))
    assert [g.prompt_index for g in groups] == list(range(24))
    assert max(e.max_concurrent for e in engines) == 3
    for g in groups:
        assert [s.token_ids for s in g.samples] == [_script(prompts[g.prompt_index], g.request_id, j) for j in range(2)]
    assert manager.produced.responses == sum(e.responses for e in engines) == 48
    assert manager.produced.tokens == sum(e.tokens for e in engines)


def test_an_engine_dying_with_several_calls_in_flight_is_replaced_once():
    params = SamplingParams(n=2, max_new_tokens=1000, seed=0)
    prompts = [[i % 7 + 1, i % 5 + 2] for i in range(12)]
    reference = list(RolloutManager([ScriptedEngine(_script, step_s=0.0)]).submit(prompts, params, "d"))
    made = [ScriptedEngine(_script, step_s=0.002)]

    def factory(index):
        made.append(ScriptedEngine(_script, step_s=0.002))
        return made[-1]

    manager = RolloutManager([made[0]], factory=factory, calls_per_engine=3)
    round_ = manager.submit(prompts, params, "d", prompts_per_call=2)
    while made[0].running < 3:
        threading.Event().wait(0.001)
    made[0]._dead = True  # dies with three calls in flight
    got = list(round_)
    # The three calls failed together; one replacement, their chunks retried in order.
    assert manager.restarts == 1 and len(made) == 2
    assert [g.prompt_index for g in got] == list(range(12))
    assert [[s.token_ids for s in g.samples] for g in got] == [[s.token_ids for s in g.samples] for g in reference]


# ---------------------------------------------------------------- the embedded engine

def _engine(**kw):
    torch.manual_seed(0)
    return EmbeddedEngine(tiny_config("llama"), **kw)


@pytest.mark.parametrize("cuts", [[1, 7, 15], [0, 12, 3]])
def test_embedded_continuation_equals_uninterrupted_response(cuts):
    # Token t of a sample takes the t-th uniform of its (seed, request id, j) stream, so a
    # response cut after k tokens and continued from them, at the same weights, draws the
    # same tokens; its log-probs come from a prefill of prompt + prefix instead of decode
    # steps, equal up to fp32 rounding.
    engine = _engine(max_batch_size=8)
    params = SamplingParams(n=3, max_new_tokens=24, seed=11, temperature=1.3)
    reference = engine.generate(PROMPTS[:2], params, ["r-0", "r-1"])
    group = [dataclasses.replace(s, token_ids=s.token_ids[:k], logprobs=s.logprobs[:k], finish_reason="abort")
             for s, k in zip(reference[1], cuts)]
    carried = CarriedGroup(None, PROMPTS[1], group, params.seed, "r-1")
    # Continued in another call, next to a fresh prompt, under other request ids.
    out = engine.generate([PROMPTS[0], PROMPTS[1]], params, ["other", "new-1"], [None, resume_requests(carried)])
    assert [s.sample_index for s in out[1]] == [0, 1, 2]
    done = stitch(group, out[1])
    for s, ref, k in zip(done, reference[1], cuts):
        assert s.token_ids == ref.token_ids
        assert s.finish_reason == ref.finish_reason
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)
        assert s.logprobs[:k] == ref.logprobs[:k]
    # The fresh prompt of that call is its own stream, not "r-0"'s.
    assert [s.token_ids for s in out[0]] != [s.token_ids for s in reference[0]]


def test_embedded_continuation_with_a_full_prefix_is_finished_by_length():
    engine = _engine()
    params = SamplingParams(n=1, max_new_tokens=6, seed=1)
    ref = engine.generate(PROMPTS[:1], params, ["q"])[0][0]
    out = engine.generate(PROMPTS[:1], params, ["q2"], [[Resume(0, tuple(ref.token_ids), 1, "q")]])[0][0]
    assert out.finish_reason == "length" and out.token_ids == []


# ---------------------------------------------------------------- request-granular aborts

def test_round_abort_stops_requests_within_one_decode_step():
    """Issue 25: once the batch is full, in-flight requests stop within one decode step
    instead of finishing their call; the calls queued behind them never start a forward."""
    engine = _engine(max_batch_size=64)
    forwards, at_abort = [], []
    # The final norm runs once per sampling step, in either decoding path of the engine.
    engine.model.model.norm.register_forward_pre_hook(lambda *_: forwards.append(1))
    params = SamplingParams(n=2, max_new_tokens=100, seed=0)  # no stop token: 100-token calls
    manager = RolloutManager([engine], calls_per_engine=2)
    prompts = [PROMPTS[i % 4] for i in range(8)]
    round_ = manager.submit(prompts, params, "g", prompts_per_call=2)
    it = iter(round_)
    first = next(it)  # chunk 0 done: chunk 1 is decoding, chunk 2 waits for the engine
    assert len(first.samples[0].token_ids) == 100
    done_before = len(forwards)
    # Let chunk 1 get going, then abort from this thread as the controller does.
    while len(forwards) < done_before + 5:
        threading.Event().wait(0.001)
    at_abort.append(len(forwards))
    round_.abort(wait=True)
    after = len(forwards) - at_abort[0]
    assert after <= 1, f"{after} forward passes ran after the abort"
    left = round_.leftovers()
    # Prompt 1 (rest of chunk 0) complete; of chunks 1 and 2 (one call each, in flight
    # together), the one that got the engine stopped part-way, the other ran no forward.
    by_prompt = {g.prompt_index: g for g in left}
    assert all(s.finish_reason == "length" for s in by_prompt[1].samples)
    started = [c for c in ((2, 3), (4, 5)) if any(s.token_ids for i in c for s in by_prompt[i].samples)]
    assert len(started) == 1
    for c in ((2, 3), (4, 5)):
        for i in c:
            assert all(s.finish_reason == "abort" for s in by_prompt[i].samples)
            assert all((0 < len(s.token_ids) < 100) == (c in started) for s in by_prompt[i].samples)
    assert not {6, 7} & set(by_prompt)  # never taken
    # The count holds every token the engine drew, the aborted ones included.
    drawn = sum(len(s.token_ids) for g in [first] + left for s in g.samples)
    assert round_.produced.tokens == drawn
    assert round_.produced.aborted == 4


def test_stitch_refuses_continuing_a_finished_sample():
    s = Sample([1, 2], [-1.0, -1.0], "stop", 0, "r", 0)
    with pytest.raises(ValueError, match="only aborted"):
        stitch([s], [Sample([3], [-1.0], "stop", 0, "r2", 0)])
