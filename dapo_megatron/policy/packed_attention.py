"""megatron-core's local (CPU) attention for THD packed rows.

megatron-core 0.16.1's ``DotProductAttention`` (transformer/dot_product_attention.py)
refuses ``packed_seq_params`` ("Please use TEDotProductAttention instead"), and a
block-diagonal mask over the whole packed row costs ``width**2`` scores where the
sequences need at most ``n * longest**2``: on a 16x length spread that made packed rows
2.8x slower than padded ones on CPU. ``PackedDotProductAttention`` takes THD inputs the
way megatron's ``Attention.forward`` hands them to TE (transformer/attention.py: query,
key and value squeezed to ``[tokens, heads, dim]`` after RoPE was applied per sequence
through ``cu_seqlens``), lays the sequences' padded extents (``cu_seqlens_q_padded``) out
as right-padded rows (one group of rows per length class, longest under twice the
shortest), runs the parent's causal attention once per group, and takes the packed tokens
back with one index (a loop over single sequences cost more in per-op overhead on CPU).
Only the attention sees the padding; every other layer runs on packed tokens.
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
        groups, to_packed = _row_layout(bounds.tolist())
        outputs = []
        for to_rows in groups:
            rows, n = to_rows.shape
            index = to_rows.reshape(-1).to(query.device)

            def as_rows(t):  # [tokens, heads, dim] -> [longest, n, heads, dim], right-padded
                return t.index_select(0, index).view(rows, n, *t.shape[1:])

            # With attention_mask None the parent's softmax applies the causal mask
            # (fusions/fused_softmax.py, forward_torch_softmax): exact for real tokens,
            # since padding only follows them.
            out = super().forward(as_rows(query), as_rows(key), as_rows(value), None,
                                  attn_mask_type, attention_bias)  # [longest, n, hp]
            outputs.append(out.reshape(rows * n, -1))
        return torch.cat(outputs).index_select(0, to_packed.to(query.device))[:, None]


def _row_layout(bounds: list[int]):
    """From cumulative extents ``[n + 1]``: sequences grouped by length (each group's
    longest under twice its shortest, so a group's rows are at least half real tokens), and
    per group ``to_rows`` ``[longest, group size]``, the packed token at column c of each
    sequence (past its end, its last token); ``to_packed`` ``[tokens]``, each packed
    token's place in the groups' outputs, flattened ``[longest, group size]`` one after
    the other."""
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    grouped: list[list[int]] = []
    for k in order:
        if grouped and 2 * lengths[k] > lengths[grouped[-1][0]]:
            grouped[-1].append(k)
        else:
            grouped.append([k])
    groups, to_packed, offset = [], torch.empty(bounds[-1], dtype=torch.long), 0
    for members in grouped:
        n, longest = len(members), lengths[members[0]]
        column = torch.arange(longest)[:, None]
        first = torch.tensor([starts[k] for k in members])
        size = torch.tensor([lengths[k] for k in members])
        groups.append(first[None, :] + torch.minimum(column, size[None, :] - 1))
        for j, k in enumerate(members):
            to_packed[starts[k]:starts[k] + lengths[k]] = offset + torch.arange(lengths[k]) * n + j
        offset += longest * n
    return groups, to_packed


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
