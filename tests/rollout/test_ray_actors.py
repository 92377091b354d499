"""Engines behind Ray: the embedded actor, abort into a busy actor, the manager over actor
handles, and an SGLang actor whose (fake) server dies being replaced."""

import os
import sys
import threading
import time

import pytest
import torch

from dapo_megatron.rollout.embedded import EmbeddedEngine, create_embedded_actor
from dapo_megatron.rollout.manager import RolloutManager
from dapo_megatron.rollout.protocol import SamplingParams
from dapo_megatron.rollout.sglang_api import SGLangConfig
from dapo_megatron.rollout.sglang_engine import create_sglang_actor
from tests.rollout.reference import tiny_config
from tests.rollout.test_sglang_engine import FAKE, needs_sglang, expected_for

ray = pytest.importorskip("ray")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [[4, 5, 6], [7], [8, 9]]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_embedded_actor_matches_in_process_engine_and_aborts(ray_local):
    hf = tiny_config().to_dict()
    torch.manual_seed(0)
    local = EmbeddedEngine(tiny_config())
    # One actor keeps the test fast; test_manager.py covers several engines in-process.
    actors = [create_embedded_actor(hf, num_cpus=0.25, num_threads=1)]
    try:
        manager = RolloutManager(actors)
        ray.get([a.update_weights.remote(local.state_dict_buckets(), 6) for a in actors])
        assert ray.get([a.get_weight_version.remote() for a in actors]) == [6]
        params = SamplingParams(n=2, max_new_tokens=7, seed=9)
        reference = local.generate(PROMPTS, params, [f"k-{i}" for i in range(3)])
        got = {g.prompt_index: g.samples for g in manager.submit(PROMPTS, params, tag="k",
                                                                 prompts_per_call=1)}
        for i in range(3):
            assert [s.token_ids for s in got[i]] == [s.token_ids for s in reference[i]]
            assert all(s.weight_version == 6 for s in got[i])

        # abort() reaches an actor that is busy generating (max_concurrency=2).
        ref = actors[0].generate.remote(PROMPTS, SamplingParams(max_new_tokens=10**6), ["z0", "z1", "z2"])
        time.sleep(1.0)
        ray.get(actors[0].abort.remote(["z0", "z1", "z2"]), timeout=30)
        out = ray.get(ref, timeout=60)
        assert all(s.finish_reason == "abort" for g in out for s in g)
    finally:
        for a in actors:
            ray.kill(a)


@needs_sglang
def test_sglang_actor_exits_on_server_death_and_manager_replaces_it(ray_local, tmp_path):
    log = tmp_path / "events.jsonl"

    def make(index):
        cfg = SGLangConfig(max_restarts=2, startup_timeout_s=60, request_timeout_s=60,
                           launch_cmd=(sys.executable, FAKE, "--port", "{port}", "--log", str(log),
                                       "--die-marker", str(tmp_path / "die")))
        return create_sglang_actor(cfg, {"tie_word_embeddings": False}, num_cpus=0.25)

    manager = RolloutManager([make(0)], factory=make, max_restarts=1,
                             on_replace=lambda e: ray.get(e.update_weights.remote([[("w", torch.ones(2))]], 3)))
    try:
        for e in manager.engines:
            ray.get(e.update_weights.remote([[("w", torch.ones(2))]], 3))
        (tmp_path / "die").write_text("x")
        params = SamplingParams(n=2, max_new_tokens=4, seed=5)
        # Synced weights cannot be restored inside the actor: it exits, the manager
        # replaces it, re-syncs version 3 and retries the chunk.
        got = {g.prompt_index: g for g in manager.submit(PROMPTS, params, tag="s")}
        assert manager.restarts == 1
        expected = expected_for(PROMPTS, params, [f"s-{i}" for i in range(3)], 3)
        assert [[s.token_ids for s in got[i].samples] for i in range(3)] == expected
    finally:
        manager.shutdown()
