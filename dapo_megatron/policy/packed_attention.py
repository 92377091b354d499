"""megatron-core's local (CPU) attention for THD packed rows.

megatron-core 0.16.1's ``DotProductAttention`` (transformer/dot_product_attention.py)
refuses ``packed_seq_params`` ("Please use TEDotProductAttention instead"), and a
block-diagonal mask over the whole packed row costs ``width**2`` scores where the
sequences need at most ``n * longest**2``: on a 16x length spread that made packed rows
2.8x slower than padded ones on CPU. ``PackedDotProductAttention`` takes THD inputs the
way megatron's ``Attention.forward`` hands them to TE (transformer/attention.py: query,
key and value squeezed to ``[tokens, heads, dim]`` after RoPE was applied per sequence
through ``cu_seqlens``), lays the sequences' padded extents (``cu_seqlens_q_padded``) out
as right-padded rows with one index, runs the parent's causal attention once, and takes
the packed tokens back with another (a loop over sequences cost more in per-op overhead
on CPU). Only the attention sees the padding; every other layer runs on packed tokens.
Without ``packed_seq_params`` it is the parent unchanged."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["PackedDotProductAttention", "spec_with_packed_local_attention"]


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also accepts THD ``packed_seq_params`` (see module)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention needs qkv_format 'thd', got "
                             f"{packed_seq_params.qkv_format!r}")
        bounds = packed_seq_params.cu_seqlens_q_padded
        if bounds is None:
            bounds = packed_seq_params.cu_seqlens_q
        to_rows, to_packed = _row_indices(bounds.to(query.device).long(), query.shape[0])
        rows, n = to_rows.shape

        def as_rows(t):  # [tokens, heads, dim] -> [longest, n, heads, dim], right-padded
            return t.index_select(0, to_rows.reshape(-1)).view(rows, n, *t.shape[1:])

        # One call on the sequences as right-padded rows: with attention_mask None the
        # parent's softmax applies the causal mask (fusions/fused_softmax.py,
        # forward_torch_softmax), exact for real tokens since padding only follows them.
        out = super().forward(as_rows(query), as_rows(key), as_rows(value), None,
                              attn_mask_type, attention_bias)  # [longest, n, hp]
        return out.reshape(rows * n, -1).index_select(0, to_packed)[:, None]  # [tokens, 1, hp]


def _row_indices(bounds, tokens: int):
    """From cumulative extents ``[n + 1]``: ``to_rows`` ``[longest, n]`` (the packed token
    at column c of sequence k; past its end, its last token) and ``to_packed`` ``[tokens]``
    (the flat ``c * n + k`` of every packed token)."""
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    n, longest = len(lengths), int(lengths.max())
    column = torch.arange(longest, device=bounds.device)[:, None]
    to_rows = starts[None, :] + torch.minimum(column, lengths[None, :] - 1)
    sequence = torch.repeat_interleave(torch.arange(n, device=bounds.device), lengths)
    to_packed = (torch.arange(tokens, device=bounds.device) - starts[sequence]) * n + sequence
    return to_rows, to_packed


def spec_with_packed_local_attention(block_spec):
    """``block_spec`` with megatron's local ``DotProductAttention`` replaced by
    ``PackedDotProductAttention`` (TE specs are returned unchanged)."""
    layers = []
    for spec in block_spec.layer_specs:
        attn = spec.submodules.self_attention
        sub = getattr(attn, "submodules", None)
        if sub is not None and getattr(sub, "core_attention", None) is DotProductAttention:
            attn = dataclasses.replace(attn, submodules=dataclasses.replace(
                sub, core_attention=PackedDotProductAttention))
            spec = dataclasses.replace(spec, submodules=dataclasses.replace(
                spec.submodules, self_attention=attn))
        layers.append(spec)
    return dataclasses.replace(block_spec, layer_specs=layers)
