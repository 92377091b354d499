"""A restricted LaTeX reader for final answers: text in, exact `ClosedForm` or a reason out.

Only this grammar is accepted (no Python evaluation of any kind touches the text):

    expr   := ['+'|'-'] term (('+'|'-') term)*
    term   := power (('*'|'/') factor | power)*     # juxtaposition multiplies: 2\\sqrt{3}\\pi
    factor := ('+'|'-') factor | power
    power  := atom ['^' (number | '{' expr '}')]     # integer exponents only
    atom   := number | '(' expr ')' | '{' expr '}' | \\frac arg arg | \\sqrt ['[2]'] arg | \\pi
    arg    := '{' expr '}' | one digit | \\pi         # TeX's \\frac12, \\sqrt2

A bare number next to \\frac (2\\frac{1}{2}: a mixed number to a person, a product to
TeX) is ambiguous and rejected. Anything else is rejected with one of the drop reasons
below, checked in this order.
"""

from __future__ import annotations

import re
from fractions import Fraction

from dapo_megatron.data.closed_form import ClosedForm, UnsupportedForm

NON_UNIQUE = "non_unique"  # several answers: lists, \pm, "or", sets
INTERVAL = "interval"  # intervals, unions, inequalities, infinity
TEXT = "text"  # words, \text{...}, multiple-choice letters
PARSE_FAILURE = "parse_failure"  # variables, unknown commands, broken syntax
UNSUPPORTED = "unsupported_form"  # well-formed, but not a supported closed form
DROP_REASONS = (NON_UNIQUE, INTERVAL, TEXT, PARSE_FAILURE, UNSUPPORTED)

MAX_ANSWER_CHARS = 300
MAX_NESTING = 40


