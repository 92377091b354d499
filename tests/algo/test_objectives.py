"""The loss family (GSPO, CISPO, Dr. GRPO beside DAPO) against float64 references written
from the papers' equations (tests/algo/reference.py): values and gradients, inside and
outside every clip bound, and invariance to any split of the batch under the global
normaliser."""

from __future__ import annotations

import math

import pytest
import torch

from dapo_megatron.algo import (
    LOSS_AGG,
    LOSS_TYPES,
    group_advantages,
    loss_scale_counts,
    policy_loss,
    reduce_policy_metrics,
)
from tests.algo.test_loss import to_lists as lists

from . import reference
from .reference import agg_extra


def make_batch(seed, batch=12, seq=12, spread=1.6, per_token_adv=False):
    """Ragged masks (one empty row), log-ratios uniform in [-spread, spread] plus a shift per
    row in [-spread / 2, spread / 2] (so sequence ratios spread too), advantages of both
    signs (one exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 4 - 0.01
    shift = (torch.rand(batch, 1, generator=g, dtype=torch.float64) - 0.5) * spread
    lp = old + (torch.rand(batch, seq, generator=g, dtype=torch.float64) * 2 - 1) * spread + shift
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[batch // 2] = 0
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    if per_token_adv:
        adv = torch.randn(batch, seq, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(batch, generator=g, dtype=torch.float64)
        adv[1] = 0.0
    return lp, old, adv, mask


def run(loss_type, lp, old, adv, mask, agg, **kwargs):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, old, adv, mask, agg=agg, loss_type=loss_type,
                                **agg_extra(agg), **kwargs)
    loss.backward()
    return loss, lp.grad, metrics


def seq_log_ratio(lp, old, mask):
    n = mask.sum(-1).clamp(min=1)
    return torch.where(mask, lp - old, 0).sum(-1) / n


# ----- GSPO ---------------------------------------------------------------------------------

@pytest.mark.parametrize("eps_low,eps_high,spread", [(0.2, 0.28, 1.6), (3e-4, 4e-4, 2e-3)])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_matches_reference(eps_low, eps_high, spread, agg, per_token_adv, seed):
    lp, old, adv, mask = make_batch(seed, spread=spread, per_token_adv=per_token_adv)
    # Sequences inside the band and beyond each bound, with advantages of both signs.
    s = seq_log_ratio(lp, old, mask).exp()[mask.any(-1)]
    assert (s < 1 - eps_low).any() and (s > 1 + eps_high).any()
    assert ((s > 1 - eps_low) & (s < 1 + eps_high)).any()
    ref_loss, ref_grad = reference.clipped_loss_and_grad(
        *lists(lp, old, adv, mask), eps_low=eps_low, eps_high=eps_high, agg=agg,
        sequence_ratio=True)
    loss, grad, metrics = run("gspo", lp, old, adv, mask, agg, eps_low=eps_low, eps_high=eps_high)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert (grad[mask] == 0).any() and (grad[mask] != 0).any()  # clipped and active tokens
    # A sequence is clipped as a whole: its tokens' gradients are all zero or all not.
    for i in range(mask.shape[0]):
        row = grad[i][mask[i]]
        assert bool((row == 0).all()) or bool((row != 0).all()) or per_token_adv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_seq_mean_is_the_papers_objective(seed):
    """Under its own aggregation GSPO is the paper's objective verbatim, and its gradient is
    A_i s_i / |y_i| grad log pi per token, / G (finite differences of the objective agree)."""
    lp, old, adv, mask = make_batch(seed, spread=2e-3)
    kw = dict(eps_low=3e-4, eps_high=4e-4)
    loss, grad, _ = run("gspo", lp, old, adv, mask, LOSS_AGG["gspo"], **kw)
    paper = reference.gspo_paper_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), **kw)
    assert loss.item() == pytest.approx(paper, rel=1e-12, abs=1e-15)
    h = 1e-7
    for i, t in [(0, 0), (2, 1), (3, 0), (7, 0)]:
        if not mask[i, t]:
            continue
        up, down = lp.clone(), lp.clone()
        up[i, t] += h
        down[i, t] -= h
        fd = (reference.gspo_paper_loss(up.tolist(), old.tolist(), adv.tolist(), mask.tolist(), **kw)
              - reference.gspo_paper_loss(down.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                          **kw)) / (2 * h)
        assert grad[i, t].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


# ----- CISPO --------------------------------------------------------------------------------

@pytest.mark.parametrize("eps_high", [0.28, 2.0])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_cispo_matches_reference_and_keeps_every_tokens_gradient(eps_high, agg, per_token_adv):
    lp, old, adv, mask = make_batch(3, per_token_adv=per_token_adv)
    r = (lp - old).exp()[mask]
    assert (r > 1 + eps_high).any() and (r < 1 + eps_high).any() and (r < 0.8).any()
    ref_loss, ref_grad = reference.cispo_loss_and_grad(*lists(lp, old, adv, mask),
                                                       eps_high=eps_high, agg=agg)
    loss, grad, metrics = run("cispo", lp, old, adv, mask, agg, eps_high=eps_high)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # Unlike the PPO clip, no token with A != 0 loses its gradient, not even far outside.
    a = (adv[:, None].expand_as(lp) if adv.dim() == 1 else adv)
    assert (grad[mask & (a != 0)] != 0).all()
    assert metrics["clip_frac_high"].item() == pytest.approx(float((r > 1 + eps_high).double().mean()))
    assert metrics["clip_frac_low"].item() == 0.0


# ----- Dr. GRPO -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_drgrpo_is_ppo_clip_with_the_constant_normaliser(seed):
    """Dr. GRPO's per-token term is the clipped one; its aggregation divides the token sum
    of each sequence by L_max (not |o_i|) and averages over sequences."""
    lp, old, adv, mask = make_batch(seed)
    ref_loss, ref_grad = reference.clipped_loss_and_grad(
        *lists(lp, old, adv, mask), eps_low=0.2, eps_high=0.28, agg="seq-mean-token-sum-norm")
    loss, grad, _ = run("drgrpo", lp, old, adv, mask, LOSS_AGG["drgrpo"])
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # Hand-worked: two sequences of 1 and 3 tokens, ratio 1, A = +1, L_max = 7 (NORM_LEN):
    # loss = -(1 + 3) / (2 * 7); each token's gradient is -1 / 14 whatever its sequence's length.
    one = torch.zeros(2, 3, dtype=torch.float64)
    m = torch.tensor([[True, False, False], [True, True, True]])
    loss, grad, _ = run("drgrpo", one, one, torch.ones(2, dtype=torch.float64), m, LOSS_AGG["drgrpo"])
    assert loss.item() == pytest.approx(-4 / 14)
    assert grad[m].tolist() == pytest.approx([-1 / 14] * 4)


def test_drgrpo_advantage_has_no_std():
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 0.0]],
                           dtype=torch.float64)
    got = group_advantages(rewards, scale_by_std=False)
    torch.testing.assert_close(got, torch.tensor(reference.drgrpo_advantages(rewards.tolist()),
                                                 dtype=torch.float64), rtol=0, atol=1e-15)


# ----- every loss: split invariance, masked garbage, bad arguments ------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_split_adds_up_to_the_whole(loss_type, seed):
    """Rows dealt to 4 pieces (micro-batches or DP ranks, empty pieces allowed): with the
    global normaliser of the loss's own aggregation, losses, gradients and the KL term add
    up to the unsplit batch's, and the metrics reduce to the whole's."""
    agg = LOSS_AGG[loss_type]
    lp, old, adv, mask = make_batch(seed, spread=0.6 if loss_type != "gspo" else 1e-3)
    ref = lp + 0.05 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64)
    whole, whole_grad, whole_metrics = run(loss_type, lp, old, adv, mask, agg, ref_logprobs=ref,
                                           kl_coef=0.1)
    tokens, seqs = loss_scale_counts(mask)
    owner = torch.randint(0, 4, (mask.shape[0],), generator=torch.Generator().manual_seed(seed + 7))
    owner[owner == 3] = 2  # piece 3 stays empty
    total, grad, metrics = 0.0, torch.zeros_like(lp), []
    for piece in range(4):
        rows = (owner == piece).nonzero().flatten()
        loss, g, m = run(loss_type, lp[rows], old[rows], adv[rows], mask[rows], agg,
                         loss_scale_tokens=tokens if agg == "token-mean" else None,
                         loss_scale_seqs=None if agg == "token-mean" else seqs,
                         ref_logprobs=ref[rows], kl_coef=0.1)
        total += loss.item()
        grad[rows] = g
        metrics.append(m)
    assert total == pytest.approx(whole.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)
    combined = reduce_policy_metrics(metrics)
    for name in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "kl_loss"):
        assert combined[name] == pytest.approx(whole_metrics[name].item(), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_garbage_is_ignored(loss_type):
    lp, old, adv, mask = make_batch(4, spread=0.5)
    agg = LOSS_AGG[loss_type]
    clean, clean_grad, _ = run(loss_type, lp, old, adv, mask, agg)
    dirty, dirty_grad, metrics = run(loss_type, lp.masked_fill(~mask, math.nan),
                                     old.masked_fill(~mask, -math.inf), adv, mask, agg)
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)
    torch.testing.assert_close(dirty_grad, clean_grad, rtol=0, atol=0)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("kwargs,field", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(loss_type="gspo", clip_ratio_c=3.0), "clip_ratio_c"),
    (dict(loss_type="cispo", clip_ratio_c=3.0), "clip_ratio_c"),
    (dict(agg="seq-mean-token-sum-norm"), "norm_len"),
    (dict(agg="token-mean", norm_len=7), "norm_len"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    lp, old, adv, mask = make_batch(0)
    with pytest.raises(ValueError, match=field):
        policy_loss(lp, old, adv, mask, **kwargs)
