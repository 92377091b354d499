"""The canonical integer-answer form of a closed-form value (DAPO-Math-17K's rewrite).

A value  sum c * sqrt(r) * pi^p  is written in one canonical way, and every positive
integer in that writing becomes a named parameter:

- terms without pi form one group and terms with pi another; each group is put over the
  lowest common denominator of its coefficients (so \\frac{4}{6} becomes 2/3, and
  gcd(numerator coefficients, denominator) = 1); radicands are square-free;
- inside a group the positive terms come first, then the negative ones, each by radicand;
  a group whose terms are all negative takes the minus sign outside its fraction;
- the group led by a positive term comes first (ties: the group without pi);
- a coefficient 1 in front of \\sqrt or \\pi is not written (and is no parameter), unless
  the form would then have no parameter at all (the value pi itself).

The problem's answer becomes the sum of the parameters: 11-2\\sqrt{6} is "k-m\\sqrt{n}",
(k, m, n) = (11, 2, 6), answer 19.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import lcm

from dapo_megatron.data.closed_form import ClosedForm, UnsupportedForm

LETTERS = "kmnpqrstuvwabcdfgh"  # skips e, i, l, o, x, y, z: constants and look-alikes
MAX_PARAMETERS = 12

KINDS = ("fraction", "radical", "radical_fraction", "pi", "pi_fraction", "sum")


@dataclass(frozen=True)
class AnswerForm:
    """A canonical form: ``template`` names its parameters, ``values`` are theirs.

    template: LaTeX with parameter letters, e.g. ``\\frac{k+\\sqrt{m}}{n}``.
    kind: one of KINDS (summary statistics only).
    radicands / denominators: the names that are square-free / fraction denominators.
    """

    kind: str
    template: str
    names: tuple[str, ...]
    values: tuple[int, ...]
    radicands: tuple[str, ...]
    denominators: tuple[str, ...]
    _slots: tuple = ()  # the template as text pieces and parameter positions

    @property
    def integer(self) -> int:
        """The new answer: the sum of the parameters."""
        return sum(self.values)

    def instantiate(self) -> str:
        """The template with the parameter values put in: the canonical LaTeX answer."""
        return "".join(str(self.values[p]) if isinstance(p, int) else p for p in self._slots)

    def parameters(self) -> dict[str, int]:
        return dict(zip(self.names, self.values))

    def sentence(self, state_conditions: bool = False) -> str:
        """The sentence appended to the problem, in DAPO-Math-17K's wording."""
        names = list(self.names)
        if len(names) == 1:
            who = f"{names[0]} is an integer"
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]} are integers"
        else:
            who = ", ".join(names[:-1]) + f", and {names[-1]} are integers"
        text = (f"The original answer is in the form {self.template}, where {who}. "
                f"Please find the value of {'+'.join(names)}.")
        if state_conditions:
            text += self._conditions()
        return text

    def _conditions(self) -> str:
        parts = []
        if self.radicands:
            r = list(self.radicands)
            joined = r[0] if len(r) == 1 else ", ".join(r[:-1]) + f" and {r[-1]}"
            parts.append(f"{joined} {'is' if len(r) == 1 else 'are'} square-free")
        if self.denominators:
            parts.append("the fraction is in lowest terms" if len(self.denominators) == 1
                         else "the fractions are in lowest terms")
        return (" Here " + " and ".join(parts) + ".") if parts else ""


def _group_terms(value: ClosedForm, pi_power: int) -> list[tuple[int, Fraction]]:
    return sorted((r, c) for (r, p), c in value.terms.items() if p == pi_power)


def build_form(value: ClosedForm) -> AnswerForm:
    """The canonical form of a non-integer value; raises UnsupportedForm when too long."""
    if value.is_integer():
        raise ValueError("an integer answer needs no form")
    groups = []
    for pi_power in (0, 1):
        terms = _group_terms(value, pi_power)
        if not terms:
            continue
        d = lcm(*(c.denominator for _, c in terms))
        nums = [(r, int(c * d)) for r, c in terms]
        nums = [t for t in nums if t[1] > 0] + [t for t in nums if t[1] < 0]
        all_negative = nums[0][1] < 0
        groups.append((all_negative, pi_power, nums, d))
    groups.sort(key=lambda g: (g[0], g[1]))
    pieces = _render(groups, force_coefficient=False)
    if not any(isinstance(p, tuple) for p in pieces):
        pieces = _render(groups, force_coefficient=True)  # the value is +-pi
    return _named(_kind(value, groups), pieces)


def _render(groups, force_coefficient: bool) -> list:
    """Template pieces: str, or (value, role) for a parameter; role in const|coef|radicand|den."""
    out: list = []
    first = True
    for all_negative, pi_power, nums, d in groups:
        factored = d > 1 and all_negative  # -(a+b)/d rather than (-a-b)/d
        if d > 1:
            out.append("-" if factored else ("" if first else "+"))
            out.append(r"\frac{")
            first_in = True
        else:
            first_in = first
        for r, a in nums:
            if factored:
                a = -a
            out.append("-" if a < 0 else ("" if first_in else "+"))
            first_in = False
            is_constant = r == 1 and pi_power == 0
            if is_constant or abs(a) != 1 or force_coefficient:
                out.append((abs(a), "const" if is_constant else "coef"))
            if r > 1:
                out += [r"\sqrt{", (r, "radicand"), "}"]
            if pi_power:
                out.append(r"\pi")
        if d > 1:
            out += ["}{", (d, "den"), "}"]
        first = False
    return out


def _named(kind: str, pieces: list) -> AnswerForm:
    params = [p for p in pieces if isinstance(p, tuple)]
    if len(params) > MAX_PARAMETERS:
        raise UnsupportedForm(f"{len(params)} parameters (more than {MAX_PARAMETERS})")
    letters = "mn" if len(params) == 2 else LETTERS
    names, values, radicands, dens, slots, template = [], [], [], [], [], []
    for piece in pieces:
        if isinstance(piece, str):
            slots.append(piece)
            template.append(piece)
            continue
        value, role = piece
        name = letters[len(names)]
        slots.append(len(names))
        template.append(name)
        names.append(name)
        values.append(value)
        if role == "radicand":
            radicands.append(name)
        elif role == "den":
            dens.append(name)
    return AnswerForm(kind, "".join(template), tuple(names), tuple(values), tuple(radicands),
                      tuple(dens), tuple(slots))


def _kind(value: ClosedForm, groups) -> str:
    if value.is_rational():
        return "fraction"
    has_pi = any(p == 1 for _, p in value.terms)
    has_root = any(r > 1 for r, _ in value.terms)
    if not has_pi:
        return "radical" if all(d == 1 for *_, d in groups) else "radical_fraction"
    if not has_root and len(groups) == 1:
        return "pi" if groups[0][3] == 1 else "pi_fraction"
    return "sum"
