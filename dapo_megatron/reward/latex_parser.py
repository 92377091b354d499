"""A restricted tokenizer and recursive-descent parser for answer strings.

Model text is never handed to Python's or sympy's string evaluators: this module turns a
normalised answer (LaTeX or plain maths) into a small tree of tuples, and the
evaluators (``exact`` without sympy, ``symbolic`` with it) build values from that tree
themselves. Anything outside the grammar raises ``AnswerParseError``.

Tree nodes (tuples, first element is the kind)::

    ("num", Fraction)          ("sym", name)            ("const", "pi"|"E"|"I"|"oo")
    ("add", [node, ...])       ("mul", [node, ...])     ("neg", node)
    ("div", num, den)          ("pow", base, exp)       ("fact", node)
    ("sqrt", node, index|None) ("func", name, node, base|None)   ("abs", node)
    ("binom", n, k)            ("eq", lhs, rhs)         ("union", [node, ...])
    ("tuple", open, [node, ...], close)   ("set", [node, ...])   ("list", [node, ...])

Grammar (loosest binding first): list ``,`` > ``=`` > ``\\cup`` > ``+ -`` >
``* / \\cdot \\times \\div`` and implicit multiplication > unary ``-`` > ``^``
(right-associative) > postfix ``!`` > atoms. Plain-text conventions win where LaTeX
and plain text disagree: ``2^10`` is 2 to the 10th; ``\\frac12`` is one half.

Bounds (``ParseLimits``) are checked before any recursion: answer length, token count,
bracket nesting depth, digits per number literal and runs of letters (four or more
letters are words, compared as text only; ``xyz`` is still a product).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


class AnswerParseError(ValueError):
    """The answer is outside the supported grammar or over a bound."""


@dataclass(frozen=True)
class ParseLimits:
    """Bounds applied to model answers before and while they are evaluated.

    Attributes:
        max_chars: longest normalised answer that is parsed.
        max_tokens: most tokens in one answer.
        max_depth: deepest bracket nesting.
        max_digits: longest number literal.
        max_result_bits: largest integer (numerator/denominator) a power, factorial or
            binomial may produce.
        max_factorial: largest n in n!.
        max_symbolic_exponent: largest |n| in x^n when x is not a number.
        max_items: most elements in a tuple, set or list.
    """

    max_chars: int = 1000
    max_tokens: int = 400
    max_depth: int = 32
    max_digits: int = 200
    max_result_bits: int = 4096
    max_factorial: int = 500
    max_symbolic_exponent: int = 100
    max_items: int = 64


DEFAULT_LIMITS = ParseLimits()

FUNCTIONS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh ln log exp".split()
)
GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda"
    " mu nu xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda"
    " Xi Sigma Phi Psi Omega".split()
)
_MUL_CMDS = frozenset({"cdot", "times", "ast"})
_CMD_ALIASES = {
    "lbrace": "\\{", "rbrace": "\\}", "lvert": "|", "rvert": "|", "vert": "|",
    "lt": "<", "gt": ">", "infin": "infty", "varnothing": "emptyset",
}
_OPS = frozenset("+-*/^_!,=()[]{}|<>")
_ATOM_CMDS = frozenset({"frac", "sqrt", "binom", "pi", "infty"})
_RELATION_CMDS = frozenset({"le", "ge", "leq", "geq", "ne", "neq"})


def _tokenize(text: str, limits: ParseLimits) -> list[tuple[str, str]]:
    """Split ``text`` into (kind, value) tokens; kinds: num, name, cmd, op."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(text)
    letters_run = 0
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            letters_run = 0
            continue
        if c.isascii() and c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            j = i
            while j < n and text[j].isascii() and text[j].isdigit():
                j += 1
            if j < n and text[j] == "." and j + 1 < n and text[j + 1].isdigit():
                j += 1
                while j < n and text[j].isascii() and text[j].isdigit():
                    j += 1
            if j - i > limits.max_digits:
                raise AnswerParseError(f"number literal longer than {limits.max_digits} digits")
            if tokens and tokens[-1][0] == "num":
                # "2 3" is not 6: two numbers in a row are a typo or a list, never a product.
                raise AnswerParseError("two numbers in a row")
            tokens.append(("num", text[i:j]))
            i, letters_run = j, 0
        elif c.isascii() and c.isalpha():
            letters_run += 1
            if letters_run >= 4:
                raise AnswerParseError("answer contains words, compared as text only")
            tokens.append(("name", c))
            i += 1
        elif c == "\\":
            j = i + 1
            while j < n and text[j].isascii() and text[j].isalpha():
                j += 1
            if j == i + 1:
                if j < n and text[j] in "{}":
                    tokens.append(("op", "\\" + text[j]))
                    i = j + 1
                elif j < n and text[j] == "|":
                    tokens.append(("op", "|"))
                    i = j + 1
                else:
                    raise AnswerParseError(f"unsupported escape at character {i}")
            else:
                name = text[i + 1 : j]
                alias = _CMD_ALIASES.get(name, name)
                if alias in ("\\{", "\\}", "|", "<", ">"):
                    tokens.append(("op", alias))
                else:
                    tokens.append(("cmd", alias))
                i = j
            letters_run = 0
        elif c in _OPS:
            tokens.append(("op", c))
            i += 1
            letters_run = 0
        else:
            raise AnswerParseError(f"unsupported character {c!r} at {i}")
        if len(tokens) > limits.max_tokens:
            raise AnswerParseError(f"answer has more than {limits.max_tokens} tokens")
    return tokens


