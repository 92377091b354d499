"""The policy's batch format and its split into data-parallel shards and micro-batches.

A rollout batch arrives as one ``PolicyBatch`` (the same object on every training rank).
``plan_microbatches`` then decides, from the sequence lengths alone, which sequences each
data-parallel (DP) rank processes and how they group into micro-batches:

- DP shards are balanced by token count (longest-first greedy), not by sequence count;
- micro-batches are formed under a token budget: a packed micro-batch costs the width of
  its packed row, a padded one of ``n`` sequences whose longest has ``L`` tokens costs
  ``n * L`` padded tokens; either must fit
  ``max_tokens_per_microbatch`` (a longer sequence gets a micro-batch of its own). Sorting
  by length first keeps similar lengths together, so little padding is wasted;
- every DP rank runs the same number of micro-batches (the pipeline schedule and the MoE
  token exchange need every rank in step): ranks with fewer are split further, and a rank
  with no sequence left runs an empty (fully masked) micro-batch.

Packed (the default, ``trainer.sequence_packing``): a micro-batch is one row holding its
sequences end to end (packing.py), costing the sum of their lengths; bins are filled
first-fit, longest first, so short sequences fill the room long ones leave and only
alignment padding is wasted. Padded (``sequence_packing: false``): sequences are right-padded to the
micro-batch's longest, costing ``n * L``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = [
    "MicroBatch", "MicroBatchPlan", "PolicyBatch", "collate", "plan_microbatches",
    "split_mini_batches",
]


@dataclass
class PolicyBatch:
    """One rollout batch for the policy; ``batch`` sequences right-padded to ``seq``.

    Attributes:
        input_ids: ``[batch, seq]`` int64, prompt + response tokens, right-padded.
        seq_lens: ``[batch]`` int64, real tokens per row (prompt + response).
        response_mask: ``[batch, seq]`` bool or 0/1, aligned with ``input_ids``: 1 where the
            token is a response token in the loss. Position 0 and padding must be 0.
        advantages: ``[batch]`` (one per sequence) or ``[batch, seq]`` float.
        old_logprobs: ``[batch, seq]`` float or None, log pi_old of ``input_ids[:, t]``
            aligned like ``response_mask``; None: the policy recomputes them.
        engine_logprobs: ``[batch, seq]`` float or None, the rollout engine's log-probs of the
            same tokens; when given, their gap to the policy's is reported.
        ref_logprobs: ``[batch, seq]`` float or None, a reference policy's log-probs (KL term).
        routed_experts: ``[batch, seq, layers, top_k]`` integer or None, the experts each
            position is routed to (MoE routing replay, routing_replay.py); -1: route freely.
    """

    input_ids: torch.Tensor
    seq_lens: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"PolicyBatch.input_ids must be [batch, seq], got "
                             f"{tuple(self.input_ids.shape)}")
        batch, seq = self.input_ids.shape
        if tuple(self.seq_lens.shape) != (batch,):
            raise ValueError(f"PolicyBatch.seq_lens must be [batch] = [{batch}], got "
                             f"{tuple(self.seq_lens.shape)}")
        for name in ("response_mask", "old_logprobs", "engine_logprobs", "ref_logprobs"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch, seq):
                raise ValueError(f"PolicyBatch.{name} must be [batch, seq] = [{batch}, {seq}] "
                                 f"like input_ids, got {tuple(value.shape)}")
        routes = self.routed_experts
        if routes is not None and (routes.dim() != 4 or tuple(routes.shape[:2]) != (batch, seq)):
            raise ValueError(f"PolicyBatch.routed_experts must be [batch, seq, layers, top_k] with "
                             f"batch, seq = {batch}, {seq}, got {tuple(routes.shape)}")
        if tuple(self.advantages.shape) not in ((batch,), (batch, seq)):
            raise ValueError(f"PolicyBatch.advantages must be [batch] or [batch, seq], got "
                             f"{tuple(self.advantages.shape)}")
        if batch and (int(self.seq_lens.min()) < 1 or int(self.seq_lens.max()) > seq):
            raise ValueError(f"PolicyBatch.seq_lens must lie in [1, seq={seq}], got "
                             f"[{int(self.seq_lens.min())}, {int(self.seq_lens.max())}]")
        positions = torch.arange(seq)[None, :]
        outside = (positions >= self.seq_lens[:, None]) | (positions == 0)
        if bool((self.response_mask.bool() & outside).any()):
            raise ValueError("PolicyBatch.response_mask marks position 0 or padding beyond "
                             "seq_lens; only real tokens after the first can be scored")

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], response_masks, advantages,
                       old_logprobs=None, engine_logprobs=None, ref_logprobs=None,
                       pad_id: int = 0, routed_experts=None) -> PolicyBatch:
        """Build from per-sequence lists: ``sequences[i]`` are token ids (prompt + response),
        ``response_masks[i]`` / ``*_logprobs[i]`` have the same length; ``advantages`` is
        ``[batch]`` or per-sequence lists; ``routed_experts[i]``: ``[positions, layers,
        top_k]`` of the first positions of sequence i (an engine's, rollout/protocol.py), or
        None."""
        lens = [len(s) for s in sequences]
        seq = max(lens) if lens else 1

        def pad(rows, dtype, fill):
            out = torch.full((len(lens), seq), fill, dtype=dtype)
            for i, row in enumerate(rows):
                if len(row) != lens[i]:
                    raise ValueError(f"PolicyBatch.from_sequences: row {i} has {len(row)} "
                                     f"values for a sequence of {lens[i]} tokens")
                out[i, :lens[i]] = torch.as_tensor(row, dtype=dtype)
            return out

        first = advantages[0] if len(advantages) else 0.0
        per_token = isinstance(first, (list, tuple)) or (torch.is_tensor(first) and first.dim())
        adv = (pad(advantages, torch.float32, 0.0) if per_token
               else torch.as_tensor(advantages, dtype=torch.float32).reshape(len(lens)))
        optional = {name: None if rows is None else pad(rows, torch.float32, 0.0)
                    for name, rows in (("old_logprobs", old_logprobs),
                                       ("engine_logprobs", engine_logprobs),
                                       ("ref_logprobs", ref_logprobs))}
        routes = None
        if routed_experts is not None and any(r is not None for r in routed_experts):
            from dapo_megatron.policy.routing_replay import routes_tensor

            routes = routes_tensor(list(routed_experts), seq)
        return cls(input_ids=pad(sequences, torch.long, pad_id),
                   seq_lens=torch.tensor(lens, dtype=torch.long),
                   response_mask=pad(response_masks, torch.bool, False),
                   advantages=adv, routed_experts=routes, **optional)

    def select(self, rows: Sequence[int] | slice) -> PolicyBatch:
        """The sub-batch of the given rows (same padding)."""
        index = torch.arange(self.size)[rows] if isinstance(rows, slice) else torch.as_tensor(
            list(rows), dtype=torch.long)
        values = {f.name: (None if getattr(self, f.name) is None
                           else getattr(self, f.name).index_select(0, index))
                  for f in fields(self)}
        return PolicyBatch(**values)


@dataclass
class MicroBatch:
    """One padded micro-batch: ``n`` sequences padded to the longest, ``L`` tokens.

    ``input_ids`` ``[n, L]``; ``seq_lens`` ``[n]``; ``response_mask`` ``[n, L]`` bool;
    ``advantages`` ``[n]`` or ``[n, L]``; ``old_logprobs`` / ``ref_logprobs`` ``[n, L]`` or
    None; ``rows``: the indices into the batch it came from (empty for a filler);
    ``routed_experts`` ``[n, L, layers, top_k]`` or None (-1 in padding and filler rows).
    """

    input_ids: torch.Tensor
    seq_lens: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    rows: list[int]
    real_tokens: int
    padded_tokens: int
    routed_experts: torch.Tensor | None = None
    # Packed: the row [1, width] the model runs on and where each sequence lies in it
    # (packing.PackedLayout); None: the model runs on the padded ``input_ids``.
    packed_ids: torch.Tensor | None = None
    packed: object | None = None

    @property
    def forward_shape(self) -> tuple[int, int]:
        """(rows, tokens per row) of what the model runs on."""
        ids = self.input_ids if self.packed_ids is None else self.packed_ids
        return int(ids.shape[0]), int(ids.shape[1])


@dataclass(frozen=True)
class MicroBatchPlan:
    """Which rows each DP rank processes, grouped into micro-batches.

    ``per_rank[d][m]`` lists the batch rows of micro-batch ``m`` on DP rank ``d``; every
    rank has ``num_microbatches`` of them (possibly empty lists: filler micro-batches).
    """

    per_rank: list[list[list[int]]]
    real_tokens: list[int]  # per DP rank
    padded_tokens: list[int]  # per DP rank, sum over micro-batches of n * longest

    @property
    def num_microbatches(self) -> int:
        return len(self.per_rank[0]) if self.per_rank else 0

    @property
    def padding_waste(self) -> float:
        """Fraction of the padded tokens (all ranks) that are padding."""
        padded = sum(self.padded_tokens)
        return 1.0 - sum(self.real_tokens) / padded if padded else 0.0


def _balance_ranks(lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """Longest-first greedy: each sequence goes to the DP rank with the fewest tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    loads = [0] * dp_size
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        d = min(range(dp_size), key=lambda r: (loads[r], len(shards[r]), r))
        shards[d].append(i)
        loads[d] += lengths[i]
    return shards


def _pack_by_budget(rows: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Next-fit over rows sorted longest first: ``n * longest <= max_tokens`` per micro-batch."""
    order = sorted(rows, key=lambda i: (-lengths[i], i))
    micro: list[list[int]] = []
    for i in order:
        if micro and (len(micro[-1]) + 1) * lengths[micro[-1][0]] <= max_tokens:
            micro[-1].append(i)
        else:
            micro.append([i])
    return micro


def _pack_first_fit(rows: list[int], lengths: Sequence[int], max_tokens: int,
                    seq_align: int) -> list[list[int]]:
    """First-fit over rows sorted longest first: the packed width fits ``max_tokens``; short
    sequences fill the room long ones leave (the CPU attention groups a bin's sequences
    by length, packed_attention.py, so mixing lengths costs no attention padding)."""
    from dapo_megatron.policy.packing import packed_width

    order = sorted(rows, key=lambda i: (-lengths[i], i))
    micro: list[list[int]] = []
    used: list[int] = []
    for i in order:
        need = packed_width([lengths[i]], seq_align)
        for k in range(len(micro)):
            if used[k] + need <= max_tokens:
                micro[k].append(i)
                used[k] += need
                break
        else:
            micro.append([i])
            used.append(need)
    return micro


def _split_to(micro: list[list[int]], target: int) -> list[list[int]]:
    """Split the largest micro-batches in two until there are ``target``; pad with empties."""
    micro = [list(m) for m in micro]
    while len(micro) < target:
        largest = max(range(len(micro)), key=lambda k: len(micro[k])) if micro else None
        if largest is None or len(micro[largest]) < 2:
            micro.append([])
            continue
        m = micro.pop(largest)
        half = (len(m) + 1) // 2
        micro[largest:largest] = [m[:half], m[half:]]
    return micro


def plan_microbatches(seq_lens: Sequence[int] | torch.Tensor, dp_size: int,
                      max_tokens_per_microbatch: int | None = None, *,
                      micro_batch_size: int | None = None,
                      min_microbatches: int = 1, packed: bool = False,
                      seq_align: int = 1, row_align: int = 1) -> MicroBatchPlan:
    """Assign rows to DP ranks and micro-batches (deterministic: same plan on every rank).

    Args:
        seq_lens: ``[batch]`` tokens per row.
        dp_size: number of data-parallel ranks.
        max_tokens_per_microbatch: token budget per micro-batch (padded tokens, ``n * L``).
        micro_batch_size: instead of a budget, a fixed number of rows per micro-batch in
            batch order (naive padded batching; the benchmark's baseline).
        min_microbatches: at least this many micro-batches per rank.
        packed: one packed row per micro-batch (its cost: the packed width, with each
            sequence rounded up to ``seq_align`` and the row to ``row_align``); else
            right-padded rows (cost ``n * longest``).

    Returns:
        A ``MicroBatchPlan`` with the same micro-batch count on every DP rank.
    """
    lengths = [int(x) for x in (seq_lens.tolist() if torch.is_tensor(seq_lens) else seq_lens)]
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if (max_tokens_per_microbatch is None) == (micro_batch_size is None):
        raise ValueError("give exactly one of max_tokens_per_microbatch (token budget) and "
                         "micro_batch_size (fixed rows per micro-batch)")
    if max_tokens_per_microbatch is not None and max_tokens_per_microbatch < 1:
        raise ValueError(f"max_tokens_per_microbatch must be >= 1, got {max_tokens_per_microbatch}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if max_tokens_per_microbatch is not None:
        shards = _balance_ranks(lengths, dp_size)
        per_rank = [_pack_first_fit(s, lengths, max_tokens_per_microbatch, seq_align) if packed
                    else _pack_by_budget(s, lengths, max_tokens_per_microbatch) for s in shards]
    else:
        # Naive baseline: contiguous equal shards, fixed-size micro-batches in batch order.
        bounds = [round(d * len(lengths) / dp_size) for d in range(dp_size + 1)]
        shards = [list(range(bounds[d], bounds[d + 1])) for d in range(dp_size)]
        per_rank = [[s[k:k + micro_batch_size] for k in range(0, len(s), micro_batch_size)]
                    for s in shards]
    target = max([min_microbatches] + [len(m) for m in per_rank])
    per_rank = [_split_to(m, target) for m in per_rank]
    real = [sum(lengths[i] for m in micro for i in m) for micro in per_rank]
    if packed:
        from dapo_megatron.policy.packing import packed_width

        padded = [sum(packed_width([lengths[i] for i in m], seq_align, row_align)
                      for m in micro if m) for micro in per_rank]
    else:
        padded = [sum(len(m) * max((lengths[i] for i in m), default=0) for m in micro)
                  for micro in per_rank]
    return MicroBatchPlan(per_rank=per_rank, real_tokens=real, padded_tokens=padded)


def collate(batch: PolicyBatch, rows: Sequence[int], pad_to_multiple: int = 1, *,
            min_rows: int = 0, min_width: int = 0, packed: bool = False,
            seq_align: int = 1) -> MicroBatch:
    """Gather ``rows`` of ``batch`` into one micro-batch padded to its longest sequence
    (rounded up to ``pad_to_multiple``, e.g. the TP size under sequence parallelism).

    ``min_rows`` / ``min_width`` pad further with fully masked filler rows / columns, for
    paths that need the same shape on every rank (megatron's allgather MoE dispatcher). An
    empty ``rows`` gives a filler micro-batch: masked pad tokens only, so the rank still
    runs the forward/backward its peers expect and contributes nothing.

    ``packed``: the model runs on one packed row (``packing.pack``: sequences at multiples
    of ``seq_align``, the row a multiple of ``pad_to_multiple`` and at least ``min_width``
    wide); the padded tensors stay for the loss, which reads the packed results unpacked.
    """
    if packed:
        mb = collate(batch, rows)
        from dapo_megatron.policy.packing import pack

        mb.packed_ids, mb.packed = pack(mb.input_ids, mb.seq_lens, seq_align=seq_align,
                                        row_align=pad_to_multiple, min_width=min_width)
        mb.padded_tokens = mb.packed.width if mb.rows else 0
        return mb
    rows = list(rows)
    index = torch.as_tensor(rows, dtype=torch.long)
    lens = batch.seq_lens.index_select(0, index)
    longest = int(lens.max()) if rows else 1
    width = max(longest, min_width, 1)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    n = max(len(rows), min_rows, 1)

    def take(t, fill=0):
        if t is None:
            return None
        t = t.index_select(0, index)
        if t.dim() >= 2:
            t = t[:, :width]
            if t.shape[1] < width:  # rounding up may exceed the batch's own padding
                extra = t.new_full((t.shape[0], width - t.shape[1]) + tuple(t.shape[2:]), fill)
                t = torch.cat([t, extra], dim=1)
        if t.shape[0] < n:  # filler rows
            t = torch.cat([t, t.new_full((n - t.shape[0],) + tuple(t.shape[1:]), fill)])
        return t.contiguous()

    seq_lens = torch.cat([lens, torch.ones(n - len(rows), dtype=lens.dtype)])
    return MicroBatch(input_ids=take(batch.input_ids), seq_lens=seq_lens,
                      response_mask=take(batch.response_mask).bool(),
                      advantages=take(batch.advantages), old_logprobs=take(batch.old_logprobs),
                      ref_logprobs=take(batch.ref_logprobs), rows=rows,
                      real_tokens=int(lens.sum()), padded_tokens=len(rows) * longest,
                      routed_experts=take(batch.routed_experts, fill=-1))


def split_mini_batches(batch_size: int, num_mini_batches: int) -> list[slice]:
    """Contiguous row ranges of ``num_mini_batches`` near-equal mini-batches.

    Rows keep the controller's order, so a batch laid out group by group splits on group
    boundaries when ``batch_size`` is a multiple of ``num_mini_batches * group_size``.
    """
    if not 1 <= num_mini_batches <= max(1, batch_size):
        raise ValueError(f"num_mini_batches must be in [1, batch size {batch_size}], got "
                         f"{num_mini_batches}")
    bounds = [math.floor(k * batch_size / num_mini_batches) for k in range(num_mini_batches + 1)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(num_mini_batches)]

