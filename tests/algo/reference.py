"""Independent float64 references for the algo/ tests, written with math on Python floats.

Nothing here imports dapo_megatron: each formula is re-derived from DESIGN.md / the paper.
"""

from __future__ import annotations

import math


def token_objective(r: float, a: float, eps_low: float, eps_high: float, c: float | None) -> float:
    """min(r A, clip(r) A), then for A < 0 bounded below by c A (dual clip)."""
    clipped = min(max(r, 1.0 - eps_low), 1.0 + eps_high)
    j = min(r * a, clipped * a)
    if c is not None and a < 0:
        j = max(j, c * a)
    return j


def token_is_active(r: float, a: float, eps_low: float, eps_high: float, c: float | None) -> bool:
    """Does the token's objective still depend on r (nonzero gradient)?"""
    if a > 0:
        return r < 1.0 + eps_high
    if a < 0:
        return r > 1.0 - eps_low and (c is None or r < c)
    return False


# The constant normaliser the tests give "seq-mean-token-sum-norm" (Dr. GRPO's L_max).
NORM_LEN = 7.0


def agg_extra(agg):
    """Keyword arguments an aggregation mode needs beyond the loss scales."""
    return {"norm_len": NORM_LEN} if agg == "seq-mean-token-sum-norm" else {}


def seq_weights(mask, agg, scale_tokens=None, scale_seqs=None):
    """Per-sequence weight w_i of each of its tokens in the aggregated loss."""
    lengths = [sum(1 for m in row if m) for row in mask]
    if agg == "token-mean":
        n = scale_tokens if scale_tokens is not None else max(sum(lengths), 1)
        return [1.0 / n for _ in lengths]
    s = scale_seqs if scale_seqs is not None else max(sum(1 for n in lengths if n > 0), 1)
    if agg == "seq-mean-token-mean":
        return [1.0 / (n * s) if n > 0 else 0.0 for n in lengths]
    if agg == "seq-mean-token-sum-norm":
        return [1.0 / (s * NORM_LEN) for _ in lengths]
    assert agg == "seq-mean-token-sum"
    return [1.0 / s for _ in lengths]


def policy_loss_and_grad(lp, old, adv, mask, *, eps_low, eps_high, agg, c=None,
                         scale_tokens=None, scale_seqs=None):
    """(loss, d loss / d lp as nested lists) from nested lists of floats; adv per token."""
    weights = seq_weights(mask, agg, scale_tokens, scale_seqs)
    terms, grad = [], []
    for i, row in enumerate(mask):
        grad_row = []
        for t, m in enumerate(row):
            if not m:
                grad_row.append(0.0)
                continue
            r = math.exp(lp[i][t] - old[i][t])
            a = adv[i][t]
            terms.append(-token_objective(r, a, eps_low, eps_high, c) * weights[i])
            # d(-r A)/d lp = -A r, since dr/dlp = r.
            active = token_is_active(r, a, eps_low, eps_high, c)
            grad_row.append(-a * r * weights[i] if active else 0.0)
        grad.append(grad_row)
    return math.fsum(terms), grad
