"""is_equivalent / compute_score against hand-worked cases and exact integer references."""

import math
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.reward import (
    ParseLimits,
    RewardResult,
    check_equivalence,
    compute_score,
    is_equivalent,
    parse_answer,
)
from dapo_megatron.reward.exact import evaluate

EQUAL = [
    ("42", "42"), ("42.0", "42"), ("1,000", "1000"), ("1{,}000", "1000"), ("2^{10}", "1024"),
    ("\\frac{84}{2}", "42"), ("10!", "3628800"), ("\\binom{6}{2}", "15"), ("\\sqrt{144}", "12"),
    ("1\\,000\\,000", "10^6"), ("x = 5", "5"), ("5^\\circ", "5"), ("\\$5", "5"), ("30\\text{ degrees}", "30"), ("-7", "-7"),
    ("0.5", "\\frac12"), ("\\frac{1}{2}", "1/2"), ("\\dfrac{3}{4}", "0.75"), ("-0.75", "\\frac{-3}{4}"),
    ("4\\frac{1}{2}", "\\frac92"), ("0.\\overline{3}", "\\frac13"),
    ("\\sqrt{12}", "2\\sqrt{3}"), ("-2\\sqrt6+11", "11-2\\sqrt{6}"),
    ("\\frac{1}{\\sqrt2}", "\\frac{\\sqrt{2}}{2}"), ("(1+\\sqrt2)^2", "3+2\\sqrt2"),
    ("2^{1/3}", "\\sqrt[3]{2}"), ("\\frac{4\\pi}{3}", "4\\pi/3"), ("\\pi \\cdot 2", "2\\pi"),
    ("(x+1)^2", "x^2+2x+1"), ("1-\\cos^2 x", "\\sin^2 x"), ("3+4i", "4i+3"),
    ("y = 3 + 2x", "y=2x+3"), ("y^2+x^2=25", "x^2+y^2=25"), ("2x^2+2y^2=50", "x^2+y^2=25"),
    ("(1, 2)", "(1,2)"), ("1, 2", "(1,2)"), ("[2, 5)", "[2,5)"), ("(-\\infty,3]", "(-\\infty, 3]"),
    ("(1,\\infty)\\cup(-\\infty,-1)", "(-\\infty,-1)\\cup(1,\\infty)"),
    ("\\{3,2,1\\}", "\\{1,2,3\\}"), ("3, 1, 2", "\\{1,2,3\\}"), ("2, 1", "1, 2"),
    ("\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", "\\frac{-1\\pm\\sqrt5}{2}"),
    ("\\text{no solution}", "no solution"), ("(B)", "B"), ("\\emptyset", "\\varnothing"),
]
DIFFERENT = [
    ("205", "204"), ("42.5", "42"), ("4.01", "4"), ("1,001", "1000"), ("-5", "5"),
    ("2^{10}", "1000"), ("\\pi", "3"), ("42x", "42"), ("42, 43", "42"), ("42 \\pm 1", "42"),
    ("0.33", "\\frac13"), ("\\frac{2}{1}", "\\frac12"), ("2\\sqrt3", "3\\sqrt2"),
    ("11+2\\sqrt6", "11-2\\sqrt6"), ("\\frac{3\\pi}{4}", "\\frac{4\\pi}{3}"), ("3.14159", "\\pi"),
    ("(x-1)^2", "x^2+2x+1"), ("3-4i", "3+4i"), ("y=3x+2", "y=2x+3"), ("x^2+y^2=5", "x^2+y^2=25"),
    ("(2,1)", "(1,2)"), ("[1,2]", "(1,2)"), ("(1,2,3)", "(1,2)"), ("1", "(1,2)"),
    ("(2,5)", "[2,5)"), ("(-\\infty,3)", "(-\\infty,3]"), ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("1, 2, 4", "\\{1,2,3\\}"), ("\\infty", "-\\infty"), ("B", "C"), ("yes", "no"),
    ("\\frac{1}{0}", "1"), ("0/0", "0"), ("2 3", "6"), ("1\\,001", "1000"),
]


@pytest.mark.parametrize("pred, ref", EQUAL)
def test_equal_forms(pred, ref):
    assert is_equivalent(pred, ref), check_equivalence(pred, ref)


@pytest.mark.parametrize("pred, ref", DIFFERENT)
def test_different_values(pred, ref):
    assert not is_equivalent(pred, ref)


