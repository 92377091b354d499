"""Token log-probabilities and entropy from vocab-parallel logits.

Megatron's output layer leaves each tensor-parallel (TP) rank holding a contiguous slice
of the (padded) vocabulary: logits ``[batch, seq, vocab_padded / tp]``. The functions here
compute, per position, ``log p(token)`` and the entropy of the full distribution without
ever gathering the full vocabulary on one rank: the softmax statistics (max, sum of exps,
the target's logit) are combined with two TP all-reduces, in fp32 (fp64 for fp64 logits),
whatever the logits' dtype. Vocabulary entries at or beyond the tokenizer's ``vocab_size``
(Megatron pads the embedding to a multiple of ``make_vocab_size_divisible_by * tp``) are
excluded.

Memory: the forward pass streams over row chunks, so besides the logits (kept for the
backward) it allocates only chunk-sized fp32 temporaries and a few ``[tokens]`` vectors;
the backward allocates the logits' gradient and chunk temporaries. ``bench/train_bench.py``
measures the peak against the logits' size.

Alignment: position ``t`` of the returned ``[batch, seq]`` tensors scores ``input_ids[:, t]``
given ``input_ids[:, :t]`` (so it comes from the logits at ``t - 1``); position 0 has no
prediction and is 0. This matches a response mask laid over ``input_ids``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dapo_megatron import dtypes

__all__ = [
    "next_token_logprobs_and_entropy",
    "token_logprobs_and_entropy",
    "broadcast_from_last_pipeline_stage",
    "DEFAULT_CHUNK_ELEMENTS",
]

# fp32 elements per streamed chunk (16 MiB): large enough for efficient kernels, small
# enough that the temporaries stay well below the logits of any real batch.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _tp_group_and_rank(tp_group):
    """The TP group to reduce over (None: no reduction) and this rank's index in it."""
    if tp_group is None:
        from megatron.core import parallel_state

        if not (dist.is_available() and dist.is_initialized()):
            return None, 0
        if not parallel_state.model_parallel_is_initialized():
            return None, 0
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return None, 0
    return tp_group, dist.get_rank(tp_group)


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """logits [tokens, vocab_local] + target [tokens] -> (logprob [tokens], entropy [tokens]).

    Gradients (z = logits / T, p = softmax(z) over the real vocabulary, H its entropy):
      d logprob / d z_j = 1[j == target] - p_j
      d H / d z_j       = -p_j * (z_j - E_p[z]),  with E_p[z] = logsumexp(z) - H
    Every TP rank receives the same upstream gradient (the loss downstream is replicated
    across TP), so each rank returns the gradient of its own vocabulary slice and no
    communication is needed in the backward.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, valid_local, inv_temp, group, chunk_rows,
                with_entropy):
        n_rows = logits.shape[0]
        local = logits[:, :valid_local]  # view: padded-vocab columns never enter the maths
        device = logits.device
        acc = dtypes.at_least_fp32(logits.dtype)  # fp32, or fp64 for fp64 logits

        # Pass 1: the row max over the real vocabulary, across TP ranks.
        row_max = torch.full((n_rows,), float("-inf"), dtype=acc, device=device)
        if valid_local > 0:
            for r0 in range(0, n_rows, chunk_rows):
                row_max[r0:r0 + chunk_rows] = local[r0:r0 + chunk_rows].max(dim=-1).values.to(acc)
        row_max.mul_(inv_temp)  # max(z / T) = max(z) / T for T > 0
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)

        # Pass 2: sum exp(z - max), sum exp(z - max) * (z - max) and the target's logit.
        stats = torch.zeros((3, n_rows), dtype=acc, device=device)
        if valid_local > 0:
            for r0 in range(0, n_rows, chunk_rows):
                r1 = min(r0 + chunk_rows, n_rows)
                shifted = local[r0:r1].to(acc, copy=True).mul_(inv_temp)
                shifted.sub_(row_max[r0:r1, None])
                exp = shifted.exp()
                stats[0, r0:r1] = exp.sum(dim=-1)
                if with_entropy:
                    stats[1, r0:r1] = exp.mul_(shifted).sum(dim=-1)
                del shifted, exp  # free before the next chunk allocates
        local_target = target - vocab_start
        on_this_rank = (local_target >= 0) & (local_target < valid_local)
        safe_target = torch.where(on_this_rank, local_target, torch.zeros_like(local_target))
        if valid_local > 0:
            picked = logits.gather(1, safe_target[:, None]).squeeze(1).to(acc) * inv_temp
            stats[2] = torch.where(on_this_rank, picked, torch.zeros_like(picked))
        if group is not None:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)

        lse = row_max + stats[0].log()
        logprob = stats[2] - lse
        # H = lse - E[z] = log(sum_e) - sum_e_shifted / sum_e (the max cancels).
        entropy = stats[0].log() - stats[1] / stats[0] if with_entropy else torch.zeros_like(lse)

        ctx.save_for_backward(logits, safe_target, on_this_rank, lse, entropy)
        ctx.valid_local = valid_local
        ctx.inv_temp = inv_temp
        ctx.chunk_rows = chunk_rows
        ctx.with_entropy = with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits, safe_target, on_this_rank, lse, entropy = ctx.saved_tensors
        valid, inv_temp, chunk_rows = ctx.valid_local, ctx.inv_temp, ctx.chunk_rows
        n_rows = logits.shape[0]
        grad = torch.zeros_like(logits)
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(lse)
        use_h = ctx.with_entropy and grad_entropy is not None
        mean_z = lse - entropy  # E_p[z]
        if valid > 0:
            for r0 in range(0, n_rows, chunk_rows):
                rows = slice(r0, min(r0 + chunk_rows, n_rows))
                z = logits[rows, :valid].to(lse.dtype, copy=True).mul_(inv_temp)
                if use_h:
                    p = (z - lse[rows, None]).exp_()
                    # In place on z: -g_lp - g_H * (z - E_p[z]), then times p.
                    z.sub_(mean_z[rows, None]).mul_(-grad_entropy[rows, None])
                    z.sub_(grad_logprob[rows, None]).mul_(p)
                    del p
                else:
                    z.sub_(lse[rows, None]).exp_().mul_(-grad_logprob[rows, None])
                grad[rows, :valid] = z.mul_(inv_temp)
                del z  # free before the next chunk allocates
            hit = on_this_rank.to(grad_logprob.dtype) * grad_logprob * inv_temp
            grad.scatter_add_(1, safe_target[:, None], hit[:, None].to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def _check_shapes(logits: torch.Tensor, ids: torch.Tensor) -> None:
    if logits.dim() != 3 or ids.dim() != 2 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"logits must be [batch, seq, vocab_local] and input_ids [batch, seq] with the same "
            f"batch and seq; got logits {tuple(logits.shape)} and input_ids {tuple(ids.shape)}"
        )


def next_token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``targets[:, t]`` under the logits at ``t`` (no shift), and the
    entropy at ``t``: the kernel of ``token_logprobs_and_entropy`` for callers that hold
    only some positions of a row with their targets (context parallelism, packed rows).

    Args and returns as ``token_logprobs_and_entropy``, except that ``targets``
    ``[batch, seq]`` are the ids each position predicts and the results are not shifted.
    """
    _check_shapes(logits, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score log-probs, got {temperature}")
    group, tp_rank = _tp_group_and_rank(tp_group)
    batch, seq, vocab_local = logits.shape
    vocab_start = tp_rank * vocab_local
    tp_size = 1 if group is None else dist.get_world_size(group)
    if vocab_size > vocab_local * tp_size:
        raise ValueError(
            f"vocab_size {vocab_size} exceeds the logits' vocabulary ({vocab_local} per rank x "
            f"{tp_size} TP ranks): pass the tokenizer's vocab size, not a larger one"
        )
    valid_local = max(0, min(vocab_local, vocab_size - vocab_start))
    target = targets.reshape(-1).to(torch.long)
    if vocab_size > 0 and target.numel() and int(target.max()) >= vocab_size:
        raise ValueError(
            f"input_ids hold id {int(target.max())} >= vocab_size {vocab_size}: the tokenizer "
            "and the model's vocab_size disagree"
        )
    chunk_rows = max(1, chunk_elements // max(1, valid_local))
    flat = logits.contiguous().view(batch * seq, vocab_local)
    logprob, entropy = _VocabParallelLogProbEntropy.apply(
        flat, target, vocab_start, valid_local, 1.0 / float(temperature), group, chunk_rows,
        with_entropy,
    )
    return logprob.view(batch, seq), entropy.view(batch, seq) if with_entropy else None


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability and entropy of every token of ``input_ids`` from vocab-parallel logits.

    Args:
        logits: ``[batch, seq, vocab_local]``, this TP rank's contiguous vocabulary slice
            (rank r holds ids ``[r * vocab_local, (r + 1) * vocab_local)``); any dtype.
        input_ids: ``[batch, seq]`` token ids the logits were computed from.
        vocab_size: the real vocabulary size; ids at or beyond it (Megatron's padding) are
            excluded from the softmax.
        tp_group: the tensor-parallel group; ``None`` takes megatron's parallel_state group
            when initialised, else no reduction.
        temperature: logits are divided by it first (score at the sampling temperature).
        with_entropy: compute the entropy (and its gradient); otherwise ``None`` is returned.
        chunk_elements: fp32 elements per streamed chunk (bounds the temporaries).

    Returns:
        ``(logprobs, entropy)``, each fp32 ``[batch, seq]``: position ``t`` scores
        ``input_ids[:, t]`` from the logits at ``t - 1``; position 0 is 0. Both are
        differentiable with respect to ``logits``.
    """
    _check_shapes(logits, input_ids)
    # Row t predicts token t + 1; the last row's target is a dummy (its result is dropped).
    target = torch.roll(input_ids, shifts=-1, dims=1)
    logprob_next, entropy_next = next_token_logprobs_and_entropy(
        logits, target, vocab_size=vocab_size, tp_group=tp_group, temperature=temperature,
        with_entropy=with_entropy, chunk_elements=chunk_elements)
    batch = logits.shape[0]
    zero_col = logprob_next.new_zeros(batch, 1)
    logprobs = torch.cat([zero_col, logprob_next[:, :-1]], dim=1)
    if not with_entropy:
        return logprobs, None
    entropy = torch.cat([zero_col, entropy_next[:, :-1]], dim=1)
    return logprobs, entropy


def broadcast_from_last_pipeline_stage(tensor: torch.Tensor | None, shape, dtype=torch.float32,
                                       device=None) -> torch.Tensor:
    """Send a tensor computed on the last pipeline stage to every stage of this PP group.

    Args:
        tensor: the value on the last stage; ignored (may be None) elsewhere.
        shape, dtype, device: what the other stages allocate to receive it.

    Returns:
        The tensor on every stage. A no-op without pipeline parallelism.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return tensor
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    if parallel_state.is_pipeline_last_stage():
        if tensor is None:
            raise RuntimeError("the last pipeline stage must provide the tensor to broadcast")
        out = tensor.detach().to(dtype).contiguous()
    else:
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
    dist.broadcast(out, src=src, group=group)
    return out
