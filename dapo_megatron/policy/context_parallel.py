"""Context parallelism (CP) of packed rows: which tokens each CP rank holds, and the gather
of per-token results back into sequence order.

Megatron's load-balanced split (megatron-core 0.16.1, utils.py, get_batch_on_this_cp_rank
for one sequence, get_thd_batch_on_this_cp_rank with TE's ``thd_get_partitioned_indices``
for packed rows): every sequence's padded extent (a multiple of 2 * CP, see
``packing.pack``'s ``seq_align``) is cut into 2 * CP equal chunks and CP rank ``r`` holds
chunks ``r`` and ``2 * CP - 1 - r``, so every rank gets the same causal-attention work.
A rank's tokens are its chunks of sequence 0, then of sequence 1, ... (the order TE's
CP attention reads them in).

Log-probs and entropy of a token need only its own logits row and its target (the next
token of the unsplit row, taken before the split: ``packing.micro_logprobs``), so each
rank computes them for its tokens and ``gather_from_ranks`` reassembles the row. The loss
is then the same on every CP rank; the gather's backward hands each rank the gradient of
its own tokens only, so summing the ranks' gradients (megatron's DDP reduces over the
data-and-context-parallel group) counts every token once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["cp_group_and_rank", "gather_from_ranks", "rank_token_index", "split_for_rank"]


def cp_group_and_rank():
    """(CP group or None, CP size, CP rank) from megatron's parallel_state (1 when unset)."""
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None, 1, 0
    size = ps.get_context_parallel_world_size()
    if size == 1:
        return None, 1, 0
    return ps.get_context_parallel_group(), size, ps.get_context_parallel_rank()


def rank_token_index(layout, cp: int, rank: int) -> torch.Tensor:
    """``[width / cp]`` int64: the packed-row columns CP rank ``rank`` holds, in its order."""
    parts = []
    for a, b in zip(layout.starts, layout.ends):
        if (b - a) % (2 * cp):
            raise ValueError(f"context parallelism: a sequence's padded extent {b - a} is not "
                             f"a multiple of 2 * cp = {2 * cp}; pack with seq_align=2*cp")
        chunk = (b - a) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(a + c * chunk, a + (c + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def split_for_rank(values: torch.Tensor, layout, cp: int, rank: int, dim: int = -1):
    """This rank's share of a packed-row tensor (columns along ``dim``)."""
    return values.index_select(dim, rank_token_index(layout, cp, rank).to(values.device))


class _GatherTokens(torch.autograd.Function):
    """[width / cp] local values -> [width] in row order, on every CP rank."""

    @staticmethod
    def forward(ctx, local, layout, cp, group):
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        full = local.new_empty(layout.width)
        for r, part in enumerate(parts):
            full[rank_token_index(layout, cp, r).to(local.device)] = part
        ctx.index = rank_token_index(layout, cp, dist.get_rank(group)).to(local.device)
        return full

    @staticmethod
    def backward(ctx, grad_full):
        # Every CP rank computes the same loss from the gathered row: the gradient of this
        # rank's tokens is its slice (no sum; the DDP reduction adds the ranks' parts).
        return grad_full.index_select(0, ctx.index), None, None, None


def gather_from_ranks(local: torch.Tensor, layout, cp: int, group) -> torch.Tensor:
    """Per-token values of this rank's tokens ``[width / cp]`` -> the whole packed row
    ``[width]`` on every CP rank (differentiable; see the module docstring)."""
    if cp == 1:
        return local
    return _GatherTokens.apply(local, layout, cp, group)
