"""A final answer's exact `ClosedForm`, read with the reward's reader, or a drop reason.

The text is normalised by `reward.normalize.normalize_answer` and parsed by
`reward.latex_parser.parse_answer`: the dataset transformation and the reward read an
answer the same way (one parser, no Python evaluation anywhere). This module adds what a
ground truth needs on top of that, and a reward does not:

- drop reasons: an answer that is not one value is dropped and counted by why
  (DROP_REASONS), checked in that order, before the value is read;
- strictness where the reward is lenient: units and words are text (the reward drops
  "cm" to score "5 cm"; a ground truth "5" would lose what was asked), and a number right
  before \\frac (2\\frac{1}{2}: a mixed number to a person, a product to TeX; the reward
  reads a proper fraction as mixed) is ambiguous;
- the value as a `ClosedForm` (rationals, square roots and pi), built node by node from the
  parse tree; anything else is an unsupported form.
"""

from __future__ import annotations

import re

from dapo_megatron.data.closed_form import ClosedForm, UnsupportedForm
from dapo_megatron.reward.latex_parser import FUNCTIONS, AnswerParseError, parse_answer
from dapo_megatron.reward.normalize import THOUSANDS, normalize_answer

NON_UNIQUE = "non_unique"  # several answers: lists, \pm, "or", sets
INTERVAL = "interval"  # intervals, unions, inequalities, infinity
TEXT = "text"  # words, \text{...}, units, multiple-choice letters
PARSE_FAILURE = "parse_failure"  # variables, unknown commands, broken syntax
UNSUPPORTED = "unsupported_form"  # well-formed, but not a supported closed form
DROP_REASONS = (NON_UNIQUE, INTERVAL, TEXT, PARSE_FAILURE, UNSUPPORTED)

MAX_ANSWER_CHARS = 300


