"""group_advantages against a float64 reference built on the statistics module."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from dapo_megatron.algo import group_advantages


def reference(rows, eps, unbiased):
    out = []
    for row in rows:
        if len(set(row)) <= 1:
            out.append([0.0] * len(row))
            continue
        mean = statistics.fmean(row)
        std = statistics.stdev(row) if unbiased else statistics.pstdev(row)
        out.append([(r - mean) / (std + eps) for r in row])
    return out


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(unbiased, seed):
    g = torch.Generator().manual_seed(seed)
    binary = torch.randint(0, 2, (20, 16), generator=g).double() * 2 - 1   # +-1 rewards
    shaped = binary + torch.rand(20, 16, generator=g, dtype=torch.float64) * -0.5
    binary[3] = 1.0   # all correct
    binary[4] = -1.0  # all wrong
    shaped[5] = 0.1   # equal but not exactly representable
    for rewards in (binary, shaped):
        expected = torch.tensor(reference(rewards.tolist(), 1e-6, unbiased), dtype=torch.float64)
        torch.testing.assert_close(group_advantages(rewards, unbiased=unbiased), expected,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(group_advantages(rewards.float(), unbiased=unbiased),
                                   expected.float(), rtol=1e-5, atol=1e-5)


def test_default_std_is_unbiased_by_hand():
    # Rewards [1, -1, -1, -1]: mean -0.5, squared deviations sum to 3, so the unbiased
    # std is sqrt(3 / 3) = 1 and the population std sqrt(3 / 4).
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    assert group_advantages(rewards, eps=0.0)[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    pop = 1.5 / (math.sqrt(3) / 2)
    assert group_advantages(rewards, eps=0.0, unbiased=False)[0, 0].item() == pytest.approx(pop)
    assert group_advantages(rewards, eps=1.0)[0, 0].item() == pytest.approx(1.5 / 2)


def test_degenerate_groups_give_zero():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0]])
    assert (group_advantages(rewards) == 0).all()
    assert group_advantages(torch.tensor([[1.0], [-1.0]])).tolist() == [[0.0], [0.0]]  # G = 1
    assert group_advantages(torch.tensor([[1, 0]])).dtype == torch.float32  # int rewards


def test_advantages_sum_to_zero_per_group():
    g = torch.Generator().manual_seed(3)
    adv = group_advantages(torch.randn(50, 8, generator=g, dtype=torch.float64))
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(50, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_rejects_wrong_shape():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(16))
