"""Exact values of closed-form answers: rational combinations of sqrt(n) and pi.

A `ClosedForm` is  sum_b c_b * sqrt(r_b) * pi**p_b  with rational c_b, square-free r_b >= 1
and p_b in {0, 1}. Every operation keeps that shape or raises `UnsupportedForm`, so two
values are equal exactly when their term dictionaries are (sqrt of distinct square-free
numbers and pi are linearly independent over the rationals).
"""

from __future__ import annotations

from fractions import Fraction
from math import gcd, isqrt

MAX_RADICAND = 10**15  # trial division up to its cube root stays under a millisecond
MAX_BITS = 4096  # numerators and denominators larger than this are not answers


class UnsupportedForm(ValueError):
    """A well-formed value outside the supported closed forms (pi squared, nested roots...)."""


def split_square(n: int) -> tuple[int, int]:
    """(s, r) with n = s*s*r and r square-free, for 1 <= n <= MAX_RADICAND."""
    if n < 1:
        raise ValueError(f"split_square needs a positive integer, got {n}")
    if n > MAX_RADICAND:
        raise UnsupportedForm(f"radicand {n} too large")
    s, r, p = 1, 1, 2
    # Divide out primes up to the cube root; the cofactor then has at most two prime
    # factors, both larger, so it is either a perfect square or square-free.
    while p * p * p <= n:
        e = 0
        while n % p == 0:
            n //= p
            e += 1
        s *= p ** (e // 2)
        r *= p ** (e % 2)
        p += 1 if p == 2 else 2
    root = isqrt(n)
    if root * root == n:
        s *= root
    else:
        r *= n
    return s, r


def _check_size(q: Fraction) -> Fraction:
    if q.numerator.bit_length() > MAX_BITS or q.denominator.bit_length() > MAX_BITS:
        raise UnsupportedForm("number too large")
    return q


class ClosedForm:
    """An exact value; ``terms`` maps (radicand, pi power) to a nonzero Fraction."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[int, int], Fraction] | None = None):
        self.terms = {k: _check_size(Fraction(v)) for k, v in (terms or {}).items() if v != 0}

    @classmethod
    def rational(cls, q) -> "ClosedForm":
        return cls({(1, 0): Fraction(q)})

    @classmethod
    def pi(cls) -> "ClosedForm":
        return cls({(1, 1): Fraction(1)})

    # -- queries -------------------------------------------------------------------
    def is_rational(self) -> bool:
        return all(k == (1, 0) for k in self.terms)

    def as_fraction(self) -> Fraction:
        if not self.is_rational():
            raise ValueError(f"{self!r} is not rational")
        return self.terms.get((1, 0), Fraction(0))

    def is_integer(self) -> bool:
        return self.is_rational() and self.as_fraction().denominator == 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClosedForm) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(frozenset(self.terms.items()))

    def __repr__(self) -> str:
        parts = [f"{c}*sqrt({r})*pi^{p}" for (r, p), c in sorted(self.terms.items())]
        return "ClosedForm(" + (" + ".join(parts) or "0") + ")"

    # -- arithmetic ----------------------------------------------------------------
    def __add__(self, other: "ClosedForm") -> "ClosedForm":
        terms = dict(self.terms)
        for k, c in other.terms.items():
            terms[k] = terms.get(k, Fraction(0)) + c
        return ClosedForm(terms)

    def __neg__(self) -> "ClosedForm":
        return ClosedForm({k: -c for k, c in self.terms.items()})

    def __sub__(self, other: "ClosedForm") -> "ClosedForm":
        return self + (-other)

    def __mul__(self, other: "ClosedForm") -> "ClosedForm":
        out = ClosedForm()
        for (r1, p1), c1 in self.terms.items():
            for (r2, p2), c2 in other.terms.items():
                if p1 + p2 > 1:
                    raise UnsupportedForm("a power of pi above one")
                # r1 = g*a, r2 = g*b with a, b, g pairwise coprime, so a*b is square-free.
                g = gcd(r1, r2)
                out = out + ClosedForm({((r1 // g) * (r2 // g), p1 + p2): c1 * c2 * g})
        return out

    def __truediv__(self, other: "ClosedForm") -> "ClosedForm":
        if not other.terms:
            raise ZeroDivisionError("division by zero")
        pi_powers = {p for _, p in other.terms}
        if pi_powers == {1}:  # (x pi) / (y pi) = x / y
            if any(p == 0 for _, p in self.terms):
                raise UnsupportedForm("division by pi")
            num = ClosedForm({(r, 0): c for (r, _), c in self.terms.items()})
            return num / ClosedForm({(r, 0): c for (r, _), c in other.terms.items()})
        if len(pi_powers) > 1:
            raise UnsupportedForm("a denominator mixing pi and numbers")
        if len(other.terms) == 1:
            (r, _), c = next(iter(other.terms.items()))
            # 1 / (c sqrt r) = sqrt(r) / (c r)
            return self * ClosedForm({(r, 0): 1 / (c * r)})
        if len(other.terms) == 2:
            # (x + y)(x - y) = x^2 - y^2 is rational for x, y rational multiples of roots.
            (k1, c1), (k2, c2) = other.terms.items()
            conjugate = ClosedForm({k1: c1, k2: -c2})
            norm = other * conjugate
            return (self * conjugate) / norm
        raise UnsupportedForm("a denominator with more than two terms")

    def sqrt(self) -> "ClosedForm":
        """The principal square root of a non-negative rational."""
        if not self.is_rational():
            raise UnsupportedForm("a square root of an irrational number")
        q = self.as_fraction()
        if q < 0:
            raise UnsupportedForm("a square root of a negative number")
        if q == 0:
            return ClosedForm()
        # sqrt(n/d) = sqrt(n d) / d
        s, r = split_square(q.numerator * q.denominator)
        return ClosedForm({(r, 0): Fraction(s, q.denominator)})

    def power(self, exponent: int) -> "ClosedForm":
        if abs(exponent) > 64:
            raise UnsupportedForm(f"exponent {exponent} too large")
        if exponent < 0:
            return ClosedForm.rational(1) / self.power(-exponent)
        if exponent == 0:
            if not self.terms:
                raise UnsupportedForm("0^0")
            return ClosedForm.rational(1)
        bits = max((max(c.numerator.bit_length(), c.denominator.bit_length()) + r.bit_length()
                    for (r, _), c in self.terms.items()), default=0)
        if bits * exponent > MAX_BITS:
            raise UnsupportedForm("number too large")
        result, base = ClosedForm.rational(1), self
        while exponent:
            if exponent & 1:
                result = result * base
            exponent >>= 1
            if exponent:
                base = base * base
        return result