class AnswerRejected(ValueError):
    """The answer is not a single supported closed form; ``reason`` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_COMMAND = re.compile(r"\\([A-Za-z]+)")
_WORD = re.compile(r"[A-Za-z]{2,}")
_TEXT_COMMANDS = {"text", "textbf", "textrm", "textit", "textnormal", "mathrm", "mathbf", "mbox",
                  "operatorname"}
_INTERVAL_COMMANDS = {"infty", "cup", "cap", "le", "ge", "leq", "geq", "lt", "gt", "leqslant",
                      "geqslant", "in", "emptyset", "varnothing", "setminus"}
# Well-formed maths that is not a closed form, even where the reward's grammar stops short
# of it (\log_2 8, \sum_{k=1}^n k): unsupported rather than a parse failure.
_UNSUPPORTED_COMMANDS = FUNCTIONS | {"lg", "binom", "choose", "sum", "prod", "int", "lim", "cdots",
                                     "ldots", "dots", "overline"}
_INTERVAL_CHARS = re.compile(r"[<>\u2264\u2265\u221e\u222a]")
_PLUS_MINUS_CHARS = re.compile(r"[\u00b1\u2213]")
# 2\frac{1}{2}: a number that is a whole term (not an exponent, not inside another number)
# right before \frac.
_NUMBER_BEFORE_FRAC = re.compile(r"(?<![\d.^_])\d+(?:\.\d+)?\s*\\frac(?![A-Za-z])")


def _top_level_separators(s: str) -> tuple[bool, bool]:
    """(a ',' or ';' at depth 0, the whole string is one bracket pair with ',' at depth 1)."""
    depth, top, inner, spans = 0, False, False, True
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                spans = False
        elif ch in ",;":
            top |= depth == 0
            inner |= depth == 1
    bracketed = len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and spans
    return top, bracketed and inner


def _drop_reason(text: str, s: str) -> AnswerRejected | None:
    """Why the answer (``text`` as given, ``s`` normalised) is not one value, if it is not."""
    if not s:
        return AnswerRejected(PARSE_FAILURE, "empty answer")
    if len(s) > MAX_ANSWER_CHARS:
        return AnswerRejected(PARSE_FAILURE, f"longer than {MAX_ANSWER_CHARS} characters")
    # Words are read in the text as given: normalisation drops units and "the answer is".
    words = {w.lower() for w in _WORD.findall(_COMMAND.sub(" ", text))}
    commands = set(_COMMAND.findall(text)) | set(_COMMAND.findall(s))
    if {"or", "and"} & words:
        return AnswerRejected(NON_UNIQUE, "several answers joined by or/and")
    if commands & {"pm", "mp"} or _PLUS_MINUS_CHARS.search(text):
        return AnswerRejected(NON_UNIQUE, "a \\pm answer")
    if commands & _INTERVAL_COMMANDS or _INTERVAL_CHARS.search(text) or _INTERVAL_CHARS.search(s):
        return AnswerRejected(INTERVAL, "an interval, inequality or set")
    top, bracketed = _top_level_separators(s)
    if bracketed:
        return AnswerRejected(INTERVAL, "a bracketed pair")
    if top or r"\{" in s:
        return AnswerRejected(NON_UNIQUE, "a list or set of answers")
    if words or commands & _TEXT_COMMANDS:
        return AnswerRejected(TEXT, "words in the answer")
    if re.search(r"[A-Za-z]", _COMMAND.sub(" ", s)) and not re.search(r"\d", s):
        return AnswerRejected(TEXT, "letters without numbers")
    if _NUMBER_BEFORE_FRAC.search(s):
        return AnswerRejected(NON_UNIQUE, "a number next to a fraction (mixed number or product?)")
    return None


def classify_answer(text: str) -> ClosedForm:
    """The exact value of an answer, or `AnswerRejected` saying why it has none."""
    s = normalize_answer(text)
    if THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    rejected = _drop_reason(text, s)
    if rejected is not None:
        raise rejected
    try:
        tree = parse_answer(s)
    except AnswerParseError as e:
        unsupported = sorted(set(_COMMAND.findall(s)) & _UNSUPPORTED_COMMANDS)
        if unsupported:
            raise AnswerRejected(UNSUPPORTED, f"\\{unsupported[0]}") from None
        raise AnswerRejected(PARSE_FAILURE, str(e)) from None
    try:
        return closed_form(tree)
    except UnsupportedForm as e:
        raise AnswerRejected(UNSUPPORTED, str(e)) from None
    except ZeroDivisionError:
        raise AnswerRejected(PARSE_FAILURE, "division by zero") from None


def closed_form(node) -> ClosedForm:
    """The `ClosedForm` of a `reward.latex_parser` tree; `UnsupportedForm` for anything
    outside rationals, square roots and pi; `AnswerRejected` for variables, equations,
    sets and intervals."""
    kind = node[0]
    if kind == "num":
        return ClosedForm.rational(node[1])
    if kind == "add":
        value = closed_form(node[1][0])
        for term in node[1][1:]:
            value = value + closed_form(term)
        return value
    if kind == "mul":
        value = closed_form(node[1][0])
        for factor in node[1][1:]:
            value = value * closed_form(factor)
        return value
    if kind == "neg":
        return -closed_form(node[1])
    if kind == "div":
        return closed_form(node[1]) / closed_form(node[2])
    if kind == "pow":
        exponent = closed_form(node[2])
        if not exponent.is_integer():
            raise UnsupportedForm("a non-integer exponent")
        return closed_form(node[1]).power(int(exponent.as_fraction()))
    if kind == "sqrt":
        if node[2] is not None and closed_form(node[2]) != ClosedForm.rational(2):
            raise UnsupportedForm("a root other than the square root")
        return closed_form(node[1]).sqrt()
    if kind == "const":
        if node[1] == "pi":
            return ClosedForm.pi()
        if node[1] == "oo":
            raise AnswerRejected(INTERVAL, "infinity")
        raise UnsupportedForm(f"the constant {node[1]}")
    if kind == "sym":
        if node[1] in ("e", "i"):
            raise UnsupportedForm(f"the constant {node[1]}")
        raise AnswerRejected(PARSE_FAILURE, f"the variable {node[1]!r}")
    if kind == "func":
        raise UnsupportedForm(f"\\{node[1]}")
    if kind in ("union", "tuple"):
        raise AnswerRejected(INTERVAL, "an interval or tuple")
    if kind in ("set", "list"):
        raise AnswerRejected(NON_UNIQUE, "a list or set of answers")
    if kind == "eq":
        raise AnswerRejected(PARSE_FAILURE, "an equation")
    raise UnsupportedForm({"fact": "a factorial", "abs": "an absolute value",
                           "binom": "a binomial coefficient"}.get(kind, kind))
