"""Independent references for the rollout tests: float64 maths on Python floats, tiny models.

Nothing here imports dapo_megatron.rollout: the sampling distribution is re-derived from
its documented definition (temperature, then top_k, then top_p, ties by token id).
"""

from __future__ import annotations

import math

import torch


def tiny_config(model_type: str = "llama", vocab: int = 96, init_range: float = 0.02, **extra):
    """A 2-layer HF config of the given family, hidden 32."""
    from transformers import AutoConfig

    fields = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        initializer_range=init_range,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3_moe":
        fields.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      decoder_sparse_step=1, norm_topk_prob=True)
    fields.update(extra)
    return AutoConfig.for_model(model_type, **fields)


def reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The documented sampling distribution q, in float64 on Python floats."""
    scaled = [z / temperature for z in logits]
    order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    kept = order if top_k == -1 else order[:top_k]
    m = max(scaled[i] for i in kept)
    z = sum(math.exp(scaled[i] - m) for i in kept)
    p = {i: math.exp(scaled[i] - m) / z for i in kept}
    if top_p < 1.0:
        nucleus, mass = [], 0.0
        for i in kept:
            if mass < top_p:
                nucleus.append(i)
            mass += p[i]
        kept = nucleus
    z = sum(p[i] for i in kept)
    out = [0.0] * len(logits)
    for i in kept:
        out[i] = p[i] / z
    return out


def chi_square_ok(counts: list[int], probs: list[float], alpha_z: float = 3.09) -> tuple[bool, float, float]:
    """Pearson chi-square goodness of fit at alpha ~ 1e-3 (z = 3.09).

    Cells with expected count < 5 are pooled into one. The critical value uses the
    Wilson-Hilferty approximation of the chi-square quantile (no scipy here).
    Returns (passes, statistic, critical value).
    """
    total = sum(counts)
    if any(c > 0 and p == 0.0 for c, p in zip(counts, probs)):
        return False, math.inf, 0.0
    cells, pooled_c, pooled_e = [], 0, 0.0
    for c, p in zip(counts, probs):
        e = p * total
        if e >= 5:
            cells.append((c, e))
        else:
            pooled_c, pooled_e = pooled_c + c, pooled_e + e
    if pooled_e > 0:
        cells.append((pooled_c, pooled_e))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    k = len(cells) - 1
    crit = k * (1 - 2 / (9 * k) + alpha_z * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit, stat, crit


@torch.no_grad()
def full_recompute_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response), V] fp32 logits predicting each response token, no KV cache, no padding."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids, use_cache=False).logits[0].double()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
