"""The colocated memory phases of a step, in order, and an engine that dies mid-sync.

- A recording engine and a recording policy show the loop's order: engines release memory,
  the policy onloads, trains (its ranks compute pi_old), offloads (when configured), engines resume
  their weight memory, each engine's weight-update session receives the policy's push,
  engines resume their KV cache.
- An engine actor killed in the middle of a sync is replaced and the whole pool is synced
  again from the source (no cached copy anywhere): afterwards every engine holds the
  source's weights and samples exactly as an engine loaded directly with them.
"""

import pytest
import torch

from dapo_megatron.config import load_config
from dapo_megatron.controller import loop
from dapo_megatron.controller.engines import EnginePool
from dapo_megatron.rollout.embedded import EmbeddedEngine, build_hf_model
from dapo_megatron.rollout.protocol import SamplingParams
from tests.controller.test_engines import StateDictSource, _cfg, ray_local  # noqa: F401 - fixture


class RecordingEngine:
    def __init__(self, log):
        self.log = log

    def __getattr__(self, name):
        if name in ("release_memory", "resume_memory", "begin_weight_update", "load_weight_bucket",
                    "end_weight_update"):
            return lambda *args: self.log.append(("engine", name, *[a for a in args if isinstance(a, (int, list))]))
        raise AttributeError(name)


class RecordingPolicy:
    def __init__(self, log):
        self.log = log

    def train(self, batch):
        self.log.append(("policy", "train"))
        return {"actor/loss": 0.0}

    def onload(self):
        self.log.append(("policy", "onload"))

    def offload(self):
        self.log.append(("policy", "offload"))

    def push_weights(self, engines, version):
        self.log.append(("policy", "push_weights", version))
        for e in engines:
            e.load_weight_bucket([("w", torch.zeros(1))])
        return {"bytes": 4.0, "seconds": 1.0}


class _Batch:
    num_response_tokens = 1
    advantages = torch.ones(2)  # a learning signal (no warning)
    loss_weights = torch.ones(2)


@pytest.mark.parametrize("offload", [True, False])
def test_step_runs_the_memory_phases_in_order(monkeypatch, offload):
    log = []
    cfg = _cfg()
    cfg.trainer.offload = offload
    monkeypatch.setattr(EnginePool, "_start_engine", lambda self, i: RecordingEngine(log))
    monkeypatch.setattr(loop, "build_rollout_batch", lambda groups, algo: _Batch())
    monkeypatch.setattr(loop, "batch_metrics", lambda batch: {})
    trainer = object.__new__(loop.Trainer)
    trainer.cfg, trainer.step = cfg, 7
    trainer.policy = RecordingPolicy(log)
    trainer.engines = EnginePool(cfg, {}, weight_source=trainer.policy)
    metrics = trainer._train_on(groups=[object()])
    expected = [
        ("engine", "release_memory"), ("policy", "onload"), ("policy", "train"),
        *([("policy", "offload")] if offload else []),
        ("engine", "resume_memory", ["weights"]), ("engine", "begin_weight_update", 7),
        ("policy", "push_weights", 7), ("engine", "load_weight_bucket", [("w", torch.zeros(1))]),
        ("engine", "end_weight_update"), ("engine", "resume_memory", ["kv_cache"]),
    ]
    assert [e[:2] for e in log] == [e[:2] for e in expected]
    assert log[4 if offload else 3] == ("engine", "resume_memory", ["weights"])
    assert log[-1] == ("engine", "resume_memory", ["kv_cache"])
    assert metrics["sync/bytes"] == 4.0 and trainer.engines.weight_version == 7


# A push to a frozen engine fails after this long, and a ping (watchdog.MIN_PATIENCE_S,
# patched in the test) names it frozen after 5 s: the tiny buckets of a live engine load in
# milliseconds, and the defaults (30 s each) made the freeze case take 106 s.
PUSH_TIMEOUT_S = 10.0


class FaultySource(StateDictSource):
    """Kills (or freezes with SIGSTOP) engine 0 after the first bucket of the first push."""

    def __init__(self, model, pool_ref, fault):
        super().__init__(model)
        self.pool_ref, self.fault = pool_ref, fault
        self.pushes = 0

    def push_weights(self, engines, version):
        import os
        import signal

        import ray

        from dapo_megatron.rollout.weight_sync import push_bucket_colocated

        self.pushes += 1
        for i in range(0, len(self.state), 4):
            push_bucket_colocated(engines, self.state[i:i + 4], "embedded", timeout=PUSH_TIMEOUT_S)
            if self.pushes == 1 and i == 0:
                victim = self.pool_ref[0].engines[0]
                if self.fault == "kill":
                    ray.kill(victim)
                else:
                    pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
                    os.kill(pid, signal.SIGSTOP)
        return {"bytes": 0.0, "seconds": 0.0}


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_engine_dead_or_hung_during_sync_is_replaced_and_synced_from_the_source(ray_local, fault,  # noqa: F811
                                                                               monkeypatch, caplog):
    import ray

    from dapo_megatron import watchdog

    monkeypatch.setattr(watchdog, "MIN_PATIENCE_S", 5.0)
    cfg = _cfg()
    cfg.rollout.num_engines = 2
    cfg.rollout.hang_timeout_s = PUSH_TIMEOUT_S
    hf = cfg.model.hf_config_dict(vocab_size=64)
    torch.manual_seed(0)
    model = build_hf_model(hf)
    holder = []
    pool = EnginePool(cfg, hf, weight_source=FaultySource(model, holder, fault))
    holder.append(pool)
    try:
        pool.sync_weights(5)
        assert pool.restarts == 1 and pool.weight_source.pushes == 2
        # A frozen engine is replaced as frozen: nobody waits for it to shut itself down.
        replaced = [r.getMessage() for r in caplog.records if "replacing it" in r.getMessage()]
        assert len(replaced) == 1
        assert ("ActorHung" in replaced[0] and "frozen" in replaced[0]) == (fault == "freeze")
        assert ray.get([e.get_weight_version.remote() for e in pool.engines]) == [5, 5]
        params = SamplingParams(n=2, max_new_tokens=6, seed=3)
        prompts = [[1, 2, 3], [4, 5, 6]]
        reference = EmbeddedEngine(model=model).generate(prompts, params, ["r-0", "r-1"])
        for engine in pool.engines:
            got = ray.get(engine.generate.remote(prompts, params, ["r-0", "r-1"]))
            assert [[s.token_ids for s in g] for g in got] == [[s.token_ids for s in g] for g in reference]
    finally:
        pool.shutdown()
