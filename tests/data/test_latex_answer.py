"""The dataset transformation reads answers with the reward's reader (issue 16).

Cross-checks against the reward's own evaluators (exact rationals without sympy, and the
sympy-backed equivalence), not against the transformation's code.
"""

from __future__ import annotations

import pytest

from dapo_megatron.data import latex_answer
from dapo_megatron.data.latex_answer import classify_answer
from dapo_megatron.data.transform import transform_answer
from dapo_megatron.reward import is_equivalent
from dapo_megatron.reward.exact import NotRational, evaluate
from dapo_megatron.reward.latex_parser import DEFAULT_LIMITS, parse_answer
from dapo_megatron.reward.normalize import normalize_answer
from tests.data.test_transform_cases import KEPT


def test_the_transformation_has_no_parser_of_its_own():
    source = open(latex_answer.__file__, encoding="utf-8").read()
    assert "reward.latex_parser import" in source and "reward.normalize import" in source
    assert not hasattr(latex_answer, "_Parser") and not hasattr(latex_answer, "clean_answer")


@pytest.mark.parametrize("answer", [c[1] for c in KEPT])
def test_value_agrees_with_the_reward(answer):
    value = classify_answer(answer)
    if value.is_rational():
        q = value.as_fraction()
        assert is_equivalent(rf"\frac{{{q.numerator}}}{{{q.denominator}}}", answer)
        try:  # the reward's sympy-free path, where it applies (no irrational intermediates)
            assert evaluate(parse_answer(normalize_answer(answer), DEFAULT_LIMITS), DEFAULT_LIMITS) == q
        except NotRational:
            pass
    outcome = transform_answer(answer)
    if outcome.form is not None:  # the stated form, instantiated, is the answer to the reward
        assert is_equivalent(outcome.form.instantiate(), answer)
    if not value.is_rational():  # and a neighbouring value is not
        assert not is_equivalent(outcome.form.instantiate(), answer + "+1")


@pytest.mark.parametrize("answer,integer", [
    (r"0.\overline{3}", 4),  # 1/3: the reward's normaliser reads repeating decimals
    (r"\boxed{\frac{3}{4}}.", 7),
    (r"6 \div 4", 5),
])
def test_answers_the_reward_reads_are_transformed(answer, integer):
    assert transform_answer(answer).ground_truth == str(integer)


@pytest.mark.parametrize("answer,reason", [
    (r"\log_2 8", "unsupported_form"),  # outside the reward's grammar, but well-formed maths
    ("5!", "unsupported_form"),
    ("3+4i", "unsupported_form"),
    (r"5\text{ cm}", "text"),  # the reward drops the unit to score; a ground truth may not
    ("5 cm", "text"),
    (r"4\frac{1}{2}", "non_unique"),  # the reward reads 9/2; a ground truth must be certain
])
def test_stricter_than_the_reward_where_a_ground_truth_needs_it(answer, reason):
    assert transform_answer(answer).reason == reason
