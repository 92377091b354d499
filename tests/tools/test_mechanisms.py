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


def test_summary_last_quarter_evals_mean_and_dropped_share_hand_worked():
    # 20 train steps: entropy = step / 100, so the last quarter (steps 16-20) averages 0.18;
    # evals at steps 0, 10, 20 of 0.30, 0.40, 0.50: the mean after step 0 is 0.45;
    # dynamic sampling examined 10 groups per step and kept 8 on even steps, 10 on odd ones:
    # dropped share = 1 - (10 * 8 + 10 * 10) / (20 * 10) = 0.1.
    curve = [{"step": 0, "eval/avg@k": 0.30, "eval/truncated_frac": 0.1, "eval/length_mean": 30.0}]
    for s in range(1, 21):
        c = {"step": s, "actor/entropy": s / 100, "response/length_mean": 30.0 + s,
             "response/truncated_frac": 0.2 if s <= 4 else 0.0,
             "dynamic_sampling/generated": 10.0, "dynamic_sampling/kept": 8.0 if s % 2 == 0 else 10.0}
        if s % 10 == 0:
            c.update({"eval/avg@k": 0.30 + s / 100, "eval/truncated_frac": 0.0, "eval/length_mean": 30.0})
        curve.append(c)
    got = mechanisms.summary(curve)
    assert abs(got["entropy_lastq"] - 0.18) < 1e-12
    assert abs(got["length_mean_lastq"] - 48.0) < 1e-12
    assert abs(got["length_mean_first10"] - 35.5) < 1e-12  # steps 1-10: 31 ... 40
    assert abs(got["length_mean_firsthalf"] - 35.5) < 1e-12  # the first 10 of 20 steps
    assert abs(mechanisms.summary(curve[:9])["length_mean_firsthalf"] - 32.5) < 1e-12  # 8 steps: 31 ... 34
    assert abs(got["entropy_all"] - 0.105) < 1e-12  # steps 1-20
    assert abs(got["accuracy_evals_mean"] - 0.45) < 1e-12
    assert abs(got["truncated_all"] - 0.04) < 1e-12  # 4 steps of 0.2 over 20
    assert abs(got["dropped_group_share"] - 0.1) < 1e-12
    # A run whose steps record no dynamic-sampling counts has no dropped share.
    assert mechanisms.summary([{k: v for k, v in c.items() if not k.startswith("dynamic")}
                               for c in curve])["dropped_group_share"] is None


def _bold_rows(table: str) -> list[tuple[str, str]]:
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return [(r[0].lstrip("| "), r[1]) for r in rows if r[0].startswith("| **")]


def test_primary_moves_a_mechanisms_bold_row_and_refuses_unknown_figures():
    # seq_mean - dapo: first-half length +1, +2, +3 (mean 2, std 1: beyond 2 std is false at
    # exactly 2); last-quarter length +0.5 each seed.
    rows = []
    for seed, d in ((1, 1.0), (2, 2.0), (3, 3.0)):
        rows.append({"setting": "dapo", "seed": seed, "length_mean_firsthalf": 40.0, "length_mean_lastq": 30.0})
        rows.append({"setting": "seq_mean", "seed": seed, "length_mean_firsthalf": 40.0 + d,
                     "length_mean_lastq": 30.5})
    default = _bold_rows(mechanisms.check_table(rows))
    assert [claim for _, claim in default] == ["mean length (last quarter) higher under seq-mean"]
    moved = mechanisms.check_table(rows, mechanisms.primaries(["loss=length_mean_firsthalf"]))
    assert [claim for _, claim in _bold_rows(moved)] == ["mean length (first half of the run) higher under seq-mean"]
    line = next(ln for ln in moved.splitlines() if "first half" in ln)
    assert "+1.00, +2.00, +3.00 | +2.00 ± 1.00 | yes | no |" in line
    for bad in ("loss=entropy_typo", "speed=length_mean_lastq"):
        try:
            mechanisms.primaries([bad])
        except ValueError as e:
            assert bad in str(e)
        else:
            raise AssertionError(bad)


def test_warm_start_report_kinds_agree_with_the_length_table(tmp_path):
    """The report's two tables come from the same samples: the kinds partition every response,
    the cut ones are the truncated share, and the kinds' accuracies add up to the overall one."""
    long = os.path.join(ROOT, "examples", "tiny_chains_long.yaml")
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"extends: {long}\ndata:\n  synthetic_eval_size: 12\n")
    text = mechanisms.warm_start_report(str(cfg), samples=4)
    rows = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    total = next(r for r in rows if r[0] == "all")
    kinds = {r[0]: (int(r[1]), float(r[2]), float(r[3])) for r in rows
             if r[0] in ("ends without re-checking", "re-checks and ends", "cut at the limit")}
    n = int(total[1]) * 4
    assert int(total[1]) == 12 and sum(c for c, _, _ in kinds.values()) == n
    cut = kinds.get("cut at the limit", (0, 0.0, 128.0))
    assert abs(100 * cut[0] / n - float(total[3])) < 0.05 + 1e-9
    assert cut[0] == 0 or cut[2] == 128.0  # max_response_length
    right = sum(c * acc / 100 for c, acc, _ in kinds.values())
    assert abs(100 * right / n - float(total[2])) < 0.1 + 1e-9  # each side rounded to 0.1
    mean_len = sum(c * ln for c, _, ln in kinds.values()) / n
    assert abs(mean_len - float(total[5])) < 0.1 + 1e-9
