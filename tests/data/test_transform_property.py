"""Property test: random parameters of each form -> LaTeX -> the canonical sum comes back.

The expected integer is computed here independently of the package: sympy simplifies the
square roots (sqrt(12) -> 2*sqrt(3)), and the canonical parameters are then read off with
plain integer arithmetic: per group (terms without pi, terms with pi) the lowest common
denominator d, the numerator coefficients |a| (a 1 in front of a root or pi is not a
parameter), the square-free radicands, and d when d > 1.
"""

from __future__ import annotations

from fractions import Fraction
from math import lcm

import sympy
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dapo_megatron.data.latex_answer import classify_answer
from dapo_megatron.data.transform import transform_answer

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

small = st.integers(1, 40)
signed = st.integers(-40, 40)
radicand = st.integers(2, 300)


def canonical_sum(expr) -> int:
    """Sum of the canonical form's parameters for a sympy value  sum c*sqrt(r)*pi^p."""
    groups: dict[int, dict[int, Fraction]] = {0: {}, 1: {}}
    for term in sympy.Add.make_args(sympy.expand(expr)):
        coeff, rest = term.as_coeff_Mul()
        p = 1 if rest.has(sympy.pi) else 0
        root = rest / sympy.pi if p else rest
        r = 1 if root == 1 else int(root**2)
        groups[p][r] = groups[p].get(r, Fraction(0)) + Fraction(int(coeff.p), int(coeff.q))
    total, n_params = 0, 0
    for p, terms in groups.items():
        terms = {r: c for r, c in terms.items() if c}
        if not terms:
            continue
        d = lcm(*(c.denominator for c in terms.values()))
        for r, c in terms.items():
            a = abs(int(c * d))
            if a != 1 or (r == 1 and p == 0):
                total, n_params = total + a, n_params + 1
            if r > 1:
                total, n_params = total + r, n_params + 1
        if d > 1:
            total, n_params = total + d, n_params + 1
    # The value pi (or -pi) alone has no parameter; its form is k\pi with k = 1.
    return total if n_params else 1


def check(latex: str, expr) -> None:
    outcome = transform_answer(latex)
    expected = canonical_sum(expr)
    if expr.is_Integer:
        assert outcome.ground_truth == str(int(expr)), latex
        return
    assert outcome.status == "transformed", (latex, outcome)
    assert outcome.ground_truth == str(expected), (latex, outcome.form)
    assert sum(outcome.form.parameters().values()) == expected
    # The canonical LaTeX that the parameters spell out has exactly the value drawn
    # (compared by sympy).
    value = classify_answer(outcome.form.instantiate())
    rebuilt = sum(sympy.Rational(c.numerator, c.denominator) * sympy.sqrt(r) * sympy.pi**p
                  for (r, p), c in value.terms.items())
    assert sympy.expand(rebuilt - expr) == 0, (latex, outcome.form.instantiate())


def sign(negative: bool) -> str:
    return "-" if negative else ""


@SETTINGS
@given(small, small, st.integers(1, 9), st.booleans())
def test_fraction(a, b, scale, negative):
    latex = rf"{sign(negative)}\frac{{{a * scale}}}{{{b * scale}}}"
    check(latex, sympy.Rational(a, b) * (-1 if negative else 1))


@SETTINGS
@given(signed, small, radicand, st.booleans())
def test_k_plus_minus_m_sqrt_n(k, m, n, minus):
    assume(sympy.sqrt(n).is_irrational)
    latex = rf"{k}{'-' if minus else '+'}{m}\sqrt{{{n}}}"
    check(latex, k + (-1 if minus else 1) * m * sympy.sqrt(n))


@SETTINGS
@given(signed, small, radicand, st.integers(2, 30), st.booleans())
def test_a_plus_b_sqrt_c_over_d(a, b, c, d, negative):
    assume(sympy.sqrt(c).is_irrational)
    latex = rf"{sign(negative)}\frac{{{a}+{b}\sqrt{{{c}}}}}{{{d}}}"
    check(latex.replace("+-", "-"), (a + b * sympy.sqrt(c)) / d * (-1 if negative else 1))


@SETTINGS
@given(small, radicand, st.integers(2, 30))
def test_a_sqrt_b_over_c(a, b, c):
    assume(sympy.sqrt(b).is_irrational)
    check(rf"\dfrac{{{a}\sqrt{{{b}}}}}{{{c}}}", a * sympy.sqrt(b) / c)


@SETTINGS
@given(st.integers(-60, 60))
def test_k_pi(k):
    assume(k != 0)
    check(rf"{k}\pi", k * sympy.pi)


@SETTINGS
@given(st.integers(-60, 60), st.integers(2, 40))
def test_k_pi_over_m(k, m):
    assume(k != 0)
    check(rf"\frac{{{k}\pi}}{{{m}}}", k * sympy.pi / m)


@SETTINGS
@given(small, radicand, st.integers(1, 12), signed, st.integers(1, 12), st.booleans())
def test_sum_of_root_fraction_and_pi_fraction(a, b, c, k, m, minus):
    assume(sympy.sqrt(b).is_irrational and k != 0)
    latex = rf"\frac{{{a}\sqrt{{{b}}}}}{{{c}}}{'-' if minus else '+'}\frac{{{k}\pi}}{{{m}}}"
    check(latex, a * sympy.sqrt(b) / c + (-1 if minus else 1) * k * sympy.pi / m)


@SETTINGS
@given(signed, small, radicand, small, radicand, st.integers(1, 12))
def test_sum_of_two_roots_and_a_fraction(k, a, b, c, e, d):
    assume(sympy.sqrt(b).is_irrational and sympy.sqrt(e).is_irrational)
    expr = sympy.Rational(k, d) + a * sympy.sqrt(b) + c * sympy.sqrt(e)
    assume(len(sympy.Add.make_args(sympy.expand(expr))) == 3 or k == 0)  # roots may merge
    check(rf"\frac{{{k}}}{{{d}}}+{a}\sqrt{{{b}}}+{c}\sqrt{{{e}}}", expr)


LATEXISH = st.lists(st.sampled_from([
    "1", "2", "12", "0", "3.5", "+", "-", "*", "/", "^", "(", ")", "{", "}", "[", "]", ",", "=", " ",
    r"\frac", r"\sqrt", r"\pi", r"\cdot", r"\left(", r"\right)", r"\text{", "x", r"\infty", r"\pm",
    r"\boxed{", "$", "e", r"\sqrt[3]", "64",
]), max_size=30).map("".join)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.one_of(LATEXISH, st.text(max_size=40)))
def test_any_text_gets_an_outcome_never_an_exception(text):
    outcome = transform_answer(text)
    assert outcome.status in ("unchanged", "transformed", "dropped")
    if outcome.status == "dropped":
        assert outcome.reason and outcome.ground_truth is None
    else:
        assert int(outcome.ground_truth) == int(outcome.ground_truth.strip())
