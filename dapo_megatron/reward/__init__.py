"""Rule-based math reward for DAPO: answer extraction, safe equivalence, batch scoring.

Public API:
    extract_answer(response) -> str | None
    is_equivalent(pred, ref) -> bool
    compute_score(response, ground_truth) -> RewardResult
    RewardPool(num_workers, timeout_s).score(responses, ground_truths) -> list[RewardResult]

Model text is parsed by a restricted tokenizer (``latex_parser``) and evaluated by our
own code (``exact``, ``symbolic``); it never reaches eval/exec or sympy's string parser.
"""

from dapo_megatron.reward.equivalence import check_equivalence, is_equivalent
from dapo_megatron.reward.extract import DEFAULT_MAX_SCAN_CHARS, extract_answer
from dapo_megatron.reward.latex_parser import (
    DEFAULT_LIMITS,
    AnswerParseError,
    ParseLimits,
    parse_answer,
)
from dapo_megatron.reward.normalize import normalize_answer
from dapo_megatron.reward.pool import RewardPool
from dapo_megatron.reward.score import RewardResult, compute_score

BatchScorer = RewardPool

__all__ = [
    "AnswerParseError",
    "BatchScorer",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_SCAN_CHARS",
    "ParseLimits",
    "RewardPool",
    "RewardResult",
    "check_equivalence",
    "compute_score",
    "extract_answer",
    "is_equivalent",
    "normalize_answer",
    "parse_answer",
]