def _check_nesting(text: str, limits: ParseLimits) -> None:
    depth = 0
    for c in text:
        if c in "([{":
            depth += 1
            if depth > limits.max_depth:
                raise AnswerParseError(f"brackets nested deeper than {limits.max_depth}")
        elif c in ")]}":
            depth -= 1


def _number(literal: str) -> Fraction:
    # Exact: "0.125" is 1/8, never a binary float.
    if "." in literal:
        whole, frac = literal.split(".")
        return Fraction(int(whole or "0") * 10 ** len(frac) + int(frac), 10 ** len(frac))
    return Fraction(int(literal))


def _is_proper_fraction(node) -> bool:
    if node[0] != "div" or node[1][0] != "num" or node[2][0] != "num":
        return False
    num, den = node[1][1], node[2][1]
    return num.denominator == den.denominator == 1 and 0 < num < den


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], limits: ParseLimits):
        self.toks = tokens
        self.pos = 0
        self.depth = 0
        self.limits = limits

    # -- token helpers -------------------------------------------------------------
    def peek(self, offset: int = 0) -> tuple[str, str]:
        k = self.pos + offset
        return self.toks[k] if k < len(self.toks) else ("end", "")

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        self.pos += 1
        return tok

    def at(self, kind: str, value: str | None = None) -> bool:
        k, v = self.peek()
        return k == kind and (value is None or v == value)

    def expect(self, kind: str, value: str) -> None:
        if not self.at(kind, value):
            got = self.peek()[1]
            raise AnswerParseError(f"expected {value!r} at token {self.pos}, got {got!r}")
        self.pos += 1

    # -- grammar ---------------------------------------------------------------------
    def parse(self):
        node = self.items()
        if not self.at("end"):
            raise AnswerParseError(f"unexpected {self.peek()[1]!r} at token {self.pos}")
        return node

    def items(self):
        first = self.relation()
        if not self.at("op", ","):
            return first
        out = [first]
        while self.at("op", ","):
            self.take()
            out.append(self.relation())
            if len(out) > self.limits.max_items:
                raise AnswerParseError(f"more than {self.limits.max_items} items")
        return ("list", out)

    def relation(self):
        lhs = self.union()
        if self.at("op", "="):
            self.take()
            return ("eq", lhs, self.union())
        if self.at("op", "<") or self.at("op", ">") or self.peek()[1] in _RELATION_CMDS:
            raise AnswerParseError("inequalities are compared as text only")
        return lhs

    def union(self):
        first = self.additive()
        if not self.at("cmd", "cup"):
            return first
        out = [first]
        while self.at("cmd", "cup"):
            self.take()
            out.append(self.additive())
        return ("union", out)

    def additive(self):
        terms = [self.term()]
        while True:
            if self.at("op", "+"):
                self.take()
                terms.append(self.term())
            elif self.at("op", "-"):
                self.take()
                terms.append(("neg", self.term()))
            elif self.at("cmd", "pm") or self.at("cmd", "mp"):
                raise AnswerParseError("\\pm answers are compared as text only")
            else:
                break
        return terms[0] if len(terms) == 1 else ("add", terms)

    def _starts_atom(self) -> bool:
        kind, val = self.peek()
        if kind in ("num", "name"):
            return True
        if kind == "op":
            return val in ("(", "{", "\\{")
        if kind == "cmd":
            return val in _ATOM_CMDS or val in FUNCTIONS or val in GREEK
        return False

    def term(self):
        factors = [self.unary()]
        while True:
            kind, val = self.peek()
            if (kind == "op" and val == "*") or (kind == "cmd" and val in _MUL_CMDS):
                self.take()
                factors.append(self.unary())
            elif (kind == "op" and val == "/") or (kind == "cmd" and val == "div"):
                self.take()
                num = factors[0] if len(factors) == 1 else ("mul", factors)
                factors = [("div", num, self.unary())]
            elif self._starts_atom():
                mixed = (len(factors) == 1 and self.at("cmd", "frac")
                         and self.toks[self.pos - 1][0] == "num")
                factor = self.power()
                if mixed and _is_proper_fraction(factor):
                    # 4\frac{1}{2} is the mixed number 9/2 (competition convention).
                    whole = factors[0]
                    sign, whole = (-1, whole[1]) if whole[0] == "neg" else (1, whole)
                    if whole[0] == "num" and whole[1].denominator == 1:
                        value = whole[1] + factor[1][1] / factor[2][1]
                        factors = [("num", value) if sign > 0 else ("neg", ("num", value))]
                        continue
                factors.append(factor)
            else:
                break
        return factors[0] if len(factors) == 1 else ("mul", factors)

    def _enter(self) -> None:
        # Every recursive path (brackets, signs, exponent chains, macro arguments) passes
        # through unary() or atom(): one counter bounds them before Python's stack does.
        self.depth += 1
        if self.depth > 4 * self.limits.max_depth:
            raise AnswerParseError(f"expression nested deeper than {4 * self.limits.max_depth}")

    def unary(self):
        self._enter()
        try:
            if self.at("op", "-"):
                self.take()
                return ("neg", self.unary())
            if self.at("op", "+"):
                self.take()
                return self.unary()
            return self.power()
        finally:
            self.depth -= 1

    def power(self):
        base = self.postfix()
        if self.at("op", "^"):
            self.take()
            return ("pow", base, self.unary())
        return base

    def postfix(self):
        node = self.atom()
        while self.at("op", "!"):
            self.take()
            node = ("fact", node)
        return node

    def group(self, close: str):
        node = self.items()
        self.expect("op", close)
        return node

    def arg(self):
        """A LaTeX macro argument: ``{...}`` or a single digit/letter/command."""
        kind, val = self.peek()
        if kind == "op" and val == "{":
            self.take()
            return self.group("}")
        if kind == "num":
            if len(val) > 1 and "." not in val:
                # \frac12: LaTeX takes one digit; leave the rest as the next token.
                self.toks[self.pos] = ("num", val[1:])
                return ("num", Fraction(int(val[0])))
            self.take()
            return ("num", _number(val))
        return self.postfix()

    def atom(self):
        self._enter()
        try:
            return self._atom()
        finally:
            self.depth -= 1

    def _atom(self):
        kind, val = self.take()
        if kind == "num":
            return ("num", _number(val))
        if kind == "name":
            return self.subscripted(val)
        if kind == "op":
            if val in ("(", "["):
                inner = self.items()
                close = self.take()
                if close[1] not in (")", "]"):
                    raise AnswerParseError(f"unclosed {val!r}")
                if inner[0] == "list":
                    return ("tuple", val, inner[1], close[1])
                if val + close[1] not in ("()", "[]"):
                    raise AnswerParseError(f"mismatched {val}{close[1]}")
                return inner
            if val == "{":
                inner = self.group("}")
                return ("set", inner[1]) if inner[0] == "list" else inner
            if val == "\\{":
                if self.at("op", "\\}"):
                    self.take()
                    return ("set", [])
                inner = self.group("\\}")
                return ("set", inner[1] if inner[0] == "list" else [inner])
            if val == "|":
                inner = self.additive()
                self.expect("op", "|")
                return ("abs", inner)
            raise AnswerParseError(f"unexpected {val!r}")
        if kind == "cmd":
            return self.command(val)
        raise AnswerParseError("answer ended early")

    def subscripted(self, name: str):
        if not self.at("op", "_"):
            return ("sym", name)
        self.take()
        kind, val = self.take()
        if kind == "op" and val == "{":
            parts = []
            while not self.at("op", "}"):
                k, v = self.take()
                if k not in ("num", "name"):
                    raise AnswerParseError("unsupported subscript")
                parts.append(v)
            self.take()
            val = "".join(parts)
        elif kind not in ("num", "name"):
            raise AnswerParseError("unsupported subscript")
        return ("sym", f"{name}_{val}")

    def command(self, name: str):
        if name == "frac":
            return ("div", self.arg(), self.arg())
        if name == "binom":
            return ("binom", self.arg(), self.arg())
        if name == "sqrt":
            index = None
            if self.at("op", "["):
                self.take()
                index = self.additive()
                self.expect("op", "]")
            return ("sqrt", self.arg(), index)
        if name == "pi":
            return ("const", "pi")
        if name == "infty":
            return ("const", "oo")
        if name == "emptyset":
            return ("set", [])
        if name in GREEK:
            return ("sym", name)
        if name in FUNCTIONS:
            return self.function(name)
        raise AnswerParseError(f"unsupported command \\{name}")

    def function(self, name: str):
        base = None
        if name == "log" and self.at("op", "_"):
            self.take()
            base = self.arg()
        exponent = None
        if self.at("op", "^"):  # \sin^2 x
            self.take()
            exponent = self.arg()
        if self.at("op", "("):
            self.take()
            argument = self.group(")")
        elif self.at("op", "{"):
            self.take()
            argument = self.group("}")
        else:
            # \sin 2x: the argument runs over an implicit product of simple factors.
            factors = [self.power()]
            while self.peek()[0] in ("num", "name"):
                factors.append(self.power())
            argument = factors[0] if len(factors) == 1 else ("mul", factors)
        node = ("func", name, argument, base)
        return node if exponent is None else ("pow", node, exponent)


def parse_answer(text: str, limits: ParseLimits = DEFAULT_LIMITS):
    """Parse a normalised answer string into a tree (see module docstring).

    Raises:
        AnswerParseError: the answer is empty, over a bound, or outside the grammar.
    """
    if not text:
        raise AnswerParseError("empty answer")
    if len(text) > limits.max_chars:
        raise AnswerParseError(f"answer longer than {limits.max_chars} characters")
    _check_nesting(text, limits)
    tokens = _tokenize(text, limits)
    return _Parser(tokens, limits).parse()
