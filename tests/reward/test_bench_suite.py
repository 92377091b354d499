"""The benchmark's labelled suite as a regression test: size, coverage, no reward hacks."""

import sys
from pathlib import Path

from dapo_megatron.reward import compute_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from reward_cases import WRONG_ANSWER_CATEGORIES, cases  # noqa: E402


def test_suite_size_and_no_false_positive_on_wrong_answers():
    suite = cases()
    assert len(suite) >= 400
    assert {c["category"] for c in suite} >= {"int", "int_wrong", "rational", "radical", "pi",
                                              "expression", "structure", "adversarial"}
    false_positives = [
        c["response"][-60:] for c in suite
        if c["category"] in WRONG_ANSWER_CATEGORIES or not c["expected"]
        if compute_score(c["response"], c["ground_truth"]).correct
    ]
    assert false_positives == []
