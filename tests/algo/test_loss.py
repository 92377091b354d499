"""policy_loss against the float64 reference of tests/algo/reference.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.algo import (
    AGG_MODES,
    finish_metrics,
    loss_scale_counts,
    metric_partials,
    policy_loss,
    reduce_policy_metrics,
)

from . import reference

CASES = [  # (eps_low, eps_high, clip_ratio_c)
    (0.2, 0.28, None),
    (0.2, 0.2, None),
    (0.2, 0.28, 3.0),
    (0.1, 0.5, 1.5),
]


def make_batch(seed: int, batch: int = 7, seq: int = 11, per_token_adv: bool = False):
    """Random log-probs with ratios spread across both clip bounds and past the dual clip,
    ragged right-padded masks (one row fully masked), advantages of both signs and 0."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 4 - 0.01
    log_ratio = (torch.rand(batch, seq, generator=g, dtype=torch.float64) * 2 - 1) * 1.6
    lp = old + log_ratio
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[batch // 2] = 0
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    if per_token_adv:
        adv = torch.randn(batch, seq, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(batch, generator=g, dtype=torch.float64)
        adv[1] = 0.0
    return lp, old, adv, mask


def to_lists(lp, old, adv, mask):
    adv_tok = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    return lp.tolist(), old.tolist(), adv_tok.tolist(), mask.tolist()


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("eps_low,eps_high,clip_c", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_loss_and_gradient_match_float64_reference(
        agg, eps_low, eps_high, clip_c, seed, per_token_adv):
    lp, old, adv, mask = make_batch(seed, per_token_adv=per_token_adv)
    ref_loss, ref_grad = reference.policy_loss_and_grad(
        *to_lists(lp, old, adv, mask), eps_low=eps_low, eps_high=eps_high, agg=agg, c=clip_c)
    # The reference's branches must all be exercised by the data, or the test proves less.
    ratio = (lp - old).exp()[mask]
    signs = (adv[:, None].expand_as(lp) if adv.dim() == 1 else adv)[mask]
    assert (signs > 0).any() and (signs < 0).any()
    assert (ratio < 1 - eps_low).any() and (ratio > 1 + eps_high).any()
    assert ((ratio > 1 - eps_low) & (ratio < 1 + eps_high)).any()
    if clip_c is not None:
        assert (ratio > clip_c).any()

    lp64 = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(lp64, old, adv, mask, eps_low=eps_low, eps_high=eps_high,
                          agg=agg, clip_ratio_c=clip_c, **reference.agg_extra(agg))
    loss.backward()
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_loss, abs=1e-12, rel=1e-12)
    torch.testing.assert_close(lp64.grad, torch.tensor(ref_grad, dtype=torch.float64),
                               atol=1e-12, rtol=1e-12)

    # float32, the precision training uses, agrees to float32 accuracy.
    lp32 = lp.float().requires_grad_(True)
    loss32, _ = policy_loss(lp32, old.float(), adv.float(), mask, eps_low=eps_low,
                            eps_high=eps_high, agg=agg, clip_ratio_c=clip_c,
                            **reference.agg_extra(agg))
    loss32.backward()
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    torch.testing.assert_close(lp32.grad, torch.tensor(ref_grad, dtype=torch.float32),
                               atol=1e-5, rtol=1e-4)


def test_gradient_is_zero_exactly_where_clipped():
    lp, old, adv, mask = make_batch(5, batch=16, seq=16)
    lp.requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0)
    loss.backward()
    ratio = (lp - old).exp().detach()
    a = adv[:, None].expand_as(ratio)
    clipped = ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8)) | ((a < 0) & (ratio > 3.0))
    assert (clipped & mask).sum() > 10 and (~clipped & mask & (a != 0)).sum() > 10
    assert (lp.grad[clipped | ~mask | (a == 0)] == 0).all()
    assert (lp.grad[~clipped & mask & (a != 0)] != 0).all()


