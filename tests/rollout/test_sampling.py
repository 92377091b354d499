"""The sampler draws from, and reports log-probs of, the documented distribution."""

import math

import pytest
import torch

from dapo_megatron.rollout.sampling import (
    row_seed,
    sample_from_logprobs,
    sample_next_tokens,
    truncated_logprobs,
)
from tests.rollout.reference import chi_square_ok, reference_probs

SETTINGS = [
    (1.0, -1, 1.0),
    (0.7, -1, 1.0),
    (1.0, 5, 1.0),
    (1.3, -1, 0.7),
    (0.8, 10, 0.85),
    (1.0, 1, 1.0),
    (1.0, -1, 0.05),  # only the top token survives
]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_truncated_distribution_matches_float64_reference(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=gen) * 2.0
    # Ties at the top-k / nucleus boundary must resolve by token id, as documented.
    logits[1, 7] = logits[1, 3] = logits[1].max() + 0.5
    logits[2, :] = (torch.arange(40) % 4).float()  # four levels of ten tied tokens
    lp = truncated_logprobs(logits, temperature, top_k, top_p)
    assert lp.dtype == torch.float32
    for row in range(logits.shape[0]):
        ref = reference_probs(logits[row].double().tolist(), temperature, top_k, top_p)
        got = lp[row].double().exp().tolist()
        for v, (g, r) in enumerate(zip(got, ref)):
            assert (g == 0.0) == (r == 0.0), f"row {row} token {v}: kept-set mismatch {g} vs {r}"
            assert g == pytest.approx(r, abs=2e-6)


def test_top_k_tie_keeps_lower_token_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    kept = truncated_logprobs(logits, 1.0, top_k=2).isfinite()[0].tolist()
    assert kept == [False, True, True, False, False]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # Mass before token 2 is 0.8: kept for p = 0.81, dropped for p = 0.8.
    assert truncated_logprobs(logits, 1.0, top_p=0.81).isfinite()[0].tolist() == [True, True, True, False]
    assert truncated_logprobs(logits, 1.0, top_p=0.8).isfinite()[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.6, 4, 0.8)])
def test_empirical_frequencies_match_distribution(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 12, generator=gen) * 1.5
    lp = truncated_logprobs(logits, temperature, top_k, top_p)
    draws = 20000
    uniforms = torch.rand(draws, generator=gen, dtype=torch.float64)
    tokens, chosen = sample_from_logprobs(lp.expand(draws, -1), uniforms)
    counts = torch.bincount(tokens, minlength=12).tolist()
    ref = reference_probs(logits[0].double().tolist(), temperature, top_k, top_p)
    ok, stat, crit = chi_square_ok(counts, ref)
    assert ok, f"chi-square {stat:.1f} >= {crit:.1f}; counts {counts}"
    assert torch.allclose(chosen.double(), torch.tensor([math.log(ref[t]) for t in tokens.tolist()], dtype=torch.float64), atol=1e-5)


def test_per_row_streams_do_not_depend_on_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    seeds = [row_seed(7, "req-a", j) for j in range(3)]
    together, _, _ = sample_next_tokens(logits, [torch.Generator().manual_seed(s) for s in seeds], 1.0)
    alone = [
        sample_next_tokens(logits[j : j + 1], [torch.Generator().manual_seed(seeds[j])], 1.0)[0].item()
        for j in range(3)
    ]
    assert together.tolist() == alone
    assert row_seed(7, "req-a", 0) != row_seed(7, "req-a", 1) != row_seed(8, "req-a", 1)


def test_raw_logprobs_are_temperature_one_untruncated():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens, chosen, raw = sample_next_tokens(logits, gens, 0.5, top_k=3, want_raw=True)
    ref_raw = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None])[:, 0]
    assert torch.allclose(raw.double(), ref_raw, atol=1e-6)
    for row in range(4):
        ref_q = reference_probs(logits[row].double().tolist(), 0.5, 3, 1.0)
        assert chosen[row].item() == pytest.approx(math.log(ref_q[tokens[row]]), abs=1e-5)
