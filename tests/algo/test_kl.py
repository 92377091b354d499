"""KL estimators: formulas, the direction of the divergence, and the KL loss term."""

from __future__ import annotations

import math

import pytest
import torch

from dapo_megatron.algo import AGG_MODES, kl_loss, kl_penalty, loss_scale_counts, policy_loss

from .reference import agg_extra


def random_distributions(seed: int, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, dim=0)
    logq = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, dim=0)
    return logp, logq


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_estimators_average_to_kl_policy_to_ref(kind, seed):
    """Under tokens drawn from pi_theta, E[k1] = E[k3] = KL(pi_theta || pi_ref), computed
    here exactly by summing over the vocabulary instead of sampling."""
    logp, logq = random_distributions(seed)
    exact = math.fsum(math.exp(a) * (a - b) for a, b in zip(logp.tolist(), logq.tolist()))
    expectation = (logp.exp() * kl_penalty(logp, logq, kind)).sum().item()
    assert expectation == pytest.approx(exact, rel=1e-10)
    reverse = math.fsum(math.exp(b) * (b - a) for a, b in zip(logp.tolist(), logq.tolist()))
    assert abs(expectation - reverse) > 1e-3  # the direction matters for these inputs


def test_estimator_values_per_token():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5, -3.0 + 1e-9], dtype=torch.float64)
    for kind, formula in {
        "k1": lambda d: d,
        "k2": lambda d: d * d / 2,
        "k3": lambda d: math.expm1(-d) + d,
    }.items():
        expected = [formula(a - b) for a, b in zip(lp.tolist(), ref.tolist())]
        got = kl_penalty(lp, ref, kind).tolist()
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-30)
    # k3 = d^2/2 + O(d^3): tiny log-ratios keep their precision instead of cancelling to 0.
    assert kl_penalty(lp, ref, "k3")[3].item() == pytest.approx(0.5e-18, rel=1e-6)
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    assert kl_penalty(lp.bfloat16(), ref.bfloat16(), "k3").dtype == torch.float32


def test_gradient_flows_to_policy_only():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], requires_grad=True)
    kl_penalty(lp, ref, "k3").sum().backward()
    assert ref.grad is None
    # d k3 / d lp = 1 - exp(ref - lp)
    expected = [1 - math.exp(-1.5 + 1.0), 1 - math.exp(-1.0 + 2.0)]
    assert lp.grad.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_kl_in_policy_loss_is_coef_times_kl_loss_and_splits(agg):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, 8, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.1
    ref = lp + torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.3
    mask = torch.rand(6, 8, generator=g) > 0.3
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    extra = agg_extra(agg)
    pg, _ = policy_loss(lp, old, adv, mask, agg=agg, **extra)
    kl = kl_loss(lp, ref, mask, agg=agg, **extra)
    total, metrics = policy_loss(lp, old, adv, mask, agg=agg, **extra, ref_logprobs=ref, kl_coef=0.04)
    assert total.item() == pytest.approx(pg.item() + 0.04 * kl.item(), rel=1e-12)
    assert metrics["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-12)
    # Default: reference log-probs only monitored, not in the loss (DAPO has no KL term).
    monitored, metrics = policy_loss(lp, old, adv, mask, agg=agg, **extra, ref_logprobs=ref)
    assert monitored.item() == pytest.approx(pg.item(), rel=1e-12)
    assert metrics["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-12)
    # Split in two halves with global scales: the halves add up.
    tokens, seqs = loss_scale_counts(mask)
    scale = dict(loss_scale_tokens=tokens) if agg == "token-mean" else dict(loss_scale_seqs=seqs)
    halves = sum(kl_loss(lp[s], ref[s], mask[s], agg=agg, **scale, **extra).item()
                 for s in (slice(0, 2), slice(2, 6)))
    assert halves == pytest.approx(kl.item(), abs=1e-12)
