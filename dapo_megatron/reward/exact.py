"""Exact rational evaluation of a parsed answer, without sympy.

This is the fast path: integer and rational answers (all of DAPO-Math-17K and AIME)
are decided here with ``fractions.Fraction``. A tree that is not a rational number
(a symbol, pi, an irrational root, a tuple) raises ``NotRational``; a power, factorial
or binomial whose result would exceed ``ParseLimits.max_result_bits`` raises
``AnswerParseError`` before it is computed.
"""

from __future__ import annotations

import math
from fractions import Fraction

from dapo_megatron.reward.latex_parser import AnswerParseError, ParseLimits


class NotRational(ValueError):
    """The tree does not denote a rational number this evaluator can compute."""


def _bits(q: Fraction) -> int:
    return max(abs(q.numerator).bit_length(), q.denominator.bit_length())


def _check_bits(q: Fraction, limits: ParseLimits) -> Fraction:
    if _bits(q) > limits.max_result_bits:
        raise AnswerParseError(f"number larger than {limits.max_result_bits} bits")
    return q


def _int_root(value: int, index: int) -> int | None:
    """Exact integer ``index``-th root of ``value`` >= 0, or None."""
    if index == 2:
        r = math.isqrt(value)
        return r if r * r == value else None
    r = round(value ** (1.0 / index)) if value.bit_length() < 1000 else None
    if r is None:
        return None
    for cand in (r - 1, r, r + 1):
        if cand >= 0 and cand**index == value:
            return cand
    return None


def _root(q: Fraction, index: int) -> Fraction:
    if index < 1 or index > 64:
        raise NotRational("root index out of range")
    if q < 0:
        if index % 2 == 0:
            raise NotRational("even root of a negative number")
        return -_root(-q, index)
    num = _int_root(q.numerator, index)
    den = _int_root(q.denominator, index)
    if num is None or den is None:
        raise NotRational("irrational root")
    return Fraction(num, den)


def power(base: Fraction, exponent: Fraction, limits: ParseLimits) -> Fraction:
    """``base ** exponent`` exactly, refusing results over the bit bound beforehand."""
    if exponent.denominator != 1:
        # A rational exponent p/q is the q-th root of base**p.
        root = _root(base, exponent.denominator)
        return power(root, Fraction(exponent.numerator), limits)
    e = exponent.numerator
    if base == 0:
        if e < 0:
            raise NotRational("division by zero")
        return Fraction(1) if e == 0 else Fraction(0)
    if abs(base) == 1:
        return base ** e
    # base**e needs about |e| * log2(max(|num|, den)) bits: check before computing.
    if abs(e) * math.log2(max(abs(base.numerator), base.denominator)) > limits.max_result_bits:
        raise AnswerParseError(f"power larger than {limits.max_result_bits} bits")
    return base ** e


def _as_int(q: Fraction, what: str) -> int:
    if q.denominator != 1:
        raise NotRational(f"{what} of a non-integer")
    return q.numerator


def evaluate(node, limits: ParseLimits) -> Fraction:
    """The exact rational value of a parse tree.

    Raises:
        NotRational: the tree is not a (computable) rational number.
        AnswerParseError: an operation would exceed a bound.
    """
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "neg":
        return -evaluate(node[1], limits)
    if kind == "add":
        return _check_bits(sum((evaluate(t, limits) for t in node[1]), Fraction(0)), limits)
    if kind == "mul":
        out = Fraction(1)
        for f in node[1]:
            out = _check_bits(out * evaluate(f, limits), limits)
        return out
    if kind == "div":
        den = evaluate(node[2], limits)
        if den == 0:
            raise NotRational("division by zero")
        return _check_bits(evaluate(node[1], limits) / den, limits)
    if kind == "pow":
        return power(evaluate(node[1], limits), evaluate(node[2], limits), limits)
    if kind == "sqrt":
        index = 2 if node[2] is None else _as_int(evaluate(node[2], limits), "root index")
        return _root(evaluate(node[1], limits), index)
    if kind == "fact":
        n = _as_int(evaluate(node[1], limits), "factorial")
        if n < 0:
            raise NotRational("factorial of a negative number")
        if n > limits.max_factorial:
            raise AnswerParseError(f"factorial of more than {limits.max_factorial}")
        return Fraction(math.factorial(n))
    if kind == "binom":
        n = _as_int(evaluate(node[1], limits), "binomial")
        k = _as_int(evaluate(node[2], limits), "binomial")
        if n > limits.max_factorial * 4:
            raise AnswerParseError("binomial coefficient too large")
        if n < 0 or k < 0:
            raise NotRational("binomial of a negative number")
        return Fraction(math.comb(n, k))
    if kind == "abs":
        return abs(evaluate(node[1], limits))
    raise NotRational(f"{kind} is not a rational number")
