"""megatron-core's local (CPU) attention for THD packed rows.

megatron-core 0.16.1's ``DotProductAttention`` (transformer/dot_product_attention.py)
refuses ``packed_seq_params`` ("Please use TEDotProductAttention instead"), and a
block-diagonal mask over the whole packed row costs ``width**2`` scores where the
sequences need at most ``n * longest**2``. ``PackedDotProductAttention`` takes THD inputs
the way megatron's ``Attention.forward`` hands them to TE (transformer/attention.py: query,
key and value squeezed to ``[tokens, heads, dim]`` after RoPE was applied per sequence
through ``cu_seqlens``), lays the sequences' padded extents (``cu_seqlens_q_padded``) out
as right-padded rows (one group of rows per length class, longest under twice the
shortest; a sequence alone in its class is a slice of the row, not a copy) and runs
torch's fused causal ``scaled_dot_product_attention`` once per group: on CPU that kernel
skips the masked half of the scores and keeps no ``[rows, heads, L, L]`` probabilities
for backward, where the parent's baddbmm, mask, softmax and bmm materialise them (about
a quarter of a packed train step's CPU time went there, issue 18). The packed tokens
come back with one index. Only the attention sees the group padding; every other layer runs on
packed tokens. Without ``packed_seq_params`` it is the parent unchanged (padded rows keep
megatron's attention and their dense mask).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
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
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            raise ValueError("packed attention on CPU supports the vanilla softmax without a "
                             "sliding window; set trainer.sequence_packing=false for this model")
        bounds = packed_seq_params.cu_seqlens_q_padded
        if bounds is None:
            bounds = packed_seq_params.cu_seqlens_q
        groups, to_packed = _row_layout(tuple(bounds.tolist()))
        # The parent's scale: softmax_scale, times the layer coefficient its softmax applies
        # under apply_query_key_layer_scaling (fusions/fused_softmax.py, forward_torch_softmax).
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        dropout = self.attention_dropout.p if self.training else 0.0
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        outputs = []
        for group in groups:
            if isinstance(group, tuple):  # one sequence: [start, end) of the row
                start, length = group[0], group[1] - group[0]
                n, rows = 1, length

                def as_batch(t):  # [tokens, heads, dim] -> [1, heads, length, dim]
                    return t.narrow(0, start, length).transpose(0, 1)[None]
            else:
                n, rows = group.shape
                index = group.reshape(-1).to(query.device)

                def as_batch(t):  # -> [n, heads, longest, dim], right-padded
                    return t.index_select(0, index).view(n, rows, *t.shape[1:]).transpose(1, 2)

            out = F.scaled_dot_product_attention(
                as_batch(query), as_batch(key), as_batch(value), dropout_p=dropout,
                is_causal=True, scale=scale, enable_gqa=gqa)  # [n, heads, rows, dim]
            outputs.append(out.transpose(1, 2).reshape(n * rows, -1))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if to_packed is not None:
            out = out.index_select(0, to_packed.to(query.device))
        return out[:, None]  # [tokens, 1, heads * dim], as TE's THD attention returns


@functools.lru_cache(maxsize=256)
def _row_layout(bounds: tuple[int, ...]):
    """From cumulative extents ``[n + 1]`` (one micro-batch's, the same for every layer:
    cached): sequences grouped by length (each group's longest under twice its shortest, so
    a group's rows are at least half real tokens). Per group, ``(start, end)`` of the row
    for a sequence alone in its group, else ``to_rows`` ``[group size, longest]``: the
    packed token at column c of each sequence (past its end, its last token, which causal
    attention never lets a real token see). ``to_packed`` ``[tokens]``: each packed token's
    place in the groups' outputs, flattened ``[group size, longest]`` one after the other;
    None when that is already the row's order."""
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
        if n == 1:
            groups.append((starts[members[0]], starts[members[0]] + longest))
        else:
            column = torch.arange(longest)[None, :]
            first = torch.tensor([starts[k] for k in members])
            size = torch.tensor([lengths[k] for k in members])
            groups.append(first[:, None] + torch.minimum(column, size[:, None] - 1))
        for j, k in enumerate(members):
            to_packed[starts[k]:starts[k] + lengths[k]] = offset + j * longest + \
                torch.arange(lengths[k])
        offset += longest * n
    if offset == bounds[-1] and torch.equal(to_packed, torch.arange(offset)):
        to_packed = None
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
