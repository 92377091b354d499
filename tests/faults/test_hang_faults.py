"""Frozen actors in each phase: generate, sync (tests/controller/test_sync_phases.py) and train.

A frozen actor (SIGSTOP: the process exists, Ray sees it alive, it never answers) is the
fault a duration timeout gets wrong both ways: a long call is not a hang, and without a
timeout a frozen actor stalls the run forever. The watchdog (dapo_megatron/watchdog.py)
tells them apart by pinging the busy actor:
- a busy actor that answers its pings is waited for, however long the call takes;
- an engine frozen during generate is replaced and its chunk keeps its place, so the round
  yields exactly the groups of an uninterrupted round;
- a policy rank frozen in a call ends the run with an error naming the rank.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from dapo_megatron.controller.engines import EnginePool
from dapo_megatron.rollout.embedded import EmbeddedEngine, build_hf_model
from dapo_megatron.rollout.protocol import SamplingParams
from dapo_megatron.watchdog import ActorHung, get_watching
from tests.controller.test_engines import StateDictSource, _cfg, ray_local  # noqa: F401 - fixture


class _Sleeper:
    def work(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()


def _sleeper():
    import ray

    return ray.remote(_Sleeper).options(num_cpus=0, max_concurrency=2).remote()


@pytest.fixture
def quick_patience(monkeypatch):
    """Frozen actors are named after 5 s of silence instead of 30 (the tests freeze them
    for certain; the busy-actor case keeps the real patience)."""
    from dapo_megatron import watchdog

    monkeypatch.setattr(watchdog, "MIN_PATIENCE_S", 5.0)


def test_busy_actor_is_waited_for_frozen_one_is_named(ray_local, monkeypatch):  # noqa: F811
    import ray

    from dapo_megatron import watchdog

    busy, frozen = _sleeper(), _sleeper()
    try:
        # 3 s of work against a 0.5 s hang timeout: pinged six times, answered each time.
        assert get_watching([busy.work.remote(3.0)], [busy], ping="ping", hang_timeout_s=0.5, what="work()") == [3.0]
        monkeypatch.setattr(watchdog, "MIN_PATIENCE_S", 5.0)
        os.kill(ray.get(frozen.pid.remote()), signal.SIGSTOP)
        refs = [busy.work.remote(0.1), frozen.work.remote(0.1)]
        t0 = time.monotonic()
        with pytest.raises(ActorHung, match=r"work\(\): sleeper B .*frozen") as info:
            get_watching(refs, [busy, frozen], ping="ping", hang_timeout_s=1.0, what="work()",
                         names=["sleeper A", "sleeper B"])
        assert info.value.index == 1
        assert time.monotonic() - t0 < 30.0  # one hang timeout plus one ping's patience (5 s)
    finally:
        for actor in (busy, frozen):
            ray.kill(actor)


def test_engine_frozen_during_generate_is_replaced_and_its_chunk_keeps_its_place(ray_local, quick_patience):  # noqa: F811
    import ray

    cfg = _cfg()
    cfg.rollout.num_engines = 2
    cfg.rollout.hang_timeout_s = 2.0
    hf = cfg.model.hf_config_dict(vocab_size=64)
    torch.manual_seed(0)
    model = build_hf_model(hf)
    pool = EnginePool(cfg, hf, weight_source=StateDictSource(model))
    try:
        pool.sync_weights(1)
        params = SamplingParams(n=2, max_new_tokens=8, seed=11)
        prompts = [[1 + i, 2 + i, 3] for i in range(8)]
        reference = EmbeddedEngine(model=model).generate(prompts, params, [f"g-{i}" for i in range(8)])
        victim = ray.get(pool.engines[0].__ray_call__.remote(lambda self: os.getpid()))
        os.kill(victim, signal.SIGSTOP)  # frozen before its first chunk: the call never returns
        got = {}
        for [i], [samples] in pool.generate_streaming(prompts, params, tag="g"):
            got[i] = [s.token_ids for s in samples]
        assert pool.restarts == 1
        assert sorted(got) == list(range(8))
        assert [got[i] for i in range(8)] == [[s.token_ids for s in g] for g in reference]
        assert ray.get(pool.engines[0].get_weight_version.remote()) == 1  # re-synced replacement
    finally:
        pool.shutdown()


def test_policy_rank_frozen_in_a_call_ends_the_run_naming_it(ray_local, quick_patience):  # noqa: F811
    import ray

    from dapo_megatron.controller.policy_group import PolicyGroup, PolicyHung

    cfg = _cfg()
    cfg.trainer.device = "cpu"
    cfg.trainer.hang_timeout_s = 2.0
    policy = PolicyGroup(cfg, cfg.model.hf_config_dict(vocab_size=64))
    try:
        policy.onload()  # a live rank: the call returns
        pid = ray.get(policy.workers[0].__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(PolicyHung, match=r"policy onload\(\): policy rank 0 .*frozen.*rerun the same command"):
            policy.onload()
        assert time.monotonic() - t0 < 40.0
    finally:
        policy.shutdown()  # ray.kill ends a stopped process too