def test_loss_is_minus_objective_and_bf16_inputs_compute_in_float32():
    # One token, A = 2, ratio 1.1 (inside the clip): J = 2.2, loss = -2.2.
    old = torch.tensor([[math.log(0.5)]])
    lp = torch.tensor([[math.log(0.55)]])
    loss, _ = policy_loss(lp, old, torch.tensor([2.0]), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(-2.2, rel=1e-6)
    loss_bf16, _ = policy_loss(lp.bfloat16(), old.bfloat16(), torch.tensor([2.0]),
                               torch.ones(1, 1, dtype=torch.bool))
    assert loss_bf16.dtype == torch.float32


@pytest.mark.parametrize("eps_high,bound", [(0.2, 0.012), (0.28, 0.0128)])
def test_paper_example_clip_higher(eps_high, bound):
    """DAPO Sec. 3.1: with eps = 0.2 a token of old probability 0.01 can rise only to
    0.012; with eps_high = 0.28 to 0.0128. The gradient is what moves it, so it must be
    nonzero just below the bound and exactly zero just above."""
    old = torch.tensor([[math.log(0.01)]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    adv = torch.tensor([1.0])

    def grad_at(p):
        lp = torch.tensor([[math.log(p)]], dtype=torch.float64, requires_grad=True)
        loss, _ = policy_loss(lp, old.double(), adv.double(), mask, eps_low=0.2, eps_high=eps_high)
        loss.backward()
        return lp.grad.item()

    assert grad_at(bound * (1 - 1e-4)) < 0  # minimising -J: the step raises the log-prob
    assert grad_at(bound * (1 + 1e-4)) == 0.0
    assert grad_at(0.0125) == (0.0 if eps_high == 0.2 else pytest.approx(-1.25))

    # Gradient ascent on the token's log-prob stalls at the bound (overshoot <= one step).
    lp = torch.tensor([[math.log(0.01)]], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([lp], lr=1e-3)
    for _ in range(1000):
        optimizer.zero_grad()
        loss, _ = policy_loss(lp, old.double(), adv.double(), mask, eps_low=0.2, eps_high=eps_high)
        loss.backward()
        optimizer.step()
    final_p = lp.exp().item()
    assert bound <= final_p <= bound * (1 + 1.5e-3)


def test_dual_clip_bounds_negative_advantage():
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[math.log(5.0), math.log(2.0), math.log(0.5)]], dtype=torch.float64,
                      requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    loss, metrics = policy_loss(lp, old, adv, mask, agg="seq-mean-token-sum", clip_ratio_c=3.0)
    loss.backward()
    # Token 0: r = 5 > c, objective c*A = -3. Token 1: r = 2, objective r*A = -2.
    # Token 2: r = 0.5 < 0.8, objective clip*A = -0.8. Loss = 3 + 2 + 0.8.
    assert loss.item() == pytest.approx(5.8)
    assert lp.grad[0].tolist() == pytest.approx([0.0, 2.0, 0.0])
    assert metrics["dual_clip_frac"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 3)
    without, _ = policy_loss(lp, old, adv, mask, agg="seq-mean-token-sum")
    assert without.item() == pytest.approx(5 + 2 + 0.8)


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    agg=st.sampled_from(AGG_MODES),
    assignment=st.lists(st.integers(0, 4), min_size=9, max_size=9),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_any_split_sums_to_unsplit_loss(seed, agg, assignment, dtype):
    """Rows dealt to up to 5 micro-batches / ranks in any pattern (empty pieces allowed):
    with the global normaliser, pieces' losses and gradients add up to the whole's, to
    1e-6 absolute for losses of order 1 (relative 1e-6 for larger ones: the float32 ulp
    of a loss near 10 is already 1e-6) and to 1e-12 in float64."""
    lp, old, adv, mask = make_batch(seed, batch=9, seq=13)
    lp, old, adv = lp.to(dtype), old.to(dtype), adv.to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    tokens, seqs = loss_scale_counts(mask)
    scale = dict(loss_scale_tokens=tokens) if agg == "token-mean" else dict(loss_scale_seqs=seqs)
    scale.update(reference.agg_extra(agg))

    whole_lp = lp.clone().requires_grad_(True)
    whole, whole_metrics = policy_loss(whole_lp, old, adv, mask, agg=agg, clip_ratio_c=3.0,
                                       **reference.agg_extra(agg))
    whole.backward()

    pieces_lp = lp.clone().requires_grad_(True)
    owner = torch.tensor(assignment)
    total = 0.0
    piece_metrics = []
    counted_tokens = counted_seqs = 0
    for piece in range(5):
        rows = (owner == piece).nonzero().flatten()
        piece_tokens, piece_seqs = loss_scale_counts(mask[rows])
        counted_tokens += int(piece_tokens)
        counted_seqs += int(piece_seqs)
        loss, metrics = policy_loss(pieces_lp[rows], old[rows], adv[rows], mask[rows],
                                    agg=agg, clip_ratio_c=3.0, **scale)
        loss.backward()
        total += loss.item()
        piece_metrics.append(metrics)
    assert (counted_tokens, counted_seqs) == (int(tokens), int(seqs))
    assert total == pytest.approx(whole.item(), abs=tol * max(1.0, abs(whole.item())), rel=0)
    torch.testing.assert_close(pieces_lp.grad, whole_lp.grad, atol=tol / 10, rtol=tol * 10)

    combined = reduce_policy_metrics(piece_metrics)
    for name in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl",
                 "ratio_mean", "ratio_max", "num_tokens"):
        assert combined[name] == pytest.approx(whole_metrics[name].item(), abs=1e-5, rel=1e-5)
    assert combined["loss"] == pytest.approx(total, rel=1e-12)


def test_seq_mean_modes_refuse_a_token_count():
    lp, old, adv, mask = make_batch(0)
    with pytest.raises(ValueError, match="loss_scale_seqs"):
        policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean", loss_scale_tokens=40)


def test_metrics_against_reference():
    lp, old, adv, mask = make_batch(3, batch=12, seq=9)
    _, metrics = policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0)
    low = high = dual = n = 0
    kl, ratios = [], []
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            n += 1
            r = math.exp(lp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            low += a < 0 and r < 0.8
            high += a > 0 and r > 1.28
            dual += a < 0 and r > 3.0
            kl.append(old[i, t].item() - lp[i, t].item() + r - 1)  # k3 of KL(old || new)
            ratios.append(r)
    for name in metrics:
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad
    assert metrics["num_tokens"].item() == n
    assert metrics["clip_frac_low"].item() == pytest.approx(low / n)
    assert metrics["clip_frac_high"].item() == pytest.approx(high / n)
    assert metrics["dual_clip_frac"].item() == pytest.approx(dual / n)
    assert metrics["approx_kl"].item() == pytest.approx(math.fsum(kl) / n)
    assert metrics["ratio_mean"].item() == pytest.approx(math.fsum(ratios) / n)
    assert metrics["ratio_max"].item() == pytest.approx(max(ratios))


def test_masked_positions_are_ignored_even_if_not_finite():
    lp, old, adv, mask = make_batch(4)
    garbage_lp = lp.masked_fill(~mask, float("nan")).requires_grad_(True)
    garbage_old = old.masked_fill(~mask, float("-inf"))
    garbage_ref = (lp - 0.1).masked_fill(~mask, float("nan"))
    clean, _ = policy_loss(lp, old, adv, mask, ref_logprobs=lp - 0.1, kl_coef=0.1)
    dirty, metrics = policy_loss(garbage_lp, garbage_old, adv, mask,
                                 ref_logprobs=garbage_ref, kl_coef=0.1)
    dirty.backward()
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)
    assert torch.isfinite(garbage_lp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_empty_mask_gives_zero_loss_not_nan():
    lp = torch.zeros(2, 3, requires_grad=True)
    for agg in AGG_MODES:
        loss, metrics = policy_loss(lp, lp.detach(), torch.ones(2), torch.zeros(2, 3), agg=agg,
                                    **reference.agg_extra(agg))
        assert loss.item() == 0.0
        assert metrics["num_tokens"].item() == 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(agg="sequence"), "agg"),
    (dict(eps_low=1.0), "eps_low"),
    (dict(eps_high=-0.1), "eps_high"),
    (dict(clip_ratio_c=1.0), "clip_ratio_c"),
    (dict(kl_coef=0.1), "ref_logprobs"),
    (dict(kl_kind="k4"), "kl_kind"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    lp, old, adv, mask = make_batch(0)
    with pytest.raises(ValueError, match=field):
        policy_loss(lp, old, adv, mask, **kwargs)


def test_shape_errors_name_the_tensor():
    lp, old, adv, mask = make_batch(0)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(lp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(lp, old, adv, mask[:-1])


def test_metric_partials_combined_across_ranks_equal_one_reduction_of_the_whole_batch():
    """What the policy's distributed reduction relies on: per-rank partials, combined as an
    all-reduce would (SUM, then MAX), finish to the metrics of the unsplit batch."""
    lp, old, adv, mask = make_batch(3, batch=12)
    scale = dict(zip(("loss_scale_tokens", "loss_scale_seqs"), loss_scale_counts(mask)))
    _, whole = policy_loss(lp, old, adv, mask, clip_ratio_c=3.0, **scale)
    calls = [policy_loss(lp[r], old[r], adv[r], mask[r], clip_ratio_c=3.0, **scale)[1]
             for r in (slice(0, 3), slice(3, 5), slice(5, 9), slice(9, 12))]
    ranks = [metric_partials(calls[:1]), metric_partials(calls[1:3]), metric_partials(calls[3:])]
    n = len(ranks[0]) // 4
    combined = torch.cat([sum(p[: 3 * n] for p in ranks),
                          torch.stack([p[3 * n:] for p in ranks]).max(dim=0).values])
    got = finish_metrics(combined)
    assert got == reduce_policy_metrics(calls)
    assert set(got) == set(whole)  # kl_loss: no call reported it, so it is left out
    for name, value in whole.items():
        assert got[name] == pytest.approx(value.item(), abs=1e-9), name


def test_metric_reduction_skips_calls_without_a_key_and_refuses_unknown_keys():
    calls = [{"num_tokens": 2.0, "kl_loss": 0.5, "approx_kl": 0.1},
             {"num_tokens": 6.0, "approx_kl": 0.3}]
    got = reduce_policy_metrics(calls)
    assert got == {"num_tokens": 8.0, "kl_loss": 0.5, "approx_kl": pytest.approx((0.2 + 1.8) / 8)}
    with pytest.raises(ValueError, match="'entropy'"):
        reduce_policy_metrics([{"num_tokens": 1.0, "entropy": 0.1}])
    assert reduce_policy_metrics([{"num_tokens": 0.0, "entropy": 0.7}],
                                 {"num_tokens": "sum", "entropy": "token_mean"}) == \
        {"num_tokens": 0.0, "entropy": 0.0}
