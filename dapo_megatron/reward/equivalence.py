"""``is_equivalent``: does a predicted answer denote the reference answer?

Checks run in order of cost, and the first that decides wins:

1. normalise both strings (``normalize``) and compare them without whitespace;
2. integer references (all of DAPO-Math-17K and AIME) take a fast path: the prediction is
   parsed and evaluated exactly with ``Fraction`` (``exact``), never with sympy, so
   ``1{,}000``, ``2^{10}``, ``\\frac{84}{2}`` and ``42.0`` all count; a prediction that is
   not a rational number is not equal to an integer;
3. both sides rational (``1/2``, ``\\frac12``, ``0.5``): exact comparison;
4. otherwise sympy expressions built from the parse trees, compared numerically at high
   precision (``symbolic``): radicals, pi, ``11-2\\sqrt{6}``, polynomials;
5. when the reference is a tuple, interval, set, list or union of intervals, the
   prediction must have the same shape: tuples and intervals element by element with
   the same brackets, sets and comma lists as unordered collections.
"""

from __future__ import annotations

import re
from functools import lru_cache

from dapo_megatron.reward.exact import NotRational, evaluate
from dapo_megatron.reward.latex_parser import (
    DEFAULT_LIMITS,
    AnswerParseError,
    ParseLimits,
    parse_answer,
)
from dapo_megatron.reward.normalize import THOUSANDS, compact, normalize_answer

_INTEGER = re.compile(r"^[+-]?\d+$")
_STRUCTURES = ("tuple", "set", "list", "union")


class _Reference:
    """A normalised, parsed reference answer (cached: a group of G shares one)."""

    __slots__ = ("text", "flat", "is_int", "int_value", "tree", "error")

    def __init__(self, ref: str, limits: ParseLimits):
        self.text = normalize_answer(ref)
        flat = compact(self.text)
        parse_text = self.text  # spaces separate "\\cdot a"; only compare strings compacted
        if THOUSANDS.match(flat):
            flat = parse_text = flat.replace(",", "")
        self.flat = flat
        self.is_int = bool(_INTEGER.match(flat))
        self.int_value = int(flat) if self.is_int and len(flat) <= limits.max_digits else None
        self.tree, self.error = None, None
        try:
            self.tree = parse_answer(parse_text, limits)
        except AnswerParseError as exc:
            self.error = str(exc)
        except RecursionError:  # a pathological reference from a dataset
            self.error = "nested too deeply"


@lru_cache(maxsize=4096)
def _reference(ref: str, limits: ParseLimits) -> _Reference:
    return _Reference(ref, limits)


def _scalar_equal(pred, ref, limits: ParseLimits) -> bool:
    try:
        return evaluate(pred, limits) == evaluate(ref, limits)
    except NotRational:
        pass
    from dapo_megatron.reward import symbolic  # sympy only from here on

    if pred[0] == "eq" or ref[0] == "eq":
        if pred[0] != ref[0]:
            return False
        a = symbolic.build(("add", [pred[1], ("neg", pred[2])]), limits)
        b = symbolic.build(("add", [ref[1], ("neg", ref[2])]), limits)
        return symbolic.equations_equal(a, b)
    if pred[0] in _STRUCTURES:
        return False
    return symbolic.expressions_equal(symbolic.build(pred, limits), symbolic.build(ref, limits))


def _unordered_equal(pred_items, ref_items, limits: ParseLimits) -> bool:
    if len(pred_items) != len(ref_items):
        return False
    unused = list(pred_items)
    for r in ref_items:  # greedy is exact: equivalence is transitive
        for k, p in enumerate(unused):
            if _tree_equal(p, r, limits):
                del unused[k]
                break
        else:
            return False
    return True


def _tree_equal(pred, ref, limits: ParseLimits) -> bool:
    kind = ref[0]
    if kind == "tuple":
        _, opened, items, closed = ref
        if pred[0] == "list" and (opened, closed) == ("(", ")"):
            pred = ("tuple", "(", pred[1], ")")
        if pred[0] != "tuple" or (pred[1], pred[3]) != (opened, closed):
            return False
        return len(pred[2]) == len(items) and all(
            _tree_equal(p, r, limits) for p, r in zip(pred[2], items)
        )
    if kind in ("set", "list"):
        if pred[0] in ("set", "list"):
            return _unordered_equal(pred[1], ref[1], limits)
        return len(ref[1]) == 1 and _tree_equal(pred, ref[1][0], limits)
    if kind == "union":
        if pred[0] != "union":
            return False
        return _unordered_equal(pred[1], ref[1], limits)
    if pred[0] in _STRUCTURES:
        return False
    return _scalar_equal(pred, ref, limits)


def check_equivalence(
    pred: str, ref: str, limits: ParseLimits = DEFAULT_LIMITS
) -> tuple[bool, str | None]:
    """(equal, reason): reason names why a non-match could not be decided by value.

    Reasons: ``None`` (compared and different, or equal), ``"parse error: ..."``,
    ``"answer too long"``.
    """
    if len(pred) > 4 * limits.max_chars:
        return False, "answer too long"
    reference = _reference(ref, limits)
    pred_text = normalize_answer(pred)
    pred_flat = compact(pred_text)
    # Word answers ("Monday", "no solution") are compared as text, case-insensitively.
    same_text = pred_flat.lower() == reference.flat.lower() and reference.error
    if pred_flat == reference.flat or same_text:
        return True, None
    if THOUSANDS.match(pred_flat) and "," not in reference.flat:
        pred_text = pred_flat = pred_flat.replace(",", "")
        if pred_flat == reference.flat:
            return True, None
    if reference.tree is None:
        return False, f"reference not parsed ({reference.error}); compared as text"
    try:
        pred_tree = parse_answer(pred_text, limits)
        if reference.is_int:
            # Fast path: exact rational arithmetic only, no sympy.
            if pred_tree[0] in _STRUCTURES or reference.int_value is None:
                return False, None
            try:
                return evaluate(pred_tree, limits) == reference.int_value, None
            except NotRational:
                return False, None
        return _tree_equal(pred_tree, reference.tree, limits), None
    except AnswerParseError as exc:
        return False, f"parse error: {exc}"
    except Exception as exc:  # noqa: BLE001 - sympy may raise anything on odd input
        # Model text must never crash a scorer; the failure is reported, not raised.
        return False, f"evaluation error: {type(exc).__name__}"


@lru_cache(maxsize=4096)
def _memo_check(pred: str, ref: str, limits: ParseLimits) -> tuple[bool, str | None]:
    return check_equivalence(pred, ref, limits)


def cached_check(
    pred: str, ref: str, limits: ParseLimits = DEFAULT_LIMITS
) -> tuple[bool, str | None]:
    """``check_equivalence`` memoised for answers short enough to parse (bounded memory)."""
    if len(pred) > 4 * limits.max_chars:
        return False, "answer too long"
    return _memo_check(pred, ref, limits)


def is_equivalent(pred: str | None, ref: str, limits: ParseLimits = DEFAULT_LIMITS) -> bool:
    """Whether answer ``pred`` is mathematically equivalent to reference ``ref``.

    Never raises on model text: anything unparsable or over a bound is ``False``.
    Results are memoised (responses in a group often share an answer).
    """
    if pred is None:
        return False
    return cached_check(pred, ref, limits)[0]
