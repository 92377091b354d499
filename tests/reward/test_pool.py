"""RewardPool: same results as in-process scoring, hard per-item timeout, crash recovery."""

import os
import time

import pytest

from dapo_megatron.reward import BatchScorer, RewardPool, compute_score
from tests.reward.scorers import CRASH, HANG, hang_or_crash

MIXED = [
    ("work\nAnswer: 42", "42"), ("\\boxed{41}", "42"), ("Answer: \\frac{1}{2}", "0.5"),
    ("Answer: 2\\sqrt{3}", "\\sqrt{12}"), ("Answer: 3\\sqrt{2}", "2\\sqrt3"), ("no answer", "1"),
    ("Answer: (1,2)", "(1, 2)"), ("Answer: 9^9^9^9", "1"), ("Answer: 1{,}024", "2^{10}"),
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child that was reaped is gone; a zombie would still answer kill(0).
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_pool_matches_in_process_scoring():
    responses = [r for r, _ in MIXED] * 7
    gts = [g for _, g in MIXED] * 7
    expected = [compute_score(r, g) for r, g in zip(responses, gts)]
    with RewardPool(num_workers=2, timeout_s=5.0, chunk_size=4) as pool:
        assert pool.score(responses, gts) == expected
        assert pool.score([], []) == []
        assert pool.stats() == {"items_scored": len(responses), "timeouts": 0, "crashes": 0,
                                "workers_replaced": 0, "oversized_references": 0}
    assert BatchScorer is RewardPool


def test_timed_out_item_scores_minus_one_and_worker_is_replaced():
    responses = ["Answer: 1", HANG, "Answer: 2", "Answer: 3", HANG, "Answer: 4"]
    gts = ["1", "1", "2", "0", "1", "4"]
    with RewardPool(num_workers=2, timeout_s=1.0, chunk_size=8, score_fn=hang_or_crash) as pool:
        pool.start()
        first_pids = set(pool.worker_pids)
        t0 = time.perf_counter()
        results = pool.score(responses, gts)
        elapsed = time.perf_counter() - t0
        assert [r.score for r in results] == [1.0, -1.0, 1.0, -1.0, -1.0, 1.0]
        assert [r.reason for r in results][1::3] == ["timeout", "timeout"]
        assert results[3].reason is None  # plain wrong answer, not a timeout
        assert pool.timeouts == 2 and pool.workers_replaced == 2
        # Two hangs cost about two timeouts (they may run in parallel), never an hour.
        assert elapsed < 2 * 1.0 + 8.0
        time.sleep(0.2)
        assert not any(_alive(pid) for pid in first_pids - set(pool.worker_pids))
        # The pool keeps serving on its replacement workers.
        assert [r.correct for r in pool.score(["Answer: 5"] * 3, ["5"] * 3)] == [True] * 3
        assert len(pool.worker_pids) == 2


def test_crashed_worker_is_replaced():
    """An item that crashes its worker every time is retried once, then scores -1."""
    with RewardPool(num_workers=1, timeout_s=5.0, score_fn=hang_or_crash) as pool:
        results = pool.score(["Answer: 1", CRASH, "Answer: 2"], ["1", "1", "2"])
        assert [r.score for r in results] == [1.0, -1.0, 1.0]
        assert results[1].reason == "worker crashed"
        assert pool.crashes == 2 and pool.timeouts == 0


def test_close_stops_workers():
    pool = RewardPool(num_workers=2).start()
    pids = pool.worker_pids
    pool.close()
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def test_spawn_start_method():
    with RewardPool(num_workers=1, start_method="spawn", preload_sympy=False) as pool:
        assert pool.score(["Answer: 0.5"], ["\\frac12"])[0].correct


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_workers": 0}, "num_workers"), ({"timeout_s": 0}, "timeout_s"),
     ({"start_method": "fork"}, "start_method")],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardPool(**kwargs)


def test_length_mismatch_is_an_error():
    with RewardPool(num_workers=1) as pool, pytest.raises(ValueError, match="ground_truths"):
        pool.score(["a", "b"], ["1"])
