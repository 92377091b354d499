"""The DAPO algorithm core: pure torch, no Ray, no Megatron, no global state.

- loss.py        policy_loss (decoupled clip, token-level mean, dual clip, optional KL)
- objectives.py  the per-token surrogates of the loss family: DAPO, GSPO, CISPO, Dr. GRPO
- correction.py  train/inference mismatch metrics and the rollout correction (TIS, masking)
- aggregate.py   the three loss-aggregation modes and their global normalisers
- advantages.py  group_advantages
- sampling.py    dynamic-sampling filter (keep_mask) and BatchAssembler
- overlong.py    soft overlong punishment and overlong filtering
- kl.py          KL estimators k1/k2/k3 and a KL loss term
- entropy.py     entropy_from_logits
"""

from .advantages import group_advantages
from .aggregate import AGG_MODES, aggregate_loss, loss_scale_counts, masked_mean
from .correction import CORRECTION_MODES, correction_bounds, correction_weights, mismatch_metrics
from .entropy import entropy_from_logits
from .kl import KL_KINDS, kl_loss, kl_penalty
from .loss import (
    POLICY_METRIC_REDUCTIONS,
    finish_metrics,
    metric_partials,
    policy_loss,
    reduce_policy_metrics,
)
from .objectives import LOSS_AGG, LOSS_TYPES, resolve_agg, token_objective
from .overlong import overlong_filter_mask, overlong_penalty
from .sampling import (
    SURPLUS_MODES,
    AssembledBatch,
    BatchAssembler,
    Group,
    SamplingStats,
    keep_mask,
    stack_group_rewards,
)

__all__ = [
    "AGG_MODES",
    "CORRECTION_MODES",
    "KL_KINDS",
    "LOSS_AGG",
    "LOSS_TYPES",
    "POLICY_METRIC_REDUCTIONS",
    "SURPLUS_MODES",
    "AssembledBatch",
    "BatchAssembler",
    "Group",
    "SamplingStats",
    "aggregate_loss",
    "correction_bounds",
    "correction_weights",
    "entropy_from_logits",
    "finish_metrics",
    "group_advantages",
    "keep_mask",
    "kl_loss",
    "kl_penalty",
    "loss_scale_counts",
    "masked_mean",
    "metric_partials",
    "mismatch_metrics",
    "overlong_filter_mask",
    "overlong_penalty",
    "policy_loss",
    "reduce_policy_metrics",
    "resolve_agg",
    "stack_group_rewards",
    "token_objective",
]
