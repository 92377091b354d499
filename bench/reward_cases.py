"""Labelled cases for the reward benchmark: (response, ground_truth, expected, category).

Written by hand for this project (not drawn from any dataset). ``expected`` is what a
careful human grader decides: the final answer (DAPO ``Answer:`` line, else the last
``\\boxed{}``) is mathematically equal to the reference. Categories:

- ``int``: integer references (DAPO-Math-17K, AIME) in many surface formats;
- ``int_wrong``: near misses (205 vs 204), right number in the wrong place, hedging;
- ``rational``, ``radical``, ``pi``, ``expression``, ``structure`` (tuples, intervals,
  sets, unions): right and wrong forms;
- ``hard``: less common forms (mixed numbers, repeating decimals, set-builder notation,
  logarithms, scientific notation) added after the verifier was written, kept in even
  where it misses;
- ``no_answer``: nothing to extract;
- ``adversarial``: huge powers, deep nesting, a 1 MB response, Python code, invalid
  UTF-8, answer-spraying; all expected wrong.

``cases()`` is deterministic; ``wrong_answer_categories`` lists those whose expected
label is always False (a false positive there is a reward hack).
"""

from __future__ import annotations

import random

WRONG_ANSWER_CATEGORIES = ("int_wrong", "no_answer", "adversarial")

_REASONING = (
    "Let me work through this carefully. First we set up the equation and simplify "
    "both sides, then we check the boundary cases.\n\n"
)


def _wrap(kind: int, answer: str) -> str:
    """A response whose final answer is ``answer``, in one of several styles."""
    styles = [
        lambda a: f"{_REASONING}So the result follows.\n\nAnswer: {a}",
        lambda a: f"{_REASONING}Therefore the answer is $\\boxed{{{a}}}$.",
        lambda a: f"{_REASONING}Answer: ${a}$",
        lambda a: f"{_REASONING}**Answer:** {a}",
        lambda a: f"{_REASONING}Answer: \\boxed{{{a}}}",
        lambda a: f"{_REASONING}The final answer is \\[\\boxed{{{a}}}\\]",
        lambda a: f"{_REASONING}We get \\boxed{{0}} at first, but that is wrong.\nAnswer: {a}",
    ]
    return styles[kind % len(styles)](answer)


def _add(out, response, gt, expected, category):
    out.append({"response": response, "ground_truth": gt, "expected": expected, "category": category})


def _integer_cases(out, rng):
    numbers = [0, 1, 7, 12, 42, 100, 204, 315, 512, 999, 1000, 2024, 12345, -3, -48, 1000000]
    for k, n in enumerate(numbers):
        gt = str(n)
        for style in range(7):
            _add(out, _wrap(style + k, str(n)), gt, True, "int")
        variants = [f"{n}.", f"x = {n}", f"{n}.0", f"\\frac{{{2 * n}}}{{2}}", f"{n}^\\circ",
                    f"\\${n}", f"{n} \\text{{ cm}}"]
        if abs(n) >= 1000:
            variants += [f"{n:,}", f"{n:,}".replace(",", "{,}"), f"{n:,}".replace(",", "\\,")]
        for v in variants:
            _add(out, _wrap(rng.randrange(7), v), gt, True, "int")
        # near misses and misplaced answers
        for wrong in (n + 1, n - 1, n * 10 if n else 10, -n if n else 5):
            _add(out, _wrap(rng.randrange(7), str(wrong)), gt, False, "int_wrong")
        _add(out, f"We find {n} here. But recheck: \\boxed{{{n + 2}}}", gt, False, "int_wrong")
        _add(out, f"Answer: {n}\nWait, that is wrong.\nAnswer: {n + 3}", gt, False, "int_wrong")
        _add(out, f"\\boxed{{{n}}} is tempting, but\nAnswer: {n - 7}", gt, False, "int_wrong")
        _add(out, f"Answer: {n}x", gt, False, "int_wrong")
    extra = [
        ("2^{10}", "1024", True), ("10!", "3628800", True), ("\\binom{6}{2}", "15", True),
        ("\\sqrt{144}", "12", True), ("3 \\times 7", "21", True), ("1{,}000", "1000", True),
        ("017", "17", True), ("+5", "5", True), ("4.0", "4", True), ("\\dfrac{84}{2}", "42", True),
        ("2^{10}", "1000", False), ("\\sqrt{143}", "12", False), ("\\frac{85}{2}", "42", False),
        ("42.5", "42", False), ("4.01", "4", False), ("1,001", "1000", False),
        ("205", "204", False), ("204.1", "204", False), ("\\pi", "3", False), ("e", "3", False),
    ]
    for pred, gt, expected in extra:
        _add(out, _wrap(rng.randrange(7), pred), gt, expected, "int" if expected else "int_wrong")


