"""entropy_from_logits against a float64 reference, and at the numerical extremes."""

from __future__ import annotations

import math

import pytest
import torch

from dapo_megatron.algo import entropy_from_logits


def reference_entropy(row):
    finite = [x for x in row if x != -math.inf]
    top = max(finite)
    z = math.fsum(math.exp(x - top) for x in finite)
    probs = [math.exp(x - top) / z for x in finite]
    return -math.fsum(p * math.log(p) for p in probs if p > 0)


def test_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 4
    logits[0, 0, :10] = -math.inf
    expected = torch.tensor([[reference_entropy(r) for r in batch] for batch in logits.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(entropy_from_logits(logits), expected, rtol=1e-12, atol=1e-12)
    got32 = entropy_from_logits(logits.float())
    assert got32.dtype == torch.float32 and got32.shape == (3, 5)
    torch.testing.assert_close(got32, expected.float(), rtol=1e-5, atol=1e-5)


def test_low_precision_input_is_computed_in_float32():
    logits = torch.randn(4, 1000).bfloat16()
    got = entropy_from_logits(logits)
    assert got.dtype == torch.float32
    expected = [reference_entropy(r) for r in logits.float().tolist()]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_extremes_are_finite_and_exact():
    uniform = torch.zeros(2, 128)
    assert entropy_from_logits(uniform).tolist() == pytest.approx([math.log(128)] * 2)
    huge = torch.tensor([[1e4, 0.0, -1e4], [3e38, 3e38, -3e38]])
    assert entropy_from_logits(huge).tolist() == pytest.approx([0.0, math.log(2)], abs=1e-6)
    masked = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]], requires_grad=True)
    h = entropy_from_logits(masked)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2))
    assert torch.isfinite(masked.grad).all()


def test_gradient_matches_float64_reference():
    # dH/dz_j = -p_j (log p_j + H)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True)
    entropy_from_logits(logits).backward()
    row = logits.detach().tolist()
    z = math.fsum(math.exp(x) for x in row)
    probs = [math.exp(x) / z for x in row]
    h = reference_entropy(row)
    expected = [-p * (math.log(p) + h) for p in probs]
    assert logits.grad.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-15)