class AnswerRejected(ValueError):
    """The answer is not a single supported closed form; ``reason`` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00b7": r"\cdot ", "\u00d7": r"\times ", "\u03c0": r"\pi ",
    "\u221a": r"\sqrt", "\u221e": r"\infty ", "\u00b1": r"\pm ", "\u2213": r"\mp ",
    "\u2264": r"\le ", "\u2265": r"\ge ", "\u00b0": r"^\circ", "\u222a": r"\cup ",
}
_DROPPED_COMMANDS = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|displaystyle|textstyle|quad|qquad)(?![A-Za-z])"
    r"|\\[,;:! ]|~"
)
_TEXT_COMMANDS = ("text", "textbf", "textrm", "textit", "mathrm", "mathbf", "mbox", "operatorname")
_TEXT_WRAPPER = re.compile(r"\\(?:" + "|".join(_TEXT_COMMANDS) + r")\s*\{([^{}]*)\}")
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INTERVAL_COMMANDS = {"infty", "cup", "cap", "le", "ge", "leq", "geq", "lt", "gt", "leqslant",
                      "geqslant", "in", "emptyset", "varnothing", "setminus"}


def _unwrap(s: str, opener: str) -> str | None:
    """The inside of ``opener{...}`` when that group spans the whole string."""
    if not s.startswith(opener + "{") or not s.endswith("}"):
        return None
    depth = 0
    for i, ch in enumerate(s[len(opener):], start=len(opener)):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return s[len(opener) + 1 : -1] if i == len(s) - 1 else None
    return None


def clean_answer(text: str) -> str:
    """Strip the wrapping that does not change an answer's value.

    Dollar signs, \\(...\\), \\boxed{...}, \\left/\\right, spacing commands, degree signs,
    percent and currency signs, trailing periods, \\text around a number; \\dfrac and
    \\tfrac become \\frac, \\cdot and \\times become '*', thousands separators go.
    """
    s = text
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = s.strip()
    for _ in range(8):  # wrappers can nest: $\boxed{...}$
        before = s
        s = s.strip().rstrip(".").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        for left, right in ((r"\(", r"\)"), (r"\[", r"\]")):
            if s.startswith(left) and s.endswith(right):
                s = s[2:-2]
        for opener in (r"\boxed", r"\fbox"):
            inner = _unwrap(s, opener)
            if inner is not None:
                s = inner
        if s == before:
            break
    s = _DROPPED_COMMANDS.sub("", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\(?:cdot|times)(?![A-Za-z])", "*", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])", "", s)
    s = s.replace(r"\%", "").replace("%", "").replace(r"\$", "").replace("{,}", ",")
    s = _TEXT_WRAPPER.sub(lambda m: m.group(1) if re.fullmatch(r"[\s\d.,+-]*", m.group(1)) else m.group(0), s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


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


def classify_answer(text: str) -> ClosedForm:
    """The exact value of an answer, or `AnswerRejected` saying why it has none."""
    s = clean_answer(text)
    if not s:
        raise AnswerRejected(PARSE_FAILURE, "empty answer")
    if len(s) > MAX_ANSWER_CHARS:
        raise AnswerRejected(PARSE_FAILURE, f"longer than {MAX_ANSWER_CHARS} characters")
    commands = set(_COMMAND.findall(s))
    words = re.findall(r"[A-Za-z]+", _COMMAND.sub(" ", s))
    if {"or", "and"} & {w.lower() for w in words}:
        raise AnswerRejected(NON_UNIQUE, "several answers joined by or/and")
    if commands & {"pm", "mp"}:
        raise AnswerRejected(NON_UNIQUE, "a \\pm answer")
    if commands & _INTERVAL_COMMANDS or re.search(r"[<>]", s):
        raise AnswerRejected(INTERVAL, "an interval, inequality or set")
    top, bracketed = _top_level_separators(s)
    if bracketed:
        raise AnswerRejected(INTERVAL, "a bracketed pair")
    if top or r"\{" in s:
        raise AnswerRejected(NON_UNIQUE, "a list or set of answers")
    if commands & set(_TEXT_COMMANDS) or any(len(w) > 1 for w in words):
        raise AnswerRejected(TEXT, "words in the answer")
    if words and not re.search(r"\d", s):
        raise AnswerRejected(TEXT, "letters without numbers")
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if re.fullmatch(r"\s*[A-Za-z](?:_\{?\w+\}?)?'*\s*", lhs):
            s = rhs.strip()  # "x = 3": the value is the right-hand side
    try:
        return _Parser(s).parse()
    except UnsupportedForm as e:
        raise AnswerRejected(UNSUPPORTED, str(e)) from None
    except ZeroDivisionError:
        raise AnswerRejected(PARSE_FAILURE, "division by zero") from None


_TOKEN = re.compile(r"\s*(?:(\d+\.\d+|\.\d+|\d+)|\\([A-Za-z]+)|(\\.)|([A-Za-z])|(\S))")
_UNSUPPORTED_COMMANDS = {"log", "ln", "lg", "exp", "sin", "cos", "tan", "cot", "sec", "csc",
                         "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "binom", "choose",
                         "sum", "prod", "int", "lim", "cdots", "ldots", "dots", "overline", "e"}


class _Parser:
    """Recursive descent over tokens (kind, text): kind in num, cmd, sym, letter."""

    def __init__(self, s: str):
        self.tokens: list[tuple[str, str]] = []
        for m in _TOKEN.finditer(s):
            num, cmd, escaped, letter, sym = m.groups()
            if num is not None:
                self.tokens.append(("num", num))
            elif cmd is not None:
                self.tokens.append(("cmd", cmd))
            elif letter is not None:
                self.tokens.append(("letter", letter))
            else:
                self.tokens.append(("sym", escaped or sym))
        self.pos = 0
        self.depth = 0

    def fail(self, detail: str) -> AnswerRejected:
        return AnswerRejected(PARSE_FAILURE, detail)

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise self.fail("unexpected end of answer")
        self.pos += 1
        return tok

    def at(self, *symbols: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "sym" and tok[1] in symbols

    def expect(self, symbol: str) -> None:
        tok = self.take()
        if tok != ("sym", symbol):
            raise self.fail(f"expected {symbol!r}, found {tok[1]!r}")

    def parse(self) -> ClosedForm:
        value = self.expr()
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek()[1]!r}")
        return value

    def expr(self) -> ClosedForm:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.fail("nested too deeply")
        negative = False
        if self.at("+", "-"):
            negative = self.take()[1] == "-"
        value = self.term()
        if negative:
            value = -value
        while self.at("+", "-"):
            op = self.take()[1]
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        self.depth -= 1
        return value

    def term(self) -> ClosedForm:
        start = self.pos
        value = self.power()
        bare_number = self.pos == start + 1 and self.tokens[start][0] == "num"
        if bare_number and self.peek() == ("cmd", "frac"):
            # 2\frac{1}{2}: the mixed number 5/2 to a person, the product 1 to TeX.
            raise AnswerRejected(NON_UNIQUE, "a number next to a fraction (mixed number or product?)")
        while True:
            tok = self.peek()
            if self.at("*"):
                self.take()
                value = value * self.factor()
            elif self.at("/"):
                self.take()
                value = value / self.factor()
            elif tok is not None and (tok in (("sym", "("), ("sym", "{")) or
                                      (tok[0] == "cmd" and tok[1] in ("frac", "sqrt", "pi"))):
                value = value * self.power()  # juxtaposition; never before a bare number
            else:
                return value

    def factor(self) -> ClosedForm:
        if self.at("-"):
            self.take()
            return -self.factor()
        if self.at("+"):
            self.take()
            return self.factor()
        return self.power()

    def power(self) -> ClosedForm:
        base = self.atom()
        if not self.at("^"):
            return base
        self.take()
        if self.at("{"):
            self.take()
            exponent = self.expr()
            self.expect("}")
        elif self.peek() is not None and self.peek()[0] == "num":
            # 2^10 means 1024 to whoever typed it, though TeX would set 2^1 0.
            exponent = ClosedForm.rational(Fraction(self.take()[1]))
        else:
            exponent = self.arg()
        if not exponent.is_integer():
            raise UnsupportedForm("a non-integer exponent")
        return base.power(int(exponent.as_fraction()))

    def arg(self) -> ClosedForm:
        """One TeX argument: a braced group, or a single digit, or \\pi."""
        tok = self.peek()
        if tok is not None and tok[0] == "num":
            self.pos += 1
            if len(tok[1]) > 1:  # \frac12: the argument is the first character only
                self.tokens.insert(self.pos, ("num", tok[1][1:]))
            if not tok[1][0].isdigit():
                raise self.fail(f"bad argument {tok[1]!r}")
            return ClosedForm.rational(int(tok[1][0]))
        if tok == ("cmd", "pi"):
            self.pos += 1
            return ClosedForm.pi()
        self.expect("{")
        value = self.expr()
        self.expect("}")
        return value

    def atom(self) -> ClosedForm:
        kind, text = self.take()
        if kind == "num":
            return ClosedForm.rational(Fraction(text))
        if kind == "sym" and text in "({":
            value = self.expr()
            self.expect(")" if text == "(" else "}")
            return value
        if kind == "cmd":
            if text == "pi":
                return ClosedForm.pi()
            if text == "frac":
                numerator = self.arg()
                return numerator / self.arg()
            if text == "sqrt":
                if self.at("["):
                    self.take()
                    index = self.expr()
                    self.expect("]")
                    if index != ClosedForm.rational(2):
                        raise UnsupportedForm("a root other than the square root")
                return self.arg().sqrt()
            if text in _UNSUPPORTED_COMMANDS:
                raise UnsupportedForm(f"\\{text}")
            raise self.fail(f"unknown command \\{text}")
        if kind == "letter":
            if text in "ei":
                raise UnsupportedForm(f"the constant {text}")
            raise self.fail(f"the variable {text!r}")
        raise self.fail(f"unexpected {text!r}")
