"""Sympy expressions built from parse trees, and their equivalence test.

Expressions are constructed node by node from ``latex_parser`` trees with sympy's
constructors (``Integer``, ``Rational``, ``Symbol``, ``Pow``, ...); no string ever
reaches sympy's string parser. Bounds are applied before construction: numeric powers
go through ``exact.power``'s bit check, symbolic exponents are capped, factorials and
binomials are capped.

Equivalence of two scalar expressions is decided numerically at high precision,
which is cheap and does not depend on how an expression is written:

- without free symbols: both are evaluated to ``working_digits`` significant digits
  (100, more for long integers and high powers) and must agree to a relative
  10^-(0.8 digits) (or be identical);
- with free symbols: both are evaluated at ``_POINTS`` seeded pseudo-random points
  (a polynomial-identity test); every point where both are finite must agree.

Two values that differ (``2\\sqrt3`` vs ``3\\sqrt2``, ``205`` vs ``204``) differ far
above that tolerance, so the test has no false positives on competition answers; two
forms of the same value agree to the working precision.
"""

from __future__ import annotations

import random
from fractions import Fraction
from functools import lru_cache

from dapo_megatron.reward.exact import NotRational, evaluate, power
from dapo_megatron.reward.latex_parser import AnswerParseError, ParseLimits

_BASE_DIGITS = 100  # working precision for small expressions; tolerance 10^-(0.8 digits)
_MAX_DIGITS = 20000
_POINTS = 4


@lru_cache(maxsize=1)
def _sympy():
    import sympy  # imported lazily: integer answers never need it

    return sympy


def _rational(sp, q: Fraction):
    return sp.Rational(q.numerator, q.denominator)


def build(node, limits: ParseLimits):
    """A sympy expression for a scalar parse tree (no tuples/sets/equations)."""
    sp = _sympy()
    kind = node[0]
    if kind == "num":
        return _rational(sp, node[1])
    if kind == "sym":
        return sp.Symbol(node[1])
    if kind == "const":
        return {"pi": sp.pi, "E": sp.E, "I": sp.I, "oo": sp.oo}[node[1]]
    if kind == "neg":
        return -build(node[1], limits)
    if kind == "add":
        return sp.Add(*[build(t, limits) for t in node[1]])
    if kind == "mul":
        return sp.Mul(*[build(f, limits) for f in node[1]])
    if kind == "div":
        den = build(node[2], limits)
        if den == 0:
            raise AnswerParseError("division by zero")
        return build(node[1], limits) / den
    if kind == "pow":
        return _power(node, limits)
    if kind == "sqrt":
        radicand = build(node[1], limits)
        if node[2] is None:
            return sp.sqrt(radicand)
        index = build(node[2], limits)
        if not index.is_Integer or not 1 <= int(index) <= 64:
            raise AnswerParseError("root index must be an integer from 1 to 64")
        return sp.root(radicand, int(index))
    if kind == "fact":
        arg = build(node[1], limits)
        if arg.is_number and not (arg.is_Integer and 0 <= int(arg) <= limits.max_factorial):
            raise AnswerParseError(f"factorial only of integers 0..{limits.max_factorial}")
        return sp.factorial(arg)
    if kind == "binom":
        n, k = build(node[1], limits), build(node[2], limits)
        if n.is_number and not (n.is_Integer and abs(int(n)) <= limits.max_factorial * 4):
            raise AnswerParseError("binomial coefficient too large")
        return sp.binomial(n, k)
    if kind == "abs":
        return sp.Abs(build(node[1], limits))
    if kind == "func":
        return _function(node, limits)
    raise AnswerParseError(f"{kind} is not a scalar expression")


def _power(node, limits: ParseLimits):
    sp = _sympy()
    try:  # both sides rational: exact with the bit bound
        return _rational(sp, power(evaluate(node[1], limits), evaluate(node[2], limits), limits))
    except NotRational:
        pass
    base, exponent = build(node[1], limits), build(node[2], limits)
    if exponent.is_Rational:
        if abs(exponent.p) > limits.max_symbolic_exponent or exponent.q > 64:
            raise AnswerParseError(f"exponent over {limits.max_symbolic_exponent}")
    elif exponent.is_number:
        # An irrational numeric exponent (2^\pi, e^{\sqrt2}): bound its magnitude.
        if abs(complex(exponent.evalf(15))) > limits.max_symbolic_exponent:
            raise AnswerParseError(f"exponent over {limits.max_symbolic_exponent}")
    return sp.Pow(base, exponent)


