"""Finding 11: a worker crash costs no item its score, crashes are counted, and a huge
reference answer is refused without reaching (and timing out) a worker."""

from __future__ import annotations

import time

from dapo_megatron.reward import RewardPool, compute_score
from dapo_megatron.reward.score import MAX_REFERENCE_CHARS
from tests.reward.scorers import CRASH_ONCE, crash_once


def test_a_transient_crash_is_retried_and_scores_like_no_crash(tmp_path):
    marker = tmp_path / "crashed-once"
    responses = ["Answer: 1", f"{CRASH_ONCE}{marker}|Answer: 7", "Answer: 2", "Answer: 5"]
    refs = ["1", "7", "2", "4"]
    # In-process scores of the same texts: what an uninterrupted scorer gives.
    expected = [compute_score(r.split("|")[-1], g) for r, g in zip(responses, refs)]
    with RewardPool(num_workers=1, timeout_s=5.0, score_fn=crash_once) as pool:
        results = pool.score(responses, refs)
        assert marker.exists()  # the worker really died on that item
        assert results == expected
        assert results[1].correct and results[1].reason is None
        assert pool.crashes == 1 and pool.stats()["crashes"] == 1 and pool.workers_replaced == 1


def test_a_huge_reference_is_refused_without_a_timeout():
    huge = "1" * (10 * 2**20)  # 10 MB: parsing it would time out every response
    with RewardPool(num_workers=1, timeout_s=2.0) as pool:
        t0 = time.perf_counter()
        results = pool.score(["Answer: 1", "Answer: 1", "Answer: 3"], [huge, huge, "3"])
        elapsed = time.perf_counter() - t0
    assert [r.score for r in results] == [-1.0, -1.0, 1.0]
    assert results[0].reason == f"reference answer too long ({len(huge)} chars > {MAX_REFERENCE_CHARS})"
    assert pool.timeouts == 0 and pool.oversized_references == 2
    assert elapsed < 2.0 + 10.0  # no item waited for its timeout (sympy preload aside)
    assert compute_score("Answer: 1", huge).reason.startswith("reference answer too long")


def test_worker_crashes_are_in_the_step_metrics(tmp_path, monkeypatch):
    """The loop's step metrics carry the crashes of that step's scoring (a stand-in rollout
    phase scores one crashing item through the real pool)."""
    import types

    from dapo_megatron.algo.sampling import SamplingStats
    from dapo_megatron.config import load_config
    from dapo_megatron.controller import loop
    from dapo_megatron.controller.rollout_phase import RolloutResult
    from dapo_megatron.rollout.manager import GenerationCount

    def rollout(*, scorer, **_):
        scorer.score([f"{CRASH_ONCE}{tmp_path / 'm'}|Answer: 1", "Answer: 2"], ["1", "2"])
        return RolloutResult(groups=[], stats=SamplingStats(rounds=1), seconds_generate=0.0,
                             seconds_reward=0.0, generated=GenerationCount(), reward_timeouts=0)

    monkeypatch.setattr(loop, "collect_train_groups", rollout)
    trainer = object.__new__(loop.Trainer)
    trainer.cfg = load_config("examples/tiny_cpu.yaml", ["eval.every=0"])
    trainer.step, trainer.generated_samples, trainer.generated_tokens = 1, 0, 0
    trainer.engines = types.SimpleNamespace(restarts=0)
    trainer.sampler = trainer.assembler = trainer.task = types.SimpleNamespace(tokenizer=None)
    trainer.carried, trainer._prefetched, trainer._background = [], None, None  # no partials, no overlap
    with RewardPool(num_workers=1, timeout_s=5.0, score_fn=crash_once) as trainer.scorer:
        first = trainer.train_step()
        second = trainer.train_step()  # the marker exists now: no crash
    assert first["reward/worker_crashes"] == 1.0
    assert second["reward/worker_crashes"] == 0.0
