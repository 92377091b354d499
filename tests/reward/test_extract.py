"""Answer extraction: the DAPO ``Answer:`` line first, then the last ``\\boxed{}``."""

import time

import pytest

from dapo_megatron.reward import extract_answer, normalize_answer


@pytest.mark.parametrize(
    "response, expected",
    [
        ("reasoning...\nAnswer: 42", "42"),
        ("Answer: 41\nno wait\nAnswer: 42", "42"),  # the last Answer line
        ("**Answer:** 42", "42"),
        ("Answer:\n42", "42"),  # empty line after the marker: the next line
        ("Answer: \\boxed{42}", "42"),
        ("Answer: $\\frac{1}{2}$", "$\\frac{1}{2}$"),
        ("so \\boxed{7} and later \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
        ("\\boxed 5 done", "5"),
        ("\\fbox{9}", "9"),
        ("\\boxed{3}\n\nAnswer: 4", "4"),  # Answer line after the box wins
        ("Answer: 4\n\\boxed{3}", "3"),  # a later complete box is the final statement
        ("nothing here", None),
        ("\\boxed{unclosed", None),
        ("", None),
        ("reanswer: 5", None),  # "answer" must start a word
    ],
)
def test_extraction_rule(response, expected):
    assert extract_answer(response) == expected


def test_only_the_tail_is_scanned():
    response = "Answer: 42\n" + "x" * 1000
    assert extract_answer(response, max_scan_chars=2000) == "42"
    assert extract_answer(response, max_scan_chars=500) is None


def test_megabyte_responses_are_cheap():
    t0 = time.perf_counter()
    for response in ("x" * 1_000_000, "\\boxed{" * 200_000, "answer" * 200_000, "{" * 1_000_000):
        extract_answer(response)
    assert time.perf_counter() - t0 < 2.0


def test_invalid_text_is_sanitised():
    assert extract_answer("Answer: \udcff\udcfe") == "\ufffd\ufffd"
    assert extract_answer(b"Answer: 7 \xff\xfe") == "7 \ufffd\ufffd"
    assert extract_answer(None) is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$42$", "42"),
        ("x = 5", "5"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("\\$1{,}000", "1000"),
        ("50\\%", "50"),
        ("5\\text{ cm}^2", "5"),
        ("12 inches", "12"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "( 1, 2 )"),
        ("42.", "42"),
        ("1 \\text{ and } 2", "1,2"),
        ("\\text{Monday}", "Monday"),
        ("0.\\overline{3}", "\\frac{3}{9}"),
        ("1.2\\overline{45}", "\\frac{1233}{990}"),
        ("2 \\pm 1", "2 + 1, 2 - 1"),
        ("x=1, y=2", "1,2"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ],
)
def test_normalisation(raw, expected):
    assert normalize_answer(raw) == expected
