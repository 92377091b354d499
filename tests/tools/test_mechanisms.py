"""bench/mechanisms.py's reporting: paired differences and the cumulative table, on hand-worked
records (the study's own numbers come from real runs; these check the arithmetic on them)."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import mechanisms  # noqa: E402


def _rec(setting, seed, acc0, acc2, entropy=0.1, truncated=0.05):
    return {"setting": setting, "seed": seed, "initial_accuracy": acc0, "accuracy_last2": acc2,
            "entropy_last5": entropy, "truncated_all": truncated}


def test_paired_is_per_seed_larger_minus_smaller_over_shared_seeds():
    rows = [_rec("dapo", 1, 0.3, 0.40), _rec("dapo", 2, 0.3, 0.45), _rec("dapo", 3, 0.3, 0.5),
            _rec("dyn_off", 1, 0.3, 0.38), _rec("dyn_off", 2, 0.3, 0.40)]  # no seed 3
    diffs = mechanisms.paired(rows, "dapo", "dyn_off", "accuracy_last2")
    assert [round(d, 6) for d in diffs] == [0.02, 0.05]


def test_cumulative_table_hand_worked():
    # grpo 40, 42, 44 (last 2 evals, %); dapo 45, 43, 50: minus GRPO +5, +1, +6,
    # mean 4, sample std sqrt(((1)^2 + (3)^2 + (2)^2) / 2) = sqrt(7) = 2.6458 -> 2.6.
    rows = [_rec("cum_grpo", s, 0.35, a) for s, a in ((1, 0.40), (2, 0.42), (3, 0.44))]
    rows += [_rec("cum_dapo", s, 0.35, a, truncated=0.02) for s, a in ((1, 0.45), (2, 0.43), (3, 0.50))]
    lines = mechanisms.cumulative_table(rows).splitlines()
    assert len(lines) == 4  # header, rule, grpo, dapo (settings without records are left out)
    grpo, dapo = lines[2].split(" | "), lines[3].split(" | ")
    assert grpo[0] == "| grpo" and grpo[3] == "42.0 ± 2.0" and grpo[4] == "" and grpo[8] == "30 |"
    assert dapo[0] == "| dapo" and dapo[2] == "35.0 ± 0.0" and dapo[3] == "46.0 ± 3.6"
    assert dapo[4] == "+5.0, +1.0, +6.0" and dapo[5] == "+4.0 ± 2.6"
    assert dapo[7] == "2.0 ± 0.0" and dapo[8] == "50 |"


def test_cumulative_table_empty_without_cumulative_records():
    assert mechanisms.cumulative_table([_rec("dapo", 1, 0.3, 0.4)]) == ""
