"""The policy loss: DAPO's decoupled clip and token-level aggregation (the default), the
other surrogates of objectives.py, optional dual clip and KL.

DAPO (arXiv 2503.14476, eq. 8) maximises

    J = 1 / sum_i |o_i| * sum_i sum_t min(r_it A_it, clip(r_it, 1 - eps_low, 1 + eps_high) A_it)

with r_it = pi_theta(o_it) / pi_old(o_it). The loss returned here is -J (to minimise),
aggregated as ``agg`` says (see aggregate.py). The paper's defaults are eps_low 0.2 and
eps_high 0.28 (Sec. 3.1, "Clip-Higher"); eps_low == eps_high is PPO's symmetric clip.
``clip_ratio_c`` is dual-clip PPO (Ye et al. 2020): for A < 0 the objective is bounded
below by c * A, so a token whose ratio has grown past c stops pushing the update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ._checks import check_choice, check_same_shape, compute_dtype
from .aggregate import aggregate_loss, masked_mean
from .kl import KL_KINDS, kl_loss
from .objectives import token_objective

# How each metric of policy_loss combines across calls (micro-batches, data-parallel
# ranks): "sum" adds values; "token_mean" is a mean weighted by "num_tokens"; "max" is max.
POLICY_METRIC_REDUCTIONS = {
    "loss": "sum",
    "pg_loss": "sum",
    "kl_loss": "sum",
    "num_tokens": "sum",
    "clip_frac_low": "token_mean",
    "clip_frac_high": "token_mean",
    "dual_clip_frac": "token_mean",
    "approx_kl": "token_mean",
    "ratio_mean": "token_mean",
    "ratio_max": "max",
}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "token-mean",
    clip_ratio_c: float | None = None,
    loss_scale_tokens: int | float | torch.Tensor | None = None,
    loss_scale_seqs: int | float | torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    loss_type: str = "dapo",
    norm_len: int | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss (to minimise) and its metrics.

    Args:
        logprobs: [batch, seq] log pi_theta of the response tokens; gradients flow here.
        old_logprobs: [batch, seq] log pi_old of the same tokens (the sampling policy;
            treated as constant).
        advantages: [batch] (one per sequence, broadcast to its tokens) or [batch, seq].
        response_mask: [batch, seq], bool or 0/1; which tokens are in the loss. Values of
            the other tensors at masked-out positions are ignored, even if inf or NaN.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the ratio.
        agg: "token-mean" (DAPO), "seq-mean-token-mean" (GRPO) or "seq-mean-token-sum".
        clip_ratio_c: dual-clip bound (> 1) for negative advantages; None turns it off.
        loss_scale_tokens: for agg="token-mean", the response-token count of the whole
            train batch (all micro-batches and data-parallel ranks). Then the losses of
            the pieces of a split batch add up to the loss of the unsplit batch.
        loss_scale_seqs: the same for the seq-mean modes: the global number of sequences
            with at least one response token. Both counts come from
            ``aggregate.loss_scale_counts`` summed over the pieces.
        ref_logprobs: [batch, seq] log pi_ref; when given, the KL term is computed and
            reported as metric "kl_loss".
        kl_coef: weight of the KL term in the loss (0 = DAPO: no KL; needs ref_logprobs).
        kl_kind: KL estimator, "k1", "k2" or "k3" (see kl.py).
        loss_type: the surrogate, one of objectives.LOSS_TYPES ("dapo", "gspo", "cispo",
            "drgrpo"; see objectives.py). Give it the aggregation it is defined with
            (objectives.LOSS_AGG) unless ablating.
        norm_len: the constant normaliser of agg="seq-mean-token-sum-norm" (Dr. GRPO's
            L_max); see aggregate.py.

    Returns:
        (loss, metrics). ``loss`` is a 0-d tensor in at least float32. ``metrics`` maps
        names to detached 0-d tensors on the input device (no host sync; call .item() or
        ``reduce_policy_metrics`` when logging). POLICY_METRIC_REDUCTIONS says how each
        combines across calls:

        - loss, pg_loss, kl_loss (sum): the loss, its clipped-PG part and the aggregated
          KL estimate (without kl_coef). They add up across calls when the global loss
          scale is given.
        - num_tokens (sum): response tokens in this call.
        - clip_frac_low (token mean): fraction of response tokens with A < 0 and
          r < 1 - eps_low (the lower clip is active: no gradient); for gspo the sequence
          ratio decides for all its tokens; 0 for cispo.
        - clip_frac_high (token mean): A > 0 and r > 1 + eps_high; for cispo, tokens whose
          IS weight was truncated at 1 + eps_high (whatever A).
        - dual_clip_frac (token mean): A < 0 and r > clip_ratio_c (0 when off).
        - approx_kl (token mean): KL(pi_old || pi_theta) by the k3 estimator
          (r - 1) - log r, which is unbiased for tokens sampled from pi_old and >= 0.
        - ratio_mean (token mean), ratio_max (max): of r over response tokens (0 if none).

    Raises:
        ValueError: mismatched shapes, an unknown ``agg`` or ``kl_kind``, eps values out
            of range, clip_ratio_c <= 1, or kl_coef != 0 without ref_logprobs.
    """
    _check_args(logprobs, old_logprobs, advantages, response_mask, eps_low, eps_high,
                clip_ratio_c, ref_logprobs, kl_coef, kl_kind)
    dtype = compute_dtype(logprobs)
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = torch.where(mask, advantages.detach().to(dtype), zero)

    objective, log_ratio, clipped_low, clipped_high = token_objective(
        loss_type, logprobs.to(dtype), old_logprobs, advantages, mask, eps_low=eps_low,
        eps_high=eps_high, clip_ratio_c=clip_ratio_c)
    ratio = torch.exp(log_ratio)

    scales = dict(loss_scale_tokens=loss_scale_tokens, loss_scale_seqs=loss_scale_seqs,
                  norm_len=norm_len)
    pg_loss = aggregate_loss(-objective, mask, agg, **scales)
    loss = pg_loss
    metrics: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        kl_term = kl_loss(logprobs, ref_logprobs, mask, kind=kl_kind, agg=agg, **scales)
        if kl_coef != 0.0:
            loss = pg_loss + kl_coef * kl_term
        metrics["kl_loss"] = kl_term.detach()

    with torch.no_grad():
        metrics.update(
            loss=loss.detach(),
            pg_loss=pg_loss.detach(),
            num_tokens=mask.sum().to(dtype),
            clip_frac_low=masked_mean(clipped_low.to(dtype), mask),
            clip_frac_high=masked_mean(clipped_high.to(dtype), mask),
            dual_clip_frac=(
                masked_mean(((advantages < 0) & (ratio > clip_ratio_c)).to(dtype), mask)
                if clip_ratio_c is not None else zero.clone()
            ),
            approx_kl=masked_mean(ratio - 1.0 - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
            ratio_max=torch.where(mask, ratio, zero).max() if ratio.numel() else zero.clone(),
        )
    return loss, metrics


def metric_partials(
    metrics_list: Iterable[Mapping[str, torch.Tensor | float]],
    reductions: Mapping[str, str] = POLICY_METRIC_REDUCTIONS,
) -> torch.Tensor:
    """The state of a metric reduction, before it is finished by :func:`finish_metrics`.

    Returns a float64 tensor [4 * len(reductions)]: per name (in ``reductions`` order) the
    sum of values (token means: weighted by "num_tokens"), the summed weight, the number of
    calls that reported it, then all the maxima. Partials of disjoint calls combine by
    adding the first 3n entries and taking the max of the last n, so a distributed caller
    all-reduces them (SUM, MAX) and finishes once; the result equals reducing every call
    in one place. Unknown keys raise ValueError.
    """
    names = list(reductions)
    slot = {name: k for k, name in enumerate(names)}
    n = len(names)
    sums = torch.zeros(3 * n, dtype=torch.float64)
    maxes = torch.full((n,), float("-inf"), dtype=torch.float64)
    for metrics in metrics_list:
        num_tokens = float(metrics["num_tokens"])
        for name, value in metrics.items():
            if name not in slot:
                raise ValueError(f"metric {name!r} has no reduction (POLICY_METRIC_REDUCTIONS)")
            k, value, how = slot[name], float(value), reductions[name]
            sums[2 * n + k] += 1
            if how == "max":
                maxes[k] = max(float(maxes[k]), value)
            elif how == "sum":
                sums[2 * k] += value
            else:
                sums[2 * k] += value * num_tokens
                sums[2 * k + 1] += num_tokens
    return torch.cat([sums, maxes])


def finish_metrics(partials: torch.Tensor,
                   reductions: Mapping[str, str] = POLICY_METRIC_REDUCTIONS) -> dict[str, float]:
    """Plain floats from :func:`metric_partials` (possibly all-reduced); a name no call
    reported is left out; a token mean over zero tokens is 0."""
    names = list(reductions)
    n = len(names)
    partials = partials.double().cpu()
    out = {}
    for k, name in enumerate(names):
        if partials[2 * n + k] == 0:
            continue
        how = reductions[name]
        if how == "max":
            out[name] = float(partials[3 * n + k])
        elif how == "sum":
            out[name] = float(partials[2 * k])
        else:
            weight = float(partials[2 * k + 1])
            out[name] = float(partials[2 * k]) / weight if weight > 0 else 0.0
    return out


def reduce_policy_metrics(
    metrics_list: Iterable[Mapping[str, torch.Tensor | float]],
    reductions: Mapping[str, str] = POLICY_METRIC_REDUCTIONS,
) -> dict[str, float]:
    """Combine the metrics of several ``policy_loss`` calls into plain floats.

    Each key is reduced as ``reductions`` says (default POLICY_METRIC_REDUCTIONS); token
    means are weighted by each call's "num_tokens". Keys missing from some calls are
    reduced over the calls that have them. Unknown keys raise ValueError. The policy's
    distributed reduction (policy/train.py) is this one with an all-reduce in the middle.
    """
    return finish_metrics(metric_partials(metrics_list, reductions), reductions)


def _check_args(logprobs, old_logprobs, advantages, response_mask, eps_low, eps_high,
                clip_ratio_c, ref_logprobs, kl_coef, kl_kind) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, seq], got shape {tuple(logprobs.shape)}")
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    if ref_logprobs is not None:
        check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [batch] = "
            f"[{logprobs.shape[0]}] or [batch, seq] = {list(logprobs.shape)}"
        )
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1 or None, got {clip_ratio_c}")
    check_choice("kl_kind", kl_kind, KL_KINDS)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(
            f"kl_coef={kl_coef} needs ref_logprobs (log-probs of the reference policy)"
        )
