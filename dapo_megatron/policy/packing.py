"""Packed sequences: several sequences of a micro-batch laid end to end in one row.

A packed micro-batch is one row ``[1, width]`` holding its ``n`` sequences back to back
(THD layout: tokens, heads, dim, no batch padding). Each sequence starts at a multiple of
``seq_align`` (2 * CP under context parallelism: megatron splits every sequence into
2 * CP equal chunks) and the row is padded at its end to a multiple of ``row_align``
(TP under sequence parallelism, x16 under FP8, x CP). What the model needs to see the
sequences as separate:

- GPU (Transformer Engine): ``PackedSeqParams`` with ``qkv_format="thd"`` and the
  sequences' cumulative lengths (``packed_seq_params``). Megatron then applies RoPE per
  sequence (transformer/attention.py, Attention.forward: ``apply_rotary_pos_emb(...,
  cu_seqlens=cu_seqlens_q)``) and TE's attention runs ``padding_causal`` over the
  sequences (extensions/transformer_engine.py, TEDotProductAttention.forward: thd turns
  ``causal`` into ``padding_causal``).
- CPU: the same ``PackedSeqParams``. Megatron's RoPE path is plain torch
  (models/common/embeddings/rope_utils.py, _apply_rotary_pos_emb_thd); its local
  attention refuses packed rows, so the local spec's core attention is replaced by
  ``packed_attention.PackedDotProductAttention``, which attends within each sequence.
  (A block-diagonal mask over the whole row would be exact too, but costs width**2.)

Log-probs and entropy are computed on the packed row and scattered back to the padded
``[n, L]`` layout of the micro-batch (``micro_logprobs``), so the loss, its masks and its
normalisers are the same code for packed and padded micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PackedLayout", "micro_logprobs", "model_inputs", "pack", "packed_seq_params",
    "packed_width", "unpack",
]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def packed_width(lengths: Sequence[int], seq_align: int = 1, row_align: int = 1) -> int:
    """Width of the packed row of sequences of ``lengths`` (the one rule the planner and
    ``pack`` share): each sequence rounded up to ``seq_align``, the sum to ``row_align``."""
    total = sum(_round_up(int(n), seq_align) for n in lengths)
    return _round_up(max(total, 1), math.lcm(seq_align, row_align))


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence of a packed row lies.

    ``seq_lens[k]`` real tokens of sequence k start at ``starts[k]``; its padded extent ends
    at ``ends[k]`` (the next start; the last one at ``width``, so the row's tail padding
    belongs to the last sequence, as TE's ``cu_seqlens_padded`` wants it).
    """

    seq_lens: tuple[int, ...]
    starts: tuple[int, ...]
    width: int

    @property
    def ends(self) -> tuple[int, ...]:
        return self.starts[1:] + (self.width,)

    @property
    def real_tokens(self) -> int:
        return sum(self.seq_lens)

    def cu_seqlens(self, padded: bool = False) -> torch.Tensor:
        """``[n + 1]`` int32 cumulative lengths (real, or padded extents)."""
        if padded:
            return torch.tensor((0,) + self.ends, dtype=torch.int32)
        return torch.tensor([0] + list(torch.tensor(self.seq_lens).cumsum(0).tolist()),
                            dtype=torch.int32)

    def position_ids(self) -> torch.Tensor:
        """``[1, width]``: 0.. within each sequence's padded extent."""
        pos = torch.empty(self.width, dtype=torch.long)
        for a, b in zip(self.starts, self.ends):
            pos[a:b] = torch.arange(b - a)
        return pos[None]

    def scatter_index(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed columns, flat ``row * width + column`` of the padded layout) of every
        real token after its sequence's first (column 0 has no prediction)."""
        src, dst = [], []
        for k, (a, n) in enumerate(zip(self.starts, self.seq_lens)):
            src.append(torch.arange(a + 1, a + n))
            dst.append(torch.arange(k * width + 1, k * width + n))
        return torch.cat(src), torch.cat(dst)


def pack(input_ids: torch.Tensor, seq_lens: torch.Tensor, *, seq_align: int = 1,
         row_align: int = 1, min_width: int = 0, pad_id: int = 0):
    """Right-padded rows ``[n, L]`` with ``seq_lens`` ``[n]`` -> ``(ids [1, width], layout)``."""
    lens = [int(x) for x in seq_lens.tolist()]
    width = max(packed_width(lens, seq_align, row_align),
                _round_up(max(min_width, 1), math.lcm(seq_align, row_align)))
    starts, offset = [], 0
    for n in lens:
        starts.append(offset)
        offset += _round_up(n, seq_align)
    ids = torch.full((1, width), pad_id, dtype=input_ids.dtype)
    for k, (a, n) in enumerate(zip(starts, lens)):
        ids[0, a:a + n] = input_ids[k, :n]
    return ids, PackedLayout(tuple(lens), tuple(starts), width)