def test_compute_score_fields():
    assert compute_score("work\nAnswer: 0.5", "\\frac{1}{2}") == RewardResult(1.0, True, "0.5", None)
    wrong = compute_score("Answer: 3", "4")
    assert (wrong.score, wrong.correct, wrong.answer, wrong.reason) == (-1.0, False, "3", None)
    assert compute_score("no final answer", "4").reason == "no answer"
    assert compute_score("Answer: 9^9^9^9", "4").reason.startswith("parse error")
    assert not is_equivalent(None, "4")


def _formats(q: Fraction) -> list[str]:
    p, d = q.numerator, q.denominator
    out = [f"{p}/{d}", f"\\frac{{{p}}}{{{d}}}", f"\\dfrac{{{3 * p}}}{{{3 * d}}}"]
    if d == 1:
        out.append(str(p))
    # A terminating decimal (denominator 2^a 5^b), written with exact digits.
    scaled = q * 10**12
    if scaled.denominator == 1:
        sign = "-" if q < 0 else ""
        whole, frac = divmod(abs(scaled.numerator), 10**12)
        out.append(f"{sign}{whole}.{frac:012d}")
    return out


rationals = st.fractions(min_value=-1000, max_value=1000, max_denominator=64)


@settings(max_examples=150, deadline=None)
@given(a=rationals, b=rationals)
def test_rationals_match_exact_arithmetic(a, b):
    # Reference: Python's exact Fraction equality, for every surface form of both sides.
    for pred in _formats(a):
        for ref in _formats(b)[:2]:
            assert is_equivalent(pred, ref) == (a == b), (pred, ref)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(-(10**9), 10**9), delta=st.integers(-3, 3))
def test_integer_fast_path_matches_int_equality(n, delta):
    m = n + delta
    for pred in (str(m), f"{m:,}", f"{m}.0", f"\\boxed{{{m}}}"):
        assert is_equivalent(pred, str(n)) == (m == n), (pred, n)


@settings(max_examples=100, deadline=None)
@given(a=st.integers(1, 12), b=st.integers(2, 30), c=st.integers(1, 12), d=st.integers(2, 30))
def test_radicals_match_integer_reference(a, b, c, d):
    # a*sqrt(b) == c*sqrt(d) (all positive) exactly when a^2 b == c^2 d.
    assert is_equivalent(f"{a}\\sqrt{{{b}}}", f"{c}\\sqrt{{{d}}}") == (a * a * b == c * c * d)


@settings(max_examples=60, deadline=None)
@given(r1=st.integers(-9, 9), r2=st.integers(-9, 9), s1=st.integers(-9, 9), s2=st.integers(-9, 9))
def test_factored_polynomials_match_coefficients(r1, r2, s1, s2):
    # (x-r1)(x-r2) vs expanded x^2 - (s1+s2)x + s1 s2: equal iff the root multisets agree.
    expanded = f"x^2 - ({s1 + s2})x + ({s1 * s2})"
    assert is_equivalent(f"(x-({r1}))(x-({r2}))", expanded) == (sorted([r1, r2]) == sorted([s1, s2]))


def test_exact_evaluator_against_python():
    limits = ParseLimits()
    cases = {
        "2^{10}-3\\cdot 7": 2**10 - 21, "\\frac{3}{4}+\\frac{1}{6}": Fraction(11, 12),
        "(-2)^3": -8, "2^{-2}": Fraction(1, 4), "8^{2/3}": 4, "\\sqrt[3]{-27}": -3,
        "5!-4!": 96, "\\binom{10}{3}": 120, "|{-7}|": 7, "1.25": Fraction(5, 4), "-3^2": -9,
        "2^3^2": 2**9, "\\frac12\\cdot 4": 2, "6/2(1+2)": 9,
    }
    for text, value in cases.items():
        assert evaluate(parse_answer(text), limits) == value, text
    assert math.factorial(20) == evaluate(parse_answer("20!"), limits)


def test_integer_references_never_import_sympy():
    code = (
        "import sys\n"
        "from dapo_megatron.reward import compute_score\n"
        "for pred in ['42', '2^{10}', '\\\\frac{84}{2}', '\\\\sqrt{2}', 'x+1', '\\\\pi', '(1,2)', '9^9^9^9']:\n"
        "    compute_score('Answer: ' + pred, '42')\n"
        "assert 'sympy' not in sys.modules, 'integer path imported sympy'\n"
        "compute_score('Answer: \\\\sqrt{2}', '\\\\sqrt{2}+0')\n"
        "assert 'sympy' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
