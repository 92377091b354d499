"""Soft overlong punishment at its boundaries, worked by hand, and overlong filtering."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.algo import overlong_filter_mask, overlong_penalty, policy_loss


def test_paper_setting_by_hand():
    # L_max 20480, L_cache 4096 (DAPO Sec. 4.1): the band is (16384, 20480].
    lengths = torch.tensor([0, 16383, 16384, 16385, 18432, 20479, 20480, 20481, 40000])
    expected = [0.0, 0.0, 0.0, -1 / 4096, -0.5, -4095 / 4096, -1.0, -1.0, -1.0]
    got = overlong_penalty(lengths, max_len=20480, cache_len=4096)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, abs=1e-7)


def test_small_numbers_and_factor():
    # L_max 10, L_cache 4: soft start 6; |y| = 7 -> -1/4, 8 -> -2/4, 10 -> -1, 11 -> -1.
    lengths = torch.tensor([6, 7, 8, 10, 11])
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, -0.25, -0.5, -1, -1])
    assert overlong_penalty(lengths, 10, 4, factor=0.5).tolist() == pytest.approx(
        [0, -0.125, -0.25, -0.5, -0.5])


def test_zero_cache_only_punishes_past_max_len():
    lengths = torch.tensor([0, 9, 10, 11])
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0, 0.0, 0.0, -1.0]


@pytest.mark.parametrize("max_len,cache_len,field", [(10, 10, "cache_len"), (10, -1, "cache_len"),
                                                      (0, 0, "max_len")])
def test_bad_lengths_name_the_field(max_len, cache_len, field):
    with pytest.raises(ValueError, match=field):
        overlong_penalty(torch.tensor([1]), max_len, cache_len)


def test_filter_mask_removes_truncated_samples_from_the_loss():
    truncated = torch.tensor([False, True, False, True])
    keep = overlong_filter_mask(truncated)
    assert keep.tolist() == [True, False, True, False]
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    old = lp + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        filtered, _ = policy_loss(lp, old, adv, mask & keep[:, None], agg=agg)
        only_kept, _ = policy_loss(lp[keep], old[keep], adv[keep], mask[keep], agg=agg)
        assert filtered.item() == pytest.approx(only_kept.item(), rel=1e-12)
