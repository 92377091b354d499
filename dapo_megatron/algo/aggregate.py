"""Reduce a per-token loss [batch, seq] to a scalar: the three loss-aggregation modes.

DAPO (Sec. 3.3, "token-level policy gradient loss") averages over every response token of
the train batch; GRPO averages per sequence first, then over sequences. Either way the
normaliser must be the one of the *whole* train batch, not of a micro-batch, or the
gradient depends on how the batch is split. Callers that split a batch (gradient
accumulation, data parallelism) therefore pass the global count:

- ``agg="token-mean"``:          sum_i sum_t l_it / loss_scale_tokens
- ``agg="seq-mean-token-mean"``: sum_i (sum_t l_it / n_i) / loss_scale_seqs
- ``agg="seq-mean-token-sum"``:  sum_i sum_t l_it / loss_scale_seqs
- ``agg="seq-mean-token-sum-norm"``: sum_i sum_t l_it / (loss_scale_seqs * norm_len), a
  constant ``norm_len`` per sequence instead of its length (Dr. GRPO, arXiv 2503.20783:
  the generation budget L_max)

where n_i is the number of response tokens of sequence i, ``loss_scale_tokens`` the total
number of response tokens and ``loss_scale_seqs`` the number of sequences that have at
least one response token (a fully masked sequence, e.g. one removed by overlong
filtering, neither adds to the loss nor counts in the denominator). Each is computed over
the global batch, e.g. by summing :func:`loss_scale_counts` over micro-batches and
all-reducing over data-parallel ranks. Left as None, the counts of the tensors at hand
are used, which is right only for an unsplit batch.
"""

from __future__ import annotations

import torch

from ._checks import check_choice, check_same_shape

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def loss_scale_counts(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts to sum over a split batch and pass back as the global normalisers.

    Args:
        response_mask: [batch, seq], bool or 0/1; True where a token is in the loss.

    Returns:
        (num_tokens, num_seqs): 0-d int64 tensors; the number of response tokens, and the
        number of sequences with at least one response token. Sum them over micro-batches
        and data-parallel ranks to get ``loss_scale_tokens`` and ``loss_scale_seqs``.
    """
    mask = response_mask.bool()
    return mask.sum(), mask.any(dim=-1).sum()


def aggregate_loss(
    loss_per_token: torch.Tensor,
    response_mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    loss_scale_tokens: int | float | torch.Tensor | None = None,
    loss_scale_seqs: int | float | torch.Tensor | None = None,
    norm_len: int | float | None = None,
) -> torch.Tensor:
    """Aggregate ``loss_per_token`` [batch, seq] over the tokens where ``response_mask``.

    Args:
        loss_per_token: [batch, seq] float; values at masked-out positions are ignored
            (even NaN or inf).
        response_mask: [batch, seq], bool or 0/1.
        agg: one of AGG_MODES (see the module docstring for the formulas).
        loss_scale_tokens: global response-token count; used by ``agg="token-mean"``.
        loss_scale_seqs: global count of sequences with response tokens; used by the
            seq-mean modes.
        norm_len: the constant per-sequence normaliser of "seq-mean-token-sum-norm"
            (required there, refused elsewhere).

    Returns:
        0-d tensor. With the global normaliser given, the sum of this value over any
        split of the batch's rows equals the value of the unsplit batch. With none given
        and nothing in the mask, the result is 0 (not NaN).

    Raises:
        ValueError: unknown ``agg``, mismatched shapes, a seq-mean mode given only
            ``loss_scale_tokens`` (a token count would silently mis-normalise it), or
            ``norm_len`` missing for (or given to a mode other than) the -norm mode.
    """
    check_choice("agg", agg, AGG_MODES)
    if (agg == "seq-mean-token-sum-norm") != (norm_len is not None):
        raise ValueError(f"norm_len={norm_len!r}: it is required by, and only by, "
                         "agg='seq-mean-token-sum-norm'")
    if norm_len is not None and not norm_len > 0:
        raise ValueError(f"norm_len must be positive, got {norm_len}")
    check_same_shape("loss_per_token", loss_per_token, response_mask=response_mask)
    if loss_per_token.dim() != 2:
        raise ValueError(
            f"loss_per_token must be [batch, seq], got shape {tuple(loss_per_token.shape)}"
        )
    mask = response_mask.bool()
    # where() rather than multiply: 0 * inf at a padded position would be NaN.
    masked = torch.where(mask, loss_per_token, torch.zeros((), dtype=loss_per_token.dtype))

    if agg == "token-mean":
        denominator = _denominator(loss_scale_tokens, mask.sum(), "loss_scale_tokens")
        return masked.sum() / denominator

    if loss_scale_seqs is None and loss_scale_tokens is not None:
        raise ValueError(
            f"agg={agg!r} normalises by the number of sequences: pass loss_scale_seqs (the "
            "global count of sequences with response tokens, see loss_scale_counts); "
            "loss_scale_tokens only applies to agg='token-mean'"
        )
    per_seq = masked.sum(dim=-1)
    if agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(dim=-1).clamp(min=1).to(per_seq.dtype)
        per_seq = per_seq / tokens_per_seq
    denominator = _denominator(loss_scale_seqs, mask.any(dim=-1).sum(), "loss_scale_seqs")
    if norm_len is not None:
        denominator = denominator * norm_len
    return per_seq.sum() / denominator


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (same shape); 0 when the mask is empty."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype)).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)


def _denominator(given, local_count: torch.Tensor, name: str) -> torch.Tensor | float:
    if given is None:
        # An empty local mask gives loss 0 rather than 0/0.
        return local_count.clamp(min=1)
    if isinstance(given, torch.Tensor):
        if given.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(given.shape)}")
        # Not checked for positivity: reading a GPU tensor would force a device sync.
        return given.reshape(())
    if given <= 0:
        raise ValueError(f"{name} must be positive, got {given}")
    return given