def unpack(values: torch.Tensor, layout: PackedLayout, rows: int, width: int) -> torch.Tensor:
    """Packed per-token ``values`` ``[packed width]`` (aligned with the packed ids) ->
    ``[rows, width]`` in the padded layout; column 0 and padding are 0. Differentiable."""
    src, dst = (i.to(values.device) for i in layout.scatter_index(width))
    flat = values.new_zeros(rows * width).index_copy(0, dst, values.index_select(0, src))
    return flat.view(rows, width)


def packed_seq_params(layout: PackedLayout, device=None, cp_group=None):
    """megatron-core's ``PackedSeqParams`` (packed_seq_params.py) for TE's THD attention:
    real and padded cumulative lengths (the padded ones locate each sequence in the row,
    the real ones bound attention), the longest padded extent as ``max_seqlen``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    real, padded = layout.cu_seqlens().to(device), layout.cu_seqlens(padded=True).to(device)
    longest = max(b - a for a, b in zip(layout.starts, layout.ends))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                           max_seqlen_q=longest, max_seqlen_kv=longest, cp_group=cp_group)


def model_inputs(mb, chunk, device):
    """``(input_ids, position_ids, attention_mask, packed_seq_params)`` of micro-batch ``mb``
    for ``chunk``'s forward: a packed row (``mb.packed`` set) or right-padded rows."""
    from dapo_megatron.policy.context_parallel import cp_group_and_rank, split_for_rank
    from dapo_megatron.policy.model import attention_mask_for

    if mb.packed is None:
        n, width = mb.input_ids.shape
        positions = torch.arange(width, device=device).expand(n, width)
        real = positions < mb.seq_lens.to(device)[:, None]
        return mb.input_ids.to(device), positions, attention_mask_for(chunk, real), None
    layout = mb.packed
    ids, positions = mb.packed_ids.to(device), layout.position_ids().to(device)
    group, cp, rank = cp_group_and_rank()
    params = packed_seq_params(layout, device, cp_group=group)
    if cp > 1:  # this rank's 2 chunks of every sequence (utils.py,
        ids = split_for_rank(ids, layout, cp, rank)  # get_thd_batch_on_this_cp_rank)
        positions = split_for_rank(positions, layout, cp, rank)
    return ids, positions, None, params


def micro_logprobs(mb, logits: torch.Tensor, *, vocab_size: int, temperature: float = 1.0,
                   with_entropy: bool = True):
    """Log-probs and entropy ``[n, L]`` of micro-batch ``mb`` (the layout of
    ``mb.input_ids``; column t scores token t from the logits at t - 1, column 0 is 0) from
    the output of its forward: logits, packed or padded, or the final hidden states when
    the output layer was deferred (chunked_logits.py)."""
    from dapo_megatron.policy.chunked_logits import chunked_logprobs, take_deferred
    from dapo_megatron.policy.context_parallel import cp_group_and_rank, gather_from_ranks, \
        split_for_rank
    from dapo_megatron.policy.logprobs import next_token_logprobs_and_entropy

    kw = dict(vocab_size=vocab_size, temperature=temperature, with_entropy=with_entropy)
    deferred = take_deferred()

    def per_position(output, targets):  # row t scores targets[:, t]; no shift
        if deferred is None:
            return next_token_logprobs_and_entropy(output, targets, **kw)
        project, chunk = deferred
        return chunked_logprobs(output, project, chunk, targets, **kw)

    def shift(v):  # [rows, seq] scores of the next token -> aligned with the tokens
        return None if v is None else torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)

    if mb.packed is None:
        ids = mb.input_ids.to(logits.device)
        lp, ent = per_position(logits, torch.roll(ids, shifts=-1, dims=1))
        return shift(lp), shift(ent)
    layout, ids = mb.packed, mb.packed_ids.to(logits.device)
    targets = torch.roll(ids, shifts=-1, dims=1)  # before any CP split: t predicts t + 1
    group, cp, rank = cp_group_and_rank()
    if cp > 1:  # the output holds this rank's chunks only; gather the per-token results
        targets = split_for_rank(targets, layout, cp, rank)
    lp, ent = per_position(logits, targets)
    if cp > 1:
        lp = gather_from_ranks(lp[0], layout, cp, group)[None]
        ent = None if ent is None else gather_from_ranks(ent[0], layout, cp, group)[None]
    rows, width = mb.input_ids.shape
    lp, ent = shift(lp), shift(ent)
    return (unpack(lp[0], layout, rows, width),
            None if ent is None else unpack(ent[0], layout, rows, width))
