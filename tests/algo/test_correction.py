"""Rollout correction and mismatch metrics against float64 references from their
definitions (tests/algo/reference.py), and a perturbed-engine test: each correction's
weights, masks and the change it makes to every loss's gradient."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.algo import (
    CORRECTION_MODES,
    LOSS_AGG,
    LOSS_TYPES,
    correction_bounds,
    correction_weights,
    mismatch_metrics,
    policy_loss,
)

from . import reference
from .reference import agg_extra

BANDS = [(2.0, None), (5.0, 0.5)]  # [1/C, C] with the TIS blog's C = 2; IcePop's [0.5, 5]


def perturbed_engine(seed=0, batch=10, seq=9):
    """pi_old (the trainer's log-probs) and an engine that disagrees with it: small noise on
    every token, large (+-1.8) on about one token in six, and two sequences shifted as a
    whole (one up by 2, one down by 2) so their geometric-mean ratios leave the band."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 3 - 0.05
    noise = torch.randn(batch, seq, generator=g, dtype=torch.float64) * 0.05
    big = (torch.rand(batch, seq, generator=g) < 0.17).double()
    sign = torch.where(torch.rand(batch, seq, generator=g) < 0.5, -1.0, 1.0).double()
    engine = old + noise + big * sign * 1.8
    engine[2] += 2.0
    engine[5] -= 2.0
    lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    lengths[7] = 0
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return old, engine, mask


@pytest.mark.parametrize("mode", CORRECTION_MODES)
@pytest.mark.parametrize("high,low", BANDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_match_reference_inside_and_outside_the_band(mode, high, low, seed):
    old, engine, mask = perturbed_engine(seed)
    lo, hi = correction_bounds(high, low)
    rho = (old - engine).exp()[mask]
    n = mask.sum(-1).clamp(min=1)
    seq_rho = (torch.where(mask, old - engine, 0).sum(-1) / n).exp()[mask.any(-1)]
    for ratios in (rho, seq_rho):  # the data reaches past both ends and stays inside too
        assert (ratios < lo).any() and (ratios > hi).any() and ((ratios > lo) & (ratios < hi)).any()
    got = correction_weights(old, engine, mask, mode, high=high, low=low)
    want = reference.correction_weights(old.tolist(), engine.tolist(), mask.tolist(), mode, high, low)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("high,low", BANDS)
def test_mismatch_metrics_match_reference(high, low):
    old, engine, mask = perturbed_engine(3)
    got = mismatch_metrics(old, engine, mask, high=high, low=low)
    want = reference.mismatch(old.tolist(), engine.tolist(), mask.tolist(), high, low)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert 0 < got["token_outside_frac"] < 1 and 0 < got["seq_outside_frac"] < 1
    assert got["kl_k3"] > 0


def test_mismatch_of_identical_log_probs_is_zero_and_of_an_empty_mask_is_defined():
    old, _, mask = perturbed_engine(0)
    same = mismatch_metrics(old, old.clone(), mask)
    assert same == {"logprob_abs_diff_mean": 0.0, "logprob_abs_diff_max": 0.0, "kl_k3": 0.0,
                    "ppl_ratio": 1.0, "token_outside_frac": 0.0, "seq_outside_frac": 0.0}
    empty = mismatch_metrics(old, old + 1, torch.zeros_like(mask))
    assert empty["ppl_ratio"] == 1.0 and empty["kl_k3"] == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", CORRECTION_MODES)
def test_perturbed_engine_each_correction_scales_each_tokens_gradient_by_its_weight(loss_type, mode):
    """The trainer folds the weights into the advantages (policy/train.py, _prepare). For
    every loss the corrected gradient of each token is exactly weight x the uncorrected
    one: TIS tokens above C are scaled by C, masked tokens and sequences get no gradient,
    the rest are scaled by their ratio (TIS) or untouched (masking)."""
    old, engine, mask = perturbed_engine(4)
    g = torch.Generator().manual_seed(9)
    spread = 1e-3 if loss_type == "gspo" else 0.4
    lp = old + (torch.rand(old.shape, generator=g, dtype=torch.float64) * 2 - 1) * spread
    adv = torch.randn(old.shape[0], generator=g, dtype=torch.float64)
    agg = LOSS_AGG[loss_type]
    kw = dict(agg=agg, loss_type=loss_type, **agg_extra(agg))
    if loss_type == "gspo":
        kw.update(eps_low=3e-4, eps_high=4e-4)

    def grad(advantages):
        x = lp.clone().requires_grad_(True)
        policy_loss(x, old, advantages, mask, **kw)[0].backward()
        return x.grad

    weights = correction_weights(old, engine, mask, mode, high=2.0).double()
    want = torch.tensor(reference.correction_weights(old.tolist(), engine.tolist(), mask.tolist(),
                                                     mode, 2.0), dtype=torch.float64)
    plain = grad(adv)
    corrected = grad(adv[:, None] * weights)
    torch.testing.assert_close(corrected, want * plain, rtol=1e-6, atol=1e-15)
    active = mask & (plain != 0)
    assert active.sum() > 10
    if mode == "none":
        assert torch.equal(corrected, plain)
    elif mode.endswith("mask"):
        dropped = active & (want == 0)
        assert dropped.any() and (corrected[dropped] == 0).all()
        assert torch.equal(corrected[active & (want == 1)], plain[active & (want == 1)])
    else:
        capped = active & (want == 2.0)
        assert capped.any() and torch.allclose(corrected[capped], 2.0 * plain[capped])
        assert (active & (want < 1)).any()  # tokens the engine over-sampled count less


def test_bad_mode_and_band_name_the_argument():
    old, engine, mask = perturbed_engine(0)
    with pytest.raises(ValueError, match="mode"):
        correction_weights(old, engine, mask, "tis")
    with pytest.raises(ValueError, match="high"):
        correction_weights(old, engine, mask, "token-tis", high=0.0)
    with pytest.raises(ValueError, match="low"):
        correction_weights(old, engine, mask, "token-mask", high=2.0, low=3.0)
    with pytest.raises(ValueError, match="engine_logprobs"):
        correction_weights(old, engine[:, :-1], mask, "token-tis")
