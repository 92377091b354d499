"""String normalisation of answers before any parsing.

Removes presentation that does not change the value: math delimiters (``$``, ``\\(``),
``\\left``/``\\right`` and spacing commands, ``\\text{}``-style wrappers (unit words after
a number are dropped), degree signs, dollar and percent signs, trailing full stops,
``x =`` prefixes, ``\\dfrac``/``\\tfrac`` (become ``\\frac``) and a few Unicode forms of
maths symbols. The result is compared as a string first, then parsed
(``latex_parser``). All passes are linear-time regex substitutions on inputs that are
already bounded in length by the caller.
"""

from __future__ import annotations

import re

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ", "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221e": "\\infty ",
    "\u221a": "\\sqrt", "\u222a": "\\cup ", "\u00b0": "", "\u00a0": " ",
    "\u2009": " ", "\u202f": " ", "\uff0c": ",",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))

# Commands that only change spacing or size; removed outright.
_DROP_CMDS = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg"
    r"|displaystyle|textstyle|limits|quad|qquad|middle)(?![a-zA-Z])"
    r"|(?<!\\)\\[,;:! ]|~"
)
_DELIMS = re.compile(r"\\\[|\\\]|\\\(|\\\)|\$")
_FRAC_ALIASES = re.compile(r"\\[dt]frac(?![a-zA-Z])|\\cfrac(?![a-zA-Z])")
_BINOM_ALIASES = re.compile(r"\\[dt]binom(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])")
_MONEY_PERCENT = re.compile(r"\\\$|\\%|%")
# "\text{ and }" / " or " separate several answers: make them commas.
_CONJUNCTIONS = re.compile(
    r"\s*\\(?:text|mbox|textrm|mathrm)\s*\{\s*(?:and|or|,)\s*\}\s*|\s+(?:and|or)\s+"
)
# A letters-only \text{...} right after a number or closing bracket is a unit or a
# label ("5\text{ cm}^2", "30\text{ degrees}"): dropped with an optional ^2/^3.
_UNIT_TEXT = re.compile(
    r"(?<=[\d})\]])\s*\\(?:text|mbox|textrm|textnormal)\s*\{\s*[A-Za-z][A-Za-z .]*\}"
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
)
_WRAPPERS = re.compile(
    r"\\(?:text|mbox|textrm|textnormal|textbf|textit|mathrm|mathbf|mathit|mathsf"
    r"|mathnormal|operatorname|boldsymbol|bm)\s*\{([^{}]*)\}"
)
_UNIT_WORDS = (
    "square units|sq units|square feet|square inches|square meters|square centimeters|"
    "cubic units|cubic feet|cubic inches|cubic meters|cubic centimeters|units|unit|"
    "degrees|degree|dollars|dollar|cents|cent|centimeters|centimeter|meters|meter|"
    "kilometers|kilometer|millimeters|inches|inch|feet|foot|miles|mile|mph|km|cm|mm|ft|"
    "minutes|minute|mins|hours|hour|hrs|seconds|second|days|day|weeks|years|"
    "pounds|lbs|kg|grams|liters|percent|ways|students|people|points"
)
_TRAILING_UNIT = re.compile(
    r"(?<=[\d})\]])\s*(?:" + _UNIT_WORDS + r")(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$"
)
_ANSWER_IS = re.compile(
    r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*|^final\s+answer\s*:\s*", re.IGNORECASE
)
_BOXED_WRAP = re.compile(r"^\\(?:boxed|fbox)\s*\{(.*)\}$", re.DOTALL)
# "x = 5", "x_1=5", "f(x) = ..." prefixes: dropped when the rest holds no other "=".
_VAR_PREFIX = re.compile(
    r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)\s*(?:\(\s*[a-z]\s*\))?\s*(?:=|\\in(?![a-zA-Z]))\s*"
)
# "0.\overline{3}", "1.2\overline{45}": repeating decimals, rewritten as exact fractions.
_REPEATING = re.compile(r"(-?)(\d{0,30})\.(\d{0,30})\\overline\s*\{(\d{1,20})\}")
_PLUS_MINUS = re.compile(r"\\pm(?![a-zA-Z])")
_SPACES = re.compile(r"\s+")
# "1 000 000" (thin-space thousands, after "\," became a space): one number.
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?: \d{3})+)(?![\d.])")
THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_answer(text: str) -> str:
    """Normalise an answer string (see module docstring). Returns '' for blank input."""
    s = text.strip()
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)
    s = _ANSWER_IS.sub("", s)
    s = _DELIMS.sub(" ", s)
    s = s.strip()
    for _ in range(4):  # "\boxed{5}.", "\boxed{\boxed{5}}"
        boxed = _BOXED_WRAP.match(s.rstrip(".").rstrip())
        if not boxed:
            break
        s = boxed.group(1).strip()
    s = _DROP_CMDS.sub(" ", s)
    s = s.replace("{,}", "")  # LaTeX thousands separator 1{,}000
    s = _FRAC_ALIASES.sub(r"\\frac", s)
    s = _BINOM_ALIASES.sub(r"\\binom", s)
    s = _DEGREES.sub("", s)
    s = _MONEY_PERCENT.sub("", s)
    s = _CONJUNCTIONS.sub(",", s)
    s = _UNIT_TEXT.sub("", s)
    for _ in range(3):  # nested wrappers such as \mathbf{\text{x}}
        s, n = _WRAPPERS.subn(r"\1", s)
        if not n:
            break
    s = _TRAILING_UNIT.sub("", s.strip())
    s = s.strip().rstrip(".").strip()
    s = _REPEATING.sub(_repeating_to_fraction, s)
    if s.count("=") == 1 or "\\in" in s:
        s = _VAR_PREFIX.sub("", s, count=1)
    elif s.count("=") > 1 and "," in s:
        # "x=1, y=2" / "x=1, x=2": one assignment per item, keep the values.
        parts = s.split(",")
        if all(p.count("=") == 1 and _VAR_PREFIX.match(p) for p in parts):
            s = ",".join(_VAR_PREFIX.sub("", p, count=1) for p in parts)
    s = _SPACES.sub(" ", s).strip()
    s = _SPACED_THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(" ", ""), s)
    if len(_PLUS_MINUS.findall(s)) == 1 and "," not in s:
        # "a \pm b" names two answers: the list "a + b, a - b".
        s = f"{_PLUS_MINUS.sub('+', s)}, {_PLUS_MINUS.sub('-', s)}"
    return s


def _repeating_to_fraction(m: re.Match) -> str:
    sign, whole, fixed, period = m.groups()
    # whole.fixed(period)... = (digits through one period - digits before it) / (99..9 00..0)
    scale = 10 ** len(fixed)
    head = int((whole or "0") + fixed)
    full = int((whole or "0") + fixed + period)
    num = full - head
    den = (10 ** len(period) - 1) * scale
    return f"{sign}\\frac{{{num}}}{{{den}}}"


def compact(text: str) -> str:
    """The normalised string without any whitespace, for exact string comparison."""
    return _SPACES.sub("", text)
