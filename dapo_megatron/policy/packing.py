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
- CPU (megatron's local attention, which refuses ``packed_seq_params``:
  transformer/dot_product_attention.py, DotProductAttention.forward asserts it is None):
  a block-diagonal causal mask (``causal_attention_mask`` with segment ids) and positions
  that restart at 0 for every sequence. GPTModel's RoPE ignores ``position_ids``
  (models/gpt/gpt_model.py, GPTModel._preprocess: ``self.rotary_pos_emb(rotary_seq_len)``
  gives positions 0..S-1 of the row); ``use_position_ids_for_rope`` works around that, so
  a packed token gets the very angle it gets in its own row.

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
    "packed_width", "unpack", "use_position_ids_for_rope",
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

    def segment_ids(self) -> torch.Tensor:
        """``[1, width]``: the sequence index of each column (padding: its sequence's)."""
        seg = torch.empty(self.width, dtype=torch.long)
        for k, (a, b) in enumerate(zip(self.starts, self.ends)):
            seg[a:b] = k
        return seg[None]

    def real_mask(self) -> torch.Tensor:
        """``[1, width]`` bool: True on real tokens."""
        real = torch.zeros(self.width, dtype=torch.bool)
        for a, n in zip(self.starts, self.seq_lens):
            real[a:a + n] = True
        return real[None]

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
    from dapo_megatron.policy.model import attention_mask_for, causal_attention_mask

    if mb.packed is None:
        n, width = mb.input_ids.shape
        positions = torch.arange(width, device=device).expand(n, width)
        real = positions < mb.seq_lens.to(device)[:, None]
        return mb.input_ids.to(device), positions, attention_mask_for(chunk, real), None
    layout = mb.packed
    ids, positions = mb.packed_ids.to(device), layout.position_ids().to(device)
    real = layout.real_mask().to(device)
    if attention_mask_for(chunk, real) is None:  # TE's attention: THD, no dense mask
        from dapo_megatron.policy.context_parallel import cp_group_and_rank, split_for_rank

        group, cp, rank = cp_group_and_rank()
        psp = packed_seq_params(layout, device, cp_group=group if cp > 1 else None)
        if cp > 1:  # this rank's 2 chunks of every sequence (utils.py,
            ids = split_for_rank(ids, layout, cp, rank)  # get_thd_batch_on_this_cp_rank)
            positions = split_for_rank(positions, layout, cp, rank)
        return ids, positions, None, psp
    mask = causal_attention_mask(real, layout.width, segment_ids=layout.segment_ids().to(device))
    return ids, positions, mask, None


def micro_logprobs(mb, logits: torch.Tensor, *, vocab_size: int, temperature: float = 1.0,
                   with_entropy: bool = True):
    """Log-probs and entropy ``[n, L]`` of micro-batch ``mb`` (the layout of
    ``mb.input_ids``) from the logits of its forward, packed or padded."""
    from dapo_megatron.policy.logprobs import next_token_logprobs_and_entropy, \
        token_logprobs_and_entropy

    kw = dict(vocab_size=vocab_size, temperature=temperature, with_entropy=with_entropy)
    if mb.packed is None:
        return token_logprobs_and_entropy(logits, mb.input_ids.to(logits.device), **kw)
    layout, ids = mb.packed, mb.packed_ids.to(logits.device)
    targets = torch.roll(ids, shifts=-1, dims=1)  # row t predicts token t + 1
    from dapo_megatron.policy.context_parallel import cp_group_and_rank, gather_from_ranks, \
        split_for_rank

    group, cp, rank = cp_group_and_rank()
    if cp > 1:  # logits hold this rank's chunks only; gather the per-token results
        targets = split_for_rank(targets, layout, cp, rank)
    lp, ent = next_token_logprobs_and_entropy(logits, targets, **kw)
    if cp > 1:
        lp = gather_from_ranks(lp[0], layout, cp, group)[None]
        ent = None if ent is None else gather_from_ranks(ent[0], layout, cp, group)[None]
    rows, width = mb.input_ids.shape
    # Column t of the padded layout scores token t from the logits at t - 1.
    shift = lambda v: torch.cat([v.new_zeros(1), v[0, :-1]])  # noqa: E731
    out_lp = unpack(shift(lp), layout, rows, width)
    out_ent = None if ent is None else unpack(shift(ent), layout, rows, width)
    return out_lp, out_ent


# ----- RoPE at position_ids on the local (CPU) spec ----------------------------------------

def _stash_position_ids(model, args, kwargs):
    position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    model.rotary_pos_emb.dapo_position_ids = position_ids


def _rope_at_position_ids(rope, args, kwargs, output):
    positions = getattr(rope, "dapo_position_ids", None)
    if positions is None or kwargs.get("packed_seq") or not torch.is_tensor(output):
        return output
    if positions.shape[0] > 1 and not bool((positions == positions[:1]).all()):
        raise ValueError("RoPE at position_ids: rows with different positions need one "
                         "packed row per micro-batch (batch 1)")
    if int(positions.max()) >= output.shape[0]:
        return output  # under sequence parallelism the row is split: positions are global
    return output.index_select(0, positions[0].to(output.device))


def use_position_ids_for_rope(model) -> None:
    """Make ``model``'s RoPE take the angles of ``position_ids`` (rows of one micro-batch
    share them) instead of 0..S-1 of the row. Workaround for megatron-core 0.16.1,
    models/gpt/gpt_model.py, GPTModel._preprocess, which calls
    ``self.rotary_pos_emb(rotary_seq_len, packed_seq=...)`` without the position ids; the
    [S, 1, 1, dim] frequencies are then gathered at the positions (RotaryEmbedding.forward,
    models/common/embeddings/rotary_pos_embedding.py, returns one row per position). With
    positions 0..S-1 the gather is the identity; with THD packed_seq_params (TE) megatron
    restarts positions itself and the hook stands aside."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or getattr(rope, "dapo_uses_position_ids", False):
        return
    model.register_forward_pre_hook(_stash_position_ids, with_kwargs=True)
    rope.register_forward_hook(_rope_at_position_ids, with_kwargs=True)
    rope.dapo_uses_position_ids = True