def _function(node, limits: ParseLimits):
    sp = _sympy()
    _, name, arg_node, base_node = node
    arg = build(arg_node, limits)
    if name == "log":
        if base_node is None:
            # Competition convention: \log without a base is base 10 only with numbers
            # that are powers of 10 in practice; natural log elsewhere is ambiguous, so
            # the unbased form is taken as natural (as sympy and most graders do).
            return sp.log(arg)
        return sp.log(arg, build(base_node, limits))
    if name == "exp":
        if arg.is_number and abs(complex(arg.evalf(15))) > 10 * limits.max_symbolic_exponent:
            raise AnswerParseError("exp argument too large")
        return sp.exp(arg)
    funcs = {
        "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec,
        "csc": sp.csc, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan,
        "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "ln": sp.log,
    }
    return funcs[name](arg)


def working_digits(*exprs) -> int:
    """Decimal digits to evaluate at so that near-cancellations are still resolved.

    Two different values can agree to about as many digits as their integers and
    powers are long (sqrt(N^2+1) vs N differs by 1/(2N); (sqrt3+sqrt2)^n + (sqrt3-sqrt2)^n
    is an integer to within (sqrt3-sqrt2)^n), so the precision grows with the digits of
    every rational atom and with every rational exponent, from a base of 100 digits.
    """
    sp = _sympy()
    extra = 0
    for expr in exprs:
        for node in sp.preorder_traversal(expr):
            if node.is_Rational:
                extra += (abs(int(node.p)).bit_length() + int(node.q).bit_length()) * 31 // 100
            elif node.is_Pow and node.exp.is_Rational:
                extra += 2 * abs(int(node.exp.p))
    return min(_BASE_DIGITS + 2 * extra, _MAX_DIGITS)


def _numeric(expr, subs, digits: int):
    """(value, finite) of ``expr`` at ``subs`` with ``digits`` significant digits."""
    value = expr.evalf(digits, subs=subs) if subs else expr.evalf(digits)
    if not value.is_number or value.has(_sympy().zoo, _sympy().nan):
        return value, False
    return value, value.is_finite is not False


def _close(a, b, digits: int) -> bool:
    """Relative agreement of two evaluated numbers (complex allowed) to 0.8*digits."""
    if a == b:
        return True
    tol = _sympy().Float(10, digits) ** (-(digits * 4 // 5))
    return bool(abs(a - b) <= tol * max(abs(a), abs(b)))


def _random_point(rng: random.Random, symbols) -> dict:
    sp = _sympy()
    # Rationals in (0.1, 1.9), off the usual singular points (0, 1, simple fractions),
    # small enough that x^100 stays tame.
    return {s: sp.Rational(rng.randint(100, 1900), 1000) + sp.Rational(1, 7919) for s in symbols}


def expressions_equal(a, b) -> bool:
    """Whether two sympy scalar expressions denote the same value or function."""
    sp = _sympy()
    if a == b:
        return True
    if a.has(sp.oo, -sp.oo, sp.zoo) or b.has(sp.oo, -sp.oo, sp.zoo):
        return False  # infinities only match structurally (checked above)
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    digits = working_digits(a, b)
    if not symbols:
        va, fa = _numeric(a, None, digits)
        vb, fb = _numeric(b, None, digits)
        return fa and fb and _close(va, vb, digits)
    rng = random.Random(0x5EED)
    agreed = 0
    for _ in range(_POINTS * 3):
        subs = _random_point(rng, symbols)
        va, fa = _numeric(a, subs, digits)
        vb, fb = _numeric(b, subs, digits)
        if fa != fb:
            return False
        if not fa:
            continue
        if not _close(va, vb, digits):
            return False
        agreed += 1
        if agreed >= _POINTS:
            return True
    return False


def equations_equal(a, b) -> bool:
    """Whether ``a = 0`` and ``b = 0`` are the same equation: ``a == k*b``, constant k != 0.

    ``2x^2 + 2y^2 = 50`` and ``x^2 + y^2 = 25`` agree (k = 2); the ratio is read at one
    point where both are finite and non-zero, then ``a == k*b`` is tested like any two
    expressions.
    """
    if expressions_equal(a, b) or expressions_equal(a, -b):
        return True
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    if not symbols:
        return False
    rng = random.Random(0xE0)
    for _ in range(_POINTS):
        subs = _random_point(rng, symbols)
        va, fa = _numeric(a, subs, _BASE_DIGITS)
        vb, fb = _numeric(b, subs, _BASE_DIGITS)
        if fa and fb and vb != 0 and va != 0:
            return expressions_equal(a, (va / vb) * b)
    return False
