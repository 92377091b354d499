"""fp32 token sampling with temperature, top-k and top-p, and the log-probs of what was drawn.

The distribution a token is drawn from, for one row of logits z [V]:
  1. s = float32(z) / temperature
  2. top_k (k != -1): keep the k largest s (ties broken by lower token id first)
  3. top_p (p < 1): order the kept tokens by probability (same tie rule), keep the
     shortest prefix whose cumulative probability reaches p, i.e. token r is kept iff
     the mass of the tokens ranked before it is < p (the most likely token is always kept)
  4. renormalise over the kept tokens: q = softmax(s restricted to the kept set)
The returned log-prob of the drawn token is log q(token). Order and tie rule match SGLang
and transformers (temperature, then top_k, then top_p). Where the mass before a token
equals p exactly, fp32 rounding of the cumulative sum decides whether it is kept.

Sampling is inverse-CDF with one uniform per row, so a row's draw depends only on its
own random stream (per-sequence torch.Generator), never on the batch it sits in.
"""

from __future__ import annotations

import hashlib

import torch

from dapo_megatron import dtypes


def row_seed(seed: int, request_id: str, sample_index: int) -> int:
    """A 63-bit seed for one sequence's stream, stable across processes and batchings."""
    digest = hashlib.blake2b(f"{seed}|{request_id}|{sample_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def draw_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """[B] float64 uniforms in [0, 1), one from each row's generator."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


def truncated_logprobs(
    logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0
) -> torch.Tensor:
    """Log-probs of the sampling distribution q over the vocabulary (module doc).

    logits: [B, V] any float dtype. Returns [B, V] float32, -inf outside the kept set.
    """
    scaled = logits.float() / temperature
    if top_k == -1 and top_p >= 1.0:
        return torch.log_softmax(scaled, dim=-1)
    vocab = scaled.shape[-1]
    # Stable descending sort keeps equal logits in token-id order (the documented tie rule).
    sorted_scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sorted_scaled, dtype=torch.bool)
    if top_k != -1 and top_k < vocab:
        keep[:, top_k:] = False
    if top_p < 1.0:
        probs = torch.softmax(sorted_scaled.masked_fill(~keep, float("-inf")), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep &= mass_before < top_p
    sorted_lp = torch.log_softmax(sorted_scaled.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.empty_like(sorted_lp).scatter_(-1, order, sorted_lp)


def sample_from_logprobs(
    logprobs: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw: logprobs [B, V] of q, uniforms [B] in [0, 1).

    Returns (tokens [B] int64, logprob of each drawn token [B] float32).
    """
    probs = logprobs.double().exp()
    cdf = torch.cumsum(probs, dim=-1)
    # Scaling u by the row total keeps the draw inside the support even when the fp64 sum
    # is a hair below 1; a zero-probability token can never be the first index with cdf > u.
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    tokens = tokens.clamp_(max=logprobs.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_next_tokens(
    logits: torch.Tensor,
    generators: list[torch.Generator],
    temperature: float,
    top_k: int = -1,
    top_p: float = 1.0,
    want_raw: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One decoding step for a batch.

    logits: [B, V]; generators: B per-row streams.
    Returns tokens [B] int64, logprobs [B] fp32 under q, and raw logprobs [B] (temperature 1,
    untruncated; fp32, fp64 for fp64 logits) when want_raw else None.
    """
    logprobs = truncated_logprobs(logits, temperature, top_k, top_p)
    # The streams are CPU generators (portable, cheap); only B uniforms cross to the device.
    uniforms = draw_uniforms(generators).to(logits.device)
    tokens, chosen = sample_from_logprobs(logprobs, uniforms)
    raw = None
    if want_raw:
        wide = logits.to(dtypes.at_least_fp32(logits.dtype))
        raw = torch.log_softmax(wide, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen, raw
