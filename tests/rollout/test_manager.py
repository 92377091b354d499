"""RolloutManager over in-process engines: dispatch, streaming, abort, dead-engine retry,
groups in prompt order, and the count of everything the engines generated."""

import sys
import time

import pytest
import torch

from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.manager import RolloutManager
from dapo_megatron.rollout.protocol import SamplingParams
from dapo_megatron.rollout.sglang_api import SGLangConfig
from dapo_megatron.rollout.sglang_engine import SGLangEngine
from tests.rollout.reference import tiny_config
from tests.rollout.scripted import ScriptedEngine
from tests.rollout.test_sglang_engine import FAKE, expected_for, needs_sglang, read_log

PROMPTS = [[1 + i, 2, 3 + (i % 3)] for i in range(10)]


def engine(seed=0, **kwargs):
    torch.manual_seed(seed)
    return EmbeddedEngine(tiny_config(), **kwargs)


def test_round_equals_single_engine_generation():
    params = SamplingParams(n=3, max_new_tokens=8, seed=4)
    reference = engine().generate(PROMPTS, params, [f"t-{i}" for i in range(len(PROMPTS))])
    manager = RolloutManager([engine(), engine(), engine()])
    round_ = manager.submit(PROMPTS, params, tag="t", prompts_per_call=3)
    got = {g.prompt_index: g for g in round_}
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, group in got.items():
        assert group.request_id == f"t-{i}"
        assert [s.token_ids for s in group.samples] == [s.token_ids for s in reference[i]]
        for got_s, ref_s in zip(group.samples, reference[i]):
            assert got_s.logprobs == pytest.approx(ref_s.logprobs, abs=1e-5)


def test_stream_then_abort_stops_inflight_and_pending_chunks():
    manager = RolloutManager([engine(), engine()])
    endless = SamplingParams(n=2, max_new_tokens=100000, seed=1)
    round_ = manager.submit(PROMPTS, endless, tag="a", prompts_per_call=2)
    time.sleep(0.5)
    start = time.perf_counter()
    round_.abort()  # both engines hold a chunk that would run for minutes; three are pending
    assert time.perf_counter() - start < 20
    assert list(round_) == []
    # The engines are free again and serve the next round completely.
    short = SamplingParams(n=2, max_new_tokens=4, seed=1)
    got = list(manager.submit(PROMPTS, short, tag="b"))
    assert sorted(g.prompt_index for g in got) == list(range(len(PROMPTS)))


def test_consumer_can_stop_early_while_others_generate():
    manager = RolloutManager([engine(), engine()])
    params = SamplingParams(n=2, max_new_tokens=6, seed=2)
    round_ = manager.submit(PROMPTS, params, tag="c", prompts_per_call=1)
    taken = []
    for group in round_:
        taken.append(group)
        if len(taken) == 3:
            round_.abort()
            break
    assert len(taken) == 3 and all(len(g.samples) == 2 for g in taken)


@needs_sglang
def test_dead_sglang_server_is_replaced_and_chunk_retried(tmp_path):
    log = tmp_path / "events.jsonl"

    def make(index):
        cfg = SGLangConfig(max_restarts=0, startup_timeout_s=60, request_timeout_s=60,
                           launch_cmd=(sys.executable, FAKE, "--port", "{port}", "--log", str(log),
                                       "--die-marker", str(tmp_path / f"die{index}")))
        return SGLangEngine(cfg)

    weights = [[("w", torch.ones(3))]]
    manager = RolloutManager([make(0), make(1)], factory=make, max_restarts=1,
                             on_replace=lambda e: e.update_weights(weights, 4))
    try:
        for e in manager.engines:
            e.update_weights(weights, 4)
        (tmp_path / "die1").write_text("x")  # engine 1's server exits on its next request
        params = SamplingParams(n=2, max_new_tokens=5, seed=3)
        got = {g.prompt_index: g for g in manager.submit(PROMPTS, params, tag="d", prompts_per_call=2)}
        assert manager.restarts == 1 and sorted(got) == list(range(len(PROMPTS)))
        expected = expected_for(PROMPTS, params, [f"d-{i}" for i in range(len(PROMPTS))], 4)
        assert [[s.token_ids for s in got[i].samples] for i in range(len(PROMPTS))] == expected
        syncs = [e for e in read_log(log) if e["path"] == "/update_weights_from_tensor"]
        assert len(syncs) == 3  # two engines, then the replacement got version 4 too
        assert all(s.weight_version == 4 for g in got.values() for s in g.samples)
        # A second death exceeds max_restarts: the error reaches the caller.
        (tmp_path / "die0").write_text("x")
        (tmp_path / "die1").write_text("x")
        with pytest.raises(RuntimeError, match="cannot be replaced"):
            list(manager.submit(PROMPTS, params, tag="e"))
    finally:
        manager.shutdown()