def _value_cases(out, rng):
    groups = {
        "rational": [
            ("\\frac{1}{2}", ["1/2", "0.5", "\\frac12", "\\dfrac{1}{2}", "\\tfrac{1}{2}", "\\frac{2}{4}", ".5"],
             ["2", "\\frac{1}{3}", "0.51", "\\frac{2}{1}"]),
            ("-\\frac{3}{4}", ["\\frac{-3}{4}", "-0.75", "-3/4", "\\frac{3}{-4}"], ["\\frac{3}{4}", "-\\frac{4}{3}", "-0.7"]),
            ("\\frac{1}{3}", ["\\frac{2}{6}", "1/3", "\\dfrac13"], ["0.33", "0.333", "\\frac{1}{4}"]),
            ("\\frac{7}{8}", ["0.875", "\\frac{14}{16}", "7/8"], ["\\frac{8}{7}", "0.87", "\\frac{7}{9}"]),
            ("2.5", ["\\frac{5}{2}", "5/2", "2.50"], ["2.4", "\\frac{2}{5}"]),
            ("\\frac{13}{6}", ["\\frac{26}{12}", "13/6"], ["\\frac{13}{5}", "2.16"]),
        ],
        "radical": [
            ("2\\sqrt{3}", ["\\sqrt{12}", "2 \\sqrt 3", "2\\sqrt3", "\\sqrt{3}\\cdot 2"], ["3\\sqrt{2}", "\\sqrt{6}", "2\\sqrt{2}", "4\\sqrt{3}"]),
            ("11-2\\sqrt{6}", ["-2\\sqrt{6}+11", "11 - \\sqrt{24}", "11-2 \\sqrt 6"], ["11+2\\sqrt{6}", "12-2\\sqrt{6}", "11-2\\sqrt{5}"]),
            ("\\frac{\\sqrt{3}}{2}", ["\\frac{1}{2}\\sqrt{3}", "\\sqrt{3}/2", "\\sqrt{\\frac{3}{4}}", "\\frac{3}{2\\sqrt{3}}"], ["\\frac{\\sqrt{2}}{2}", "\\frac{3}{2}", "\\sqrt{3}"]),
            ("\\frac{\\sqrt{2}}{2}", ["\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt2}", "\\sqrt{\\frac12}", "2^{-1/2}"], ["\\sqrt{2}", "\\frac{1}{2}", "\\frac{\\sqrt{3}}{2}"]),
            ("3+2\\sqrt{2}", ["(1+\\sqrt{2})^2", "2\\sqrt{2}+3", "\\left(1+\\sqrt2\\right)^{2}"], ["3-2\\sqrt{2}", "(1+\\sqrt{3})^2"]),
            ("\\sqrt[3]{2}", ["2^{1/3}", "2^{\\frac{1}{3}}"], ["\\sqrt{2}", "2^{1/2}"]),
            ("5\\sqrt{5}", ["\\sqrt{125}", "125^{1/2}"], ["5\\sqrt{3}", "\\sqrt{120}"]),
            ("\\frac{1+\\sqrt{5}}{2}", ["\\frac{\\sqrt5+1}{2}", "0.5+0.5\\sqrt{5}"], ["\\frac{1-\\sqrt{5}}{2}", "1.618"]),
        ],
        "pi": [
            ("2\\pi", ["2 \\pi", "\\pi \\cdot 2", "\\frac{4\\pi}{2}", "2\\cdot\\pi"], ["\\pi", "4\\pi", "2\\pi^2", "6.28"]),
            ("\\frac{4\\pi}{3}", ["4\\pi/3", "\\frac{4}{3}\\pi", "\\dfrac{4\\pi}{3}"], ["\\frac{3\\pi}{4}", "\\frac{4}{3}"]),
            ("6\\pi-9\\sqrt{3}", ["-9\\sqrt{3}+6\\pi", "3(2\\pi-3\\sqrt{3})"], ["6\\pi+9\\sqrt{3}", "6\\pi-9\\sqrt{2}"]),
            ("\\frac{\\pi}{6}", ["\\pi/6", "\\frac{1}{6}\\pi", "\\frac{\\pi}{6}"], ["\\frac{\\pi}{3}", "30"]),
            ("100\\pi", ["100 \\pi", "\\pi \\times 100"], ["10\\pi", "100"]),
        ],
        "expression": [
            ("x^2+2x+1", ["(x+1)^2", "1+2x+x^2", "(1+x)(x+1)"], ["x^2+1", "(x-1)^2", "x^2+2x"]),
            ("2x+3", ["3+2x", "2 x + 3", "x+x+3"], ["2x-3", "3x+2"]),
            ("\\frac{x+1}{x-1}", ["(x+1)/(x-1)", "\\frac{1+x}{x-1}", "\\frac{-x-1}{1-x}"], ["\\frac{x-1}{x+1}", "x+1"]),
            ("y=2x+3", ["y = 3 + 2x", "y=2x+3"], ["y=3x+2", "y=2x-3"]),
            ("a^2b", ["b a^2", "a \\cdot a \\cdot b"], ["ab^2", "a^2"]),
            ("\\sin^2 x", ["(\\sin x)^2", "1-\\cos^2 x"], ["\\sin x", "\\cos^2 x"]),
            ("x^2+y^2=25", ["y^2+x^2=25", "x^2 + y^2 = 25"], ["x^2+y^2=5", "x^2-y^2=25"]),
            ("3+4i", ["4i+3", "3 + 4 i"], ["3-4i", "4+3i"]),
        ],
        "structure": [
            ("(1,2)", ["(1, 2)", "\\left(1,2\\right)", "( 1 , 2 )"], ["(2,1)", "[1,2]", "(1,2,3)", "1"]),
            ("(\\frac{1}{2}, 3)", ["(0.5, 3)", "\\left(\\frac12,3\\right)"], ["(3, 0.5)", "(0.5, 3.5)"]),
            ("[2,5)", ["[2, 5)", "\\left[2,5\\right)"], ["(2,5)", "[2,5]", "[2,6)"]),
            ("(-\\infty, 3]", ["(-\\infty,3]", "\\left(-\\infty, 3\\right]"], ["(-\\infty,3)", "(3,\\infty)", "[3,\\infty)"]),
            ("(-\\infty,-1)\\cup(1,\\infty)", ["(1,\\infty)\\cup(-\\infty,-1)", "(-\\infty, -1) \\cup (1, \\infty)"],
             ["(-1,1)", "(-\\infty,-1]\\cup[1,\\infty)", "(-\\infty,1)\\cup(1,\\infty)"]),
            ("\\{1,2,3\\}", ["\\{3,2,1\\}", "1, 2, 3", "3, 1, 2", "\\left\\{1,2,3\\right\\}"], ["\\{1,2\\}", "1,2,4", "\\{1,2,3,4\\}"]),
            ("1, 2", ["2, 1", "1,2", "1 \\text{ and } 2"], ["1", "1, 3", "1, 2, 3"]),
            ("(3, -\\frac{1}{2})", ["(3, -0.5)", "\\left(3,-\\frac{1}{2}\\right)"], ["(-0.5, 3)", "(3, 0.5)"]),
            ("2, -\\sqrt{2}, \\sqrt{2}", ["\\sqrt2, -\\sqrt2, 2", "-\\sqrt{2}, \\sqrt{2}, 2"], ["2, \\sqrt{2}", "2, 2, \\sqrt{2}"]),
        ],
        # Forms written after the verifier was built, kept even where it misses (honesty).
        "hard": [
            ("\\frac{9}{2}", ["4\\frac{1}{2}", "4.5"], ["4\\frac{1}{3}"]),
            ("\\frac{1}{3}", ["0.\\overline{3}"], ["0.\\overline{4}"]),
            ("\\frac{-1\\pm\\sqrt{5}}{2}", ["\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}"], ["\\frac{-1+\\sqrt5}{2}"]),
            ("(2,3)", ["a=2, b=3"], ["a=3, b=2"]),
            ("[1,2]", ["x \\in [1,2]"], ["x \\in (1,2)"]),
            ("(1,\\infty)", ["\\{x \\mid x > 1\\}"], ["\\{x \\mid x < 1\\}"]),
            ("1500", ["1.5 \\times 10^{3}", "1.5e3"], ["1.5 \\times 10^{2}"]),
            ("3", ["\\log_2 8", "\\lfloor 3.5 \\rfloor"], ["\\log_2 9"]),
            ("\\sqrt{2}+\\sqrt{3}", ["\\sqrt{5+2\\sqrt{6}}"], ["\\sqrt{5}"]),
            ("\\text{Monday}", ["monday", "\\textbf{Monday}"], ["Tuesday"]),
        ],
    }
    for category, items in groups.items():
        for gt, rights, wrongs in items:
            for k, pred in enumerate(rights):
                _add(out, _wrap(rng.randrange(7), pred), gt, True, category)
            for pred in wrongs:
                _add(out, _wrap(rng.randrange(7), pred), gt, False, category)


