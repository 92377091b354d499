"""``compute_score``: the DAPO rule-based reward of one response.

R = +1 when the extracted answer is equivalent to the reference, else -1 (DAPO paper,
Sec. 3.1 "Rule-based Reward Modeling"). The soft overlong penalty is added elsewhere
(``algo/``), because it depends on token counts, not on the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from dapo_megatron.reward.equivalence import cached_check
from dapo_megatron.reward.extract import DEFAULT_MAX_SCAN_CHARS, extract_answer
from dapo_megatron.reward.latex_parser import DEFAULT_LIMITS, ParseLimits

CORRECT_SCORE = 1.0
INCORRECT_SCORE = -1.0
# Longest reference answer that is scored. Math references are short (DAPO-Math-17K's are
# integers); a huge one is a data error, and parsing it would time out every response.
MAX_REFERENCE_CHARS = 4096


def reference_too_long(ground_truth: str) -> str | None:
    """The failure reason for a reference over `MAX_REFERENCE_CHARS`, else None."""
    if len(ground_truth) > MAX_REFERENCE_CHARS:
        return f"reference answer too long ({len(ground_truth)} chars > {MAX_REFERENCE_CHARS})"
    return None


@dataclass(frozen=True, slots=True)
class RewardResult:
    """The outcome of scoring one response.

    Attributes:
        score: +1.0 if correct else -1.0 (or the configured pair).
        correct: whether the answer matched the reference.
        answer: the extracted answer text (None when none was found).
        reason: why the response failed when it was not a plain wrong answer:
            "no answer", "parse error: ...", "timeout", "worker crashed", ...
    """

    score: float
    correct: bool
    answer: str | None = None
    reason: str | None = None

    @classmethod
    def failure(
        cls, reason: str, answer: str | None = None, score: float = INCORRECT_SCORE
    ) -> "RewardResult":
        return cls(score, False, answer, reason)


def compute_score(
    response: object,
    ground_truth: str,
    *,
    max_scan_chars: int = DEFAULT_MAX_SCAN_CHARS,
    limits: ParseLimits = DEFAULT_LIMITS,
    correct_score: float = CORRECT_SCORE,
    incorrect_score: float = INCORRECT_SCORE,
) -> RewardResult:
    """Score one response against its reference answer.

    Args:
        response: the generated text (str; bytes decoded leniently).
        ground_truth: the reference answer (e.g. "42", "\\frac{1}{2}", "(1,2)").
        max_scan_chars: only the tail of this many characters is searched for the answer.
        limits: parsing/evaluation bounds (``ParseLimits``).
        correct_score, incorrect_score: the two reward values (DAPO: +1 / -1).
    Returns:
        RewardResult with score ``correct_score`` or ``incorrect_score``. Never raises
        on model text. Runs in the calling process without a time limit (every
        operation is bounded by ``limits``); ``RewardPool`` adds the hard timeout.
    """
    too_long = reference_too_long(str(ground_truth))
    if too_long:
        return RewardResult.failure(too_long, score=incorrect_score)
    answer = extract_answer(response, max_scan_chars)
    if answer is None:
        return RewardResult.failure("no answer", score=incorrect_score)
    correct, reason = cached_check(answer, str(ground_truth), limits)
    if correct:
        return RewardResult(correct_score, True, answer, None)
    return RewardResult(incorrect_score, False, answer, reason)