def test_real_errors_are_not_retried():
    manager = RolloutManager([engine()], factory=lambda i: engine(), max_restarts=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(manager.submit([[1], [10**6]], SamplingParams(max_new_tokens=2), tag="x"))
    assert manager.restarts == 0


# ---------------------------------------------------------------- order and counting


def _script(prompt, rid, j):
    """Sample j of a prompt: 3 + j + prompt[0] % 4 tokens derived from the prompt."""
    return [(prompt[0] * 7 + j + t) % 50 + 1 for t in range(3 + j + prompt[0] % 4)]


def _round_order(manager, params, tag="o"):
    groups = list(manager.submit(PROMPTS, params, tag=tag, prompts_per_call=2))
    return [g.prompt_index for g in groups], {g.prompt_index: [s.token_ids for s in g.samples] for g in groups}


def test_replaced_engine_chunk_keeps_its_place():
    # Issue 23, finding 12: the chunk of an engine that died used to be re-queued behind
    # the others, so a consumer taking the first groups of a round took different ones.
    params = SamplingParams(n=2, max_new_tokens=64, seed=0)
    reference_order, reference = _round_order(RolloutManager([ScriptedEngine(_script)]), params)
    assert reference_order == list(range(len(PROMPTS)))
    made = []

    def factory(index):
        made.append(ScriptedEngine(_script))
        return made[-1]

    dying = ScriptedEngine(_script, die_on_call=2)  # dies on chunk 1 (prompts 2, 3)
    manager = RolloutManager([dying], factory=factory, max_restarts=1)
    order, got = _round_order(manager, params)
    assert manager.restarts == 1 and dying.calls[1] == ["o-2", "o-3"]
    assert made[0].calls[0] == ["o-2", "o-3"]  # retried first, before chunk 2
    assert order == reference_order and got == reference


def test_groups_arrive_in_prompt_order_whatever_the_engine_speed():
    params = SamplingParams(n=2, max_new_tokens=64, seed=0)
    slow, fast = ScriptedEngine(_script, step_s=0.05), ScriptedEngine(_script, step_s=0.0)
    order, _ = _round_order(RolloutManager([slow, fast]), params)
    assert order == list(range(len(PROMPTS)))
    assert len(fast.calls) > len(slow.calls)  # the fast engine did run ahead


def test_produced_counts_every_returned_sample_including_aborted_and_unread():
    # Prompts 0..3 answer in a few steps; 4..9 would run for 2000 steps, and are aborted.
    def script(prompt, rid, j):
        return [5] * (2000 if int(rid.split("-")[1]) >= 4 else 3 + j)

    engines = [ScriptedEngine(script, step_s=0.002), ScriptedEngine(script, step_s=0.002)]
    manager = RolloutManager(engines)
    round_ = manager.submit(PROMPTS, SamplingParams(n=2, max_new_tokens=4000), tag="c", prompts_per_call=2)
    first = next(iter(round_))  # chunk 0's first group; its second group is never read
    round_.abort()
    assert first.prompt_index == 0
    assert sum(e.aborted for e in engines) > 0  # a long chunk was stopped part-way
    produced = manager.produced
    assert produced.responses == sum(e.responses for e in engines) == round_.produced.responses
    assert produced.tokens == sum(e.tokens for e in engines)
    assert produced.aborted == sum(e.aborted for e in engines)
    assert produced.responses > 2  # more than the one group read