def _no_answer_cases(out):
    texts = [
        "", "I am not sure how to solve this.", _REASONING * 3,
        "Answer:", "The answer is probably large.", "\\boxed{", "\\boxed{}",
        "Let x be the number. Then x + 1 = 43.",
    ]
    for k, text in enumerate(texts):
        _add(out, text, str(42 + k), False, "no_answer")


def _adversarial_cases(out):
    huge_nest = "(" * 100_000 + "1" + ")" * 100_000
    cases = [
        ("Answer: 9^9^9^9", "1"),
        ("\\boxed{9^{9^{9^{9}}}}", "1"),
        ("Answer: 2^{2^{2^{2^{2^{2}}}}}", "2"),
        ("Answer: 10000000!", "1"),
        ("Answer: (10^{10})!", "1"),
        ("Answer: \\binom{10^{9}}{500000000}", "1"),
        ("Answer: " + huge_nest, "1"),
        ("\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}", "1"),
        ("Answer: " + "9" * 100_000, "9"),
        ("x" * 1_000_000, "7"),
        (("\\boxed{" * 50_000) + "7", "7"),
        ("Answer: __import__('os').system('touch /tmp/dapo_reward_pwned')", "0"),
        ("Answer: (lambda: 42)()", "42"),
        ("Answer: exec('import os')", "0"),
        ("\\boxed{eval('6*7')}", "42"),
        ("Answer: \udcff\udcfe", "1"),
        ("Answer: \ud800 42", "42"),
        ("Answer: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20", "17"),
        ("\\boxed{41} \\boxed{42} \\boxed{43}", "42"),
        ("Answer: 41 \\text{ or } 42", "42"),
        ("Answer: x", "42"),
        ("Answer: 42 \\pm 1", "42"),
        ("Answer: \\infty", "42"),
        ("Answer: 0/0", "0"),
        ("Answer: \\frac{1}{0}", "1"),
        ("Answer: " + "1+" * 5000 + "1", "1"),
        ("Answer: " + "x^" * 300 + "x", "1"),
        ("Answer: " + "\\sqrt{" * 400 + "2" + "}" * 400, "1"),
    ]
    for response, gt in cases:
        _add(out, response, gt, False, "adversarial")


def cases() -> list[dict]:
    """All benchmark cases (deterministic)."""
    rng = random.Random(2503_14476)
    out: list[dict] = []
    _integer_cases(out, rng)
    _value_cases(out, rng)
    _no_answer_cases(out)
    _adversarial_cases(out)
    return out


if __name__ == "__main__":
    from collections import Counter

    all_cases = cases()
    print(len(all_cases), Counter(c["category"] for c in all_cases))
