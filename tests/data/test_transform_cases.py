"""Hand-written problems with hand-computed integer answers (issue 9 acceptance)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dapo_megatron.data.answer_forms import AnswerForm, build_form
from dapo_megatron.data.latex_answer import classify_answer
from dapo_megatron.data.templates import dapo_prompt
from dapo_megatron.data.transform import TransformOptions, round_trip_problem, transform_answer, transform_file

# (problem, answer, expected kind or "unchanged", expected integer, expected template or None)
KEPT = [
    # integers pass through
    ("How many primes are below 70?", "19", "unchanged", 19, None),
    ("Find the minimum of x^2-14x+42.", "-7", "unchanged", -7, None),
    ("Evaluate 5-5.", "0", "unchanged", 0, None),
    ("Find the agent number.", "007", "unchanged", 7, None),
    # integers written another way
    ("Evaluate 8/2.", r"\frac{8}{2}", "integer", 4, None),
    ("How many minutes does the walk take?", r"\boxed{204}", "integer", 204, None),
    ("How many grams?", r"$1{,}000$", "integer", 1000, None),
    ("Evaluate 2 to the tenth.", "2^{10}", "integer", 1024, None),
    ("Evaluate sqrt 49.", r"\sqrt{49}", "integer", 7, None),
    ("Find the angle ABC in degrees.", r"30^\circ", "integer", 30, None),
    ("Solve 2x = 24.", "x = 12", "integer", 12, None),
    ("Find the mean of 2 and 4.", "3.0", "integer", 3, None),
    ("Evaluate -12/4.", r"\dfrac{-12}{4}", "integer", -3, None),
    ("Compute sqrt8/sqrt2.", r"\frac{\sqrt{8}}{\sqrt{2}}", "integer", 2, None),
    ("What percent of 8 is 4?", r"50\%", "integer", 50, None),
    # fractions a/b -> m+n, reduced first
    ("What fraction of 6 is 4?", r"\frac{4}{6}", "fraction", 5, r"\frac{m}{n}"),
    ("Flip a fair coin; find P(heads).", r"\frac{1}{2}", "fraction", 3, r"\frac{m}{n}"),
    ("Find the slope of 4y = -3x.", r"-\frac{3}{4}", "fraction", 7, r"-\frac{m}{n}"),
    ("Give the usual approximation of pi.", r"\dfrac{22}{7}", "fraction", 29, r"\frac{m}{n}"),
    ("Find P(three heads).", "3/8", "fraction", 11, r"\frac{m}{n}"),
    ("Find 1/4 as given.", "0.25", "fraction", 5, r"\frac{m}{n}"),
    ("Evaluate -5/15.", r"\frac{-5}{15}", "fraction", 4, r"-\frac{m}{n}"),
    ("Evaluate 9/12.", r"\tfrac{9}{12}", "fraction", 7, r"\frac{m}{n}"),
    ("Evaluate one half.", r"\frac12", "fraction", 3, r"\frac{m}{n}"),
    ("Evaluate 3/2.", "1.5", "fraction", 5, r"\frac{m}{n}"),
    ("Evaluate sqrt(9/16).", r"\sqrt{\frac{9}{16}}", "fraction", 7, r"\frac{m}{n}"),
    # k +- m sqrt(n), n square-free
    ("Find the smaller root of x^2-22x+97.", r"11-2\sqrt{6}", "radical", 19, r"k-m\sqrt{n}"),
    ("Find tan 75 degrees.", r"2+\sqrt{3}", "radical", 5, r"m+\sqrt{n}"),
    ("Simplify sqrt 12.", r"\sqrt{12}", "radical", 5, r"m\sqrt{n}"),
    ("Simplify 3 sqrt 8.", r"3\sqrt{8}", "radical", 8, r"m\sqrt{n}"),
    ("Find the diagonal of a unit square.", r"\sqrt{2}", "radical", 2, r"\sqrt{k}"),
    ("Find the negative root of x^2=5.", r"-\sqrt{5}", "radical", 5, r"-\sqrt{k}"),
    ("Evaluate sqrt50 - 1.", r"\sqrt{50}-1", "radical", 8, r"k\sqrt{m}-n"),
    ("Evaluate 1 - sqrt 2.", r"1-\sqrt{2}", "radical", 3, r"m-\sqrt{n}"),
    ("Add 4 sqrt3 and 2 sqrt5.", r"4\sqrt{3}+2\sqrt{5}", "radical", 14, r"k\sqrt{m}+n\sqrt{p}"),
    ("Add sqrt2 and sqrt8.", r"\sqrt{2}+\sqrt{8}", "radical", 5, r"m\sqrt{n}"),
    ("Add sqrt18 and sqrt12.", r"\sqrt{18}+\sqrt{12}", "radical", 10, r"k\sqrt{m}+n\sqrt{p}"),
    ("Rationalise 2/(1+sqrt3).", r"\frac{2}{1+\sqrt{3}}", "radical", 4, r"\sqrt{m}-n"),
    ("Expand (1+sqrt2)^2.", r"(1+\sqrt{2})^2", "radical", 7, r"k+m\sqrt{n}"),
    ("Multiply 2 sqrt3 by sqrt6.", r"2\sqrt{3}\cdot\sqrt{6}", "radical", 8, r"m\sqrt{n}"),
    ("Find the smaller root of x^2+6x+1.", r"-3-2\sqrt{2}", "radical", 7, r"-k-m\sqrt{n}"),
    ("Rationalise 3/sqrt3.", r"\frac{3}{\sqrt{3}}", "radical", 3, r"\sqrt{k}"),
    # (a + b sqrt c)/d and a sqrt b / c
    ("Find the larger root of x^2-3x+1.", r"\frac{3+\sqrt{5}}{2}", "radical_fraction", 10, r"\frac{k+\sqrt{m}}{n}"),
    ("Find the golden ratio.", r"\dfrac{1+\sqrt{5}}{2}", "radical_fraction", 8, r"\frac{k+\sqrt{m}}{n}"),
    ("Find sin 60 degrees.", r"\frac{\sqrt{3}}{2}", "radical_fraction", 5, r"\frac{\sqrt{m}}{n}"),
    ("Find the inradius.", r"\frac{3\sqrt{2}}{4}", "radical_fraction", 9, r"\frac{k\sqrt{m}}{n}"),
    ("Rationalise 1/sqrt2.", r"\frac{1}{\sqrt{2}}", "radical_fraction", 4, r"\frac{\sqrt{m}}{n}"),
    ("Simplify 2 sqrt6 / 4.", r"\frac{2\sqrt{6}}{4}", "radical_fraction", 8, r"\frac{\sqrt{m}}{n}"),
    ("Simplify (6+2 sqrt3)/4.", r"\frac{6+2\sqrt{3}}{4}", "radical_fraction", 8, r"\frac{k+\sqrt{m}}{n}"),
    ("Add 1/2 and sqrt3/3.", r"\frac{1}{2}+\frac{\sqrt{3}}{3}", "radical_fraction", 14, r"\frac{k+m\sqrt{n}}{p}"),
    ("Find -sqrt2/4.", r"-\frac{\sqrt{2}}{4}", "radical_fraction", 6, r"-\frac{\sqrt{m}}{n}"),
    ("Find cos 72 degrees.", r"\frac{\sqrt{5}-1}{4}", "radical_fraction", 10, r"\frac{\sqrt{k}-m}{n}"),
    ("Find sqrt(3/4).", r"\sqrt{\frac{3}{4}}", "radical_fraction", 5, r"\frac{\sqrt{m}}{n}"),
    ("Find the smaller root of 3x^2-10x+6.", r"\frac{5-\sqrt{7}}{3}", "radical_fraction", 15, r"\frac{k-\sqrt{m}}{n}"),
    # k pi and k pi / m
    ("Find the area of a circle of radius sqrt5.", r"5\pi", "pi", 5, r"k\pi"),
    ("Find the area of the unit circle.", r"\pi", "pi", 1, r"k\pi"),
    ("Find the angle 300 degrees in radians.", r"\frac{5\pi}{3}", "pi_fraction", 8, r"\frac{m\pi}{n}"),
    ("Find 30 degrees in radians.", r"\frac{\pi}{6}", "pi_fraction", 6, r"\frac{\pi}{k}"),
    ("Find -120 degrees in radians.", r"-\frac{2\pi}{3}", "pi_fraction", 5, r"-\frac{m\pi}{n}"),
    ("Find 4pi/6.", r"\frac{4\pi}{6}", "pi_fraction", 5, r"\frac{m\pi}{n}"),
    ("Find the circumference for diameter 12.", r"12\pi", "pi", 12, r"k\pi"),
    ("Find 45 degrees in radians.", r"\pi/4", "pi_fraction", 4, r"\frac{\pi}{k}"),
    ("Find 90 degrees in radians.", r"\dfrac{\pi}{2}", "pi_fraction", 2, r"\frac{\pi}{k}"),
    # sums of such terms
    ("Find the segment area.", r"\frac{\pi}{3}-\frac{\sqrt{3}}{4}", "sum", 10, r"\frac{\pi}{k}-\frac{\sqrt{m}}{n}"),
    ("Evaluate 2pi+3.", r"2\pi+3", "sum", 5, r"m+n\pi"),
    ("Find the area outside the circle.", r"16-4\pi", "sum", 20, r"m-n\pi"),
    ("Find the shaded area.", r"\frac{4\pi}{3}-2\sqrt{3}", "sum", 12, r"\frac{k\pi}{m}-n\sqrt{p}"),
    ("Evaluate pi/2 + 1.", r"\frac{\pi}{2}+1", "sum", 3, r"m+\frac{\pi}{n}"),
    ("Find the lateral area.", r"2\sqrt{3}\pi", "sum", 5, r"m\sqrt{n}\pi"),
    ("Find the region's area.", r"\frac{9\sqrt{3}}{4}-\frac{3\pi}{2}", "sum", 21,
     r"\frac{k\sqrt{m}}{n}-\frac{p\pi}{q}"),
]

# (problem, answer, drop reason)
DROPPED = [
    ("Find all x with x^2=3x-2.", "1, 2", "non_unique"),
    ("Solve x^2=2.", r"\pm\sqrt{2}", "non_unique"),
    ("Which n work?", r"2 \text{ or } 3", "non_unique"),
    ("Solve (x-1)(x-2)=0.", r"x=1 \text{ and } x=2", "non_unique"),
    ("List the divisors of 4... of 6 below 4.", r"\{1, 2, 3\}", "non_unique"),
    ("Give both coordinates.", "3; 4", "non_unique"),
    ("Give the mixed number.", r"3\frac{1}{2}", "non_unique"),  # 7/2 or 3/2?
    ("Find the range of sin^2.", "[0, 1]", "interval"),
    ("Solve x < 3.", r"(-\infty, 3)", "interval"),
    ("Solve (x-1)(x-2)(x-3)(x-4) < 0.", r"(1,2)\cup(3,4)", "interval"),
    ("Solve 2x > 10.", "x > 5", "interval"),
    ("Solve x - 2 >= 0.", r"x \geq 2", "interval"),
    ("Find the domain.", "(2, 5]", "interval"),
    ("Is 7 prime?", r"\text{yes}", "text"),
    ("What day is it?", "Monday", "text"),
    ("Which option is right?", "(B)", "text"),
    ("Solve x^2 = -1 over the reals.", r"\text{no solution}", "text"),
    ("How long is the side?", r"5\text{ cm}", "text"),
    ("Factor x^4-1 partly.", "x^2+1", "parse_failure"),
    ("Find the line.", "2x+3", "parse_failure"),
    ("Divide by zero.", r"\frac{1}{0}", "parse_failure"),
    ("A broken answer.", r"\sqrt{}", "parse_failure"),
    ("A truncated answer.", "3+", "parse_failure"),
    ("An unclosed answer.", r"\frac{1}{2", "parse_failure"),
    ("An unknown macro.", r"\foo{3}", "parse_failure"),
    ("Find pi squared.", r"\pi^2", "unsupported_form"),
    ("Find the cube root of 2.", r"\sqrt[3]{2}", "unsupported_form"),
    ("Find log 2.", r"\log 2", "unsupported_form"),
    ("Find sqrt(-4).", r"\sqrt{-4}", "unsupported_form"),
    ("Find a nested root.", r"\sqrt{1+\sqrt{2}}", "unsupported_form"),
    ("Find e squared.", "e^2", "unsupported_form"),
    ("Find 1/pi.", r"\frac{1}{\pi}", "unsupported_form"),
]


def test_enough_cases_cover_every_form_and_reason():
    assert len(KEPT) + len(DROPPED) >= 60
    assert {k for *_, k, _, _ in KEPT} == {"unchanged", "integer", "fraction", "radical",
                                          "radical_fraction", "pi", "pi_fraction", "sum"}
    assert {r for *_, r in DROPPED} == {"non_unique", "interval", "text", "parse_failure", "unsupported_form"}


@pytest.mark.parametrize("problem,answer,kind,integer,template", KEPT, ids=[c[1] for c in KEPT])
def test_kept_answer(problem, answer, kind, integer, template):
    outcome = transform_answer(answer)
    assert outcome.ground_truth == str(integer)
    assert (outcome.kind or outcome.status) == kind
    if template is None:
        assert outcome.form is None
    else:
        assert outcome.form.template == template
        assert outcome.form.integer == integer


@pytest.mark.parametrize("problem,answer,reason", DROPPED, ids=[c[1] for c in DROPPED])
def test_dropped_answer(problem, answer, reason):
    outcome = transform_answer(answer)
    assert (outcome.status, outcome.reason) == ("dropped", reason)
    assert outcome.ground_truth is None


def test_seed_example_exactly():
    outcome = transform_answer(r"11-2\sqrt{6}")
    assert outcome.ground_truth == "19"
    assert outcome.form.sentence() == (
        r"The original answer is in the form k-m\sqrt{n}, where k, m, and n are integers. "
        "Please find the value of k+m+n."
    )
    assert outcome.form.parameters() == {"k": 11, "m": 2, "n": 6}


def test_sentence_wording_for_one_and_two_parameters():
    assert transform_answer(r"\frac{4}{6}").form.sentence() == (
        r"The original answer is in the form \frac{m}{n}, where m and n are integers. "
        "Please find the value of m+n.")
    assert transform_answer(r"5\pi").form.sentence() == (
        r"The original answer is in the form k\pi, where k is an integer. Please find the value of k.")
    # (3 + sqrt 12)/6 = (3 + 2 sqrt 3)/6: k+m+n+p = 3+2+3+6
    form = transform_answer(r"\frac{3+\sqrt{12}}{6}").form
    assert (form.template, form.integer) == (r"\frac{k+m\sqrt{n}}{p}", 14)
    assert form.sentence(state_conditions=True).endswith(
        "Please find the value of k+m+n+p. Here n is square-free and the fraction is in lowest terms.")


def test_file_of_hand_written_problems(tmp_path):
    """All cases through the file path: every good row kept in order, every drop counted."""
    src = tmp_path / "problems.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for problem, answer, *_ in KEPT + DROPPED:
            f.write(json.dumps({"problem": problem, "answer": answer}) + "\n")
    out = tmp_path / "out.jsonl"
    summary = transform_file(src, out, TransformOptions())
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["reward_model"]["ground_truth"] for r in rows] == [str(c[3]) for c in KEPT]
    assert summary.rows_read == len(KEPT) + len(DROPPED)
    assert summary.dropped == Counter(r for *_, r in DROPPED)
    assert summary.kept_unchanged == 4
    assert summary.transformed == Counter(c[2] for c in KEPT if c[2] != "unchanged")
    seed = rows[[c[1] for c in KEPT].index(r"11-2\sqrt{6}")]
    question = ("Find the smaller root of x^2-22x+97. The original answer is in the form k-m\\sqrt{n}, "
                "where k, m, and n are integers. Please find the value of k+m+n.")
    assert seed["prompt"] == [{"role": "user", "content": dapo_prompt(question)}]
    assert seed["extra_info"]["original_answer"] == r"11-2\sqrt{6}"
    assert seed["extra_info"]["form"] == r"k-m\sqrt{n}"
    assert seed["extra_info"]["form_parameters"] == "k=11,m=2,n=6"
    assert rows[0]["prompt"][0]["content"] == dapo_prompt("How many primes are below 70?")


def test_round_trip_check_catches_a_wrong_form():
    value = classify_answer(r"11-2\sqrt{6}")
    good = build_form(value)
    assert round_trip_problem(good, value) is None
    wrong_value = AnswerForm(good.kind, good.template, good.names, (11, 1, 24), good.radicands,
                             good.denominators, good._slots)
    assert "square-free" in round_trip_problem(wrong_value, value)
    other = classify_answer(r"11-3\sqrt{6}")
    assert "another value" in round_trip_problem(good, other)
