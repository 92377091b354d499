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


# ----- the loss family (objectives.py), written from the papers' equations ----------------

def clipped_loss_and_grad(lp, old, adv, mask, *, eps_low, eps_high, agg, c=None,
                          scale_tokens=None, scale_seqs=None, sequence_ratio=False):
    """DAPO / Dr. GRPO (token ratio) or GSPO (``sequence_ratio``: s_i = exp(mean_t log r_it),
    the GSPO objective). GSPO's gradient of min(s_i A, clip(s_i) A) w.r.t. lp_it is A s_i / |y_i|
    when the sequence is not clipped; in the per-token form, summed with weight w_i per
    token, each token gets A s_i w_i, which equals that for w_i = 1 / (|y_i| N)."""
    weights = seq_weights(mask, agg, scale_tokens, scale_seqs)
    terms, grad = [], []
    for i, row in enumerate(mask):
        n = sum(1 for m in row if m)
        s = math.exp(math.fsum(lp[i][t] - old[i][t] for t, m in enumerate(row) if m) / max(n, 1))
        grad_row = []
        for t, m in enumerate(row):
            if not m:
                grad_row.append(0.0)
                continue
            r = s if sequence_ratio else math.exp(lp[i][t] - old[i][t])
            a = adv[i][t]
            terms.append(-token_objective(r, a, eps_low, eps_high, c) * weights[i])
            active = token_is_active(r, a, eps_low, eps_high, c)
            grad_row.append(-a * r * weights[i] if active else 0.0)
        grad.append(grad_row)
    return math.fsum(terms), grad


def gspo_paper_loss(lp, old, adv_seq, mask, *, eps_low, eps_high):
    """The GSPO objective verbatim: -(1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_l, 1+eps_h) A_i)."""
    values = []
    for i, row in enumerate(mask):
        n = sum(1 for m in row if m)
        if not n:
            continue
        s = math.exp(math.fsum(lp[i][t] - old[i][t] for t, m in enumerate(row) if m) / n)
        values.append(min(s * adv_seq[i], min(max(s, 1 - eps_low), 1 + eps_high) * adv_seq[i]))
    return -math.fsum(values) / max(len(values), 1)


def cispo_loss_and_grad(lp, old, adv, mask, *, eps_high, agg, scale_tokens=None, scale_seqs=None):
    """MiniMax-M1 eq. 4: -sum sg(min(r, 1 + eps_high)) A log pi; gradient -w min(r, 1+eps) A."""
    weights = seq_weights(mask, agg, scale_tokens, scale_seqs)
    terms, grad = [], []
    for i, row in enumerate(mask):
        grad_row = []
        for t, m in enumerate(row):
            if not m:
                grad_row.append(0.0)
                continue
            w = min(math.exp(lp[i][t] - old[i][t]), 1.0 + eps_high)
            terms.append(-w * adv[i][t] * lp[i][t] * weights[i])
            grad_row.append(-w * adv[i][t] * weights[i])
        grad.append(grad_row)
    return math.fsum(terms), grad


def drgrpo_advantages(rewards):
    """Dr. GRPO: A_i = R_i - mean(R), no std."""
    return [[r - math.fsum(row) / len(row) for r in row] for row in rewards]


# ----- rollout correction (correction.py) -------------------------------------------------

def correction_weights(old, engine, mask, mode, high, low=None):
    """Per-token weights from the definitions: rho_t = pi_old / pi_engine; the sequence's
    rho is the geometric mean of its tokens'."""
    low = 1.0 / high if low is None else low
    out = []
    for i, row in enumerate(mask):
        logs = [old[i][t] - engine[i][t] for t, m in enumerate(row) if m]
        rho_seq = math.exp(math.fsum(logs) / len(logs)) if logs else 1.0
        out_row = []
        for t, m in enumerate(row):
            if not m:
                out_row.append(0.0)
                continue
            rho = math.exp(old[i][t] - engine[i][t]) if mode.startswith("token") else rho_seq
            if mode == "none":
                out_row.append(1.0)
            elif mode.endswith("tis"):
                out_row.append(min(rho, high))
            else:
                out_row.append(1.0 if low <= rho <= high else 0.0)
        out.append(out_row)
    return out


def mismatch(policy, engine, mask, high, low=None):
    """The mismatch metrics from their definitions (correction.mismatch_metrics)."""
    low = 1.0 / high if low is None else low
    diffs, k3, outside, seq_out = [], [], 0, []
    for i, row in enumerate(mask):
        row_d = [policy[i][t] - engine[i][t] for t, m in enumerate(row) if m]
        for d in row_d:
            diffs.append(d)
            # KL(engine || policy) by k3 with x ~ engine: e = log engine - log policy = -d.
            k3.append(math.exp(d) - 1 - d)
            outside += not (low <= math.exp(d) <= high)
        if row_d:
            seq_out.append(not (low <= math.exp(math.fsum(row_d) / len(row_d)) <= high))
    n = len(diffs)
    return {
        "logprob_abs_diff_mean": math.fsum(abs(d) for d in diffs) / n,
        "logprob_abs_diff_max": max(abs(d) for d in diffs),
        "kl_k3": math.fsum(k3) / n,
        "ppl_ratio": math.exp(-math.fsum(diffs) / n),
        "token_outside_frac": outside / n,
        "seq_outside_frac": sum(seq_out) / len(seq_out),
    }
