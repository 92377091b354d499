"""Log-probs and entropy in sequence chunks, so a micro-batch's logits never exist whole.

The vocab-parallel logits of one micro-batch are ``tokens x vocab / tp``: 20k tokens of
Qwen's 152k vocabulary are 5.8 GiB in bf16 at TP=1, kept for the backward. Above
``trainer.logits_chunk_mb`` the output layer is deferred: GPTModel's forward returns the
final hidden states instead of logits (``defer_output_layer``), and
``chunked_logprobs`` runs the output layer and the vocab-parallel log-prob on one chunk of
positions at a time under activation checkpointing, so only one chunk's logits are alive,
in the forward and again (recomputed) in the backward. Peak memory is measured in
``bench/train_bench.py`` and tests/policy/test_chunked_logits.py.

Workaround isolated here: megatron-core 0.16.1's GPTModel._postprocess
(models/gpt/gpt_model.py) always applies ``self.output_layer`` to the whole sequence.
``defer_output_layer`` gives that one ColumnParallelLinear instance a forward that, for a
micro-batch over the bound, returns its input and parks the projection (its own forward
with the same weight) for the loss function, which runs right after the forward on the
last pipeline stage (pipeline_parallel/schedules.py, forward_step: forward_step_calc_loss).
Under sequence parallelism the hidden states are gathered over TP first and the projection
runs with ``sequence_parallel`` off, as megatron does for its own last-token logits
(gpt_model.py, _postprocess, ``sequence_parallel_override``).
"""

from __future__ import annotations

import threading
import types

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_logprobs", "defer_output_layer", "take_deferred"]

_pending = threading.local()


def take_deferred():
    """The projection parked by the last deferred forward on this thread (then cleared), or
    None when that forward produced real logits."""
    projection = getattr(_pending, "projection", None)
    _pending.projection = None
    return projection


def defer_output_layer(model, max_logits_bytes: int) -> None:
    """Let ``model``'s (a GPTModel's) output layer defer micro-batches whose logits on this
    rank would exceed ``max_logits_bytes`` (0: never). Idempotent; updates the bound."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return
    layer.dapo_max_logits_bytes = int(max_logits_bytes)
    if getattr(layer, "dapo_deferring", False):
        return
    full_forward = layer.forward  # the bound ColumnParallelLinear.forward

    def forward(self, input_, weight=None, runtime_gather_output=None):
        _pending.projection = None
        vocab_local = (weight if weight is not None else self.weight).shape[0]
        tokens = input_.shape[0] * input_.shape[1]
        if self.sequence_parallel:
            from megatron.core.parallel_state import get_tensor_model_parallel_world_size

            tokens *= get_tensor_model_parallel_world_size()
        bound = self.dapo_max_logits_bytes
        if not bound or tokens * vocab_local * input_.element_size() <= bound:
            return full_forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        hidden = input_
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden)

        def project(h):
            saved, self.sequence_parallel = self.sequence_parallel, False
            try:
                logits, _ = full_forward(h, weight=weight,
                                         runtime_gather_output=runtime_gather_output)
            finally:
                self.sequence_parallel = saved
            return logits

        chunk = max(1, bound // (input_.shape[1] * vocab_local * input_.element_size()))
        _pending.projection = (project, chunk)
        return hidden, None

    layer.forward = types.MethodType(forward, layer)
    layer.dapo_deferring = True


def chunked_logprobs(hidden: torch.Tensor, project, chunk_positions: int,
                     targets: torch.Tensor, *, vocab_size: int, temperature: float = 1.0,
                     with_entropy: bool = True):
    """``next_token_logprobs_and_entropy`` of ``project(hidden)`` without all its logits.

    Args:
        hidden: ``[batch, seq, h]`` final hidden states (GPTModel's output when deferred).
        project: ``[chunk, batch, h]`` -> vocab-parallel logits ``[chunk, batch, vocab / tp]``.
        chunk_positions: positions per chunk.
        targets: ``[batch, seq]`` the ids each position predicts.

    Returns:
        ``(logprobs, entropy or None)``, each ``[batch, seq]``, unshifted like
        ``next_token_logprobs_and_entropy``; differentiable w.r.t. ``hidden`` and the
        output layer's weight.
    """
    from dapo_megatron.policy.logprobs import next_token_logprobs_and_entropy

    def one(h, tgt):
        logits = project(h.transpose(0, 1)).transpose(0, 1)
        lp, ent = next_token_logprobs_and_entropy(logits, tgt, vocab_size=vocab_size,
                                                  temperature=temperature,
                                                  with_entropy=with_entropy)
        return (lp, ent) if with_entropy else (lp,)

    parts = []
    for a in range(0, hidden.shape[1], chunk_positions):
        b = a + chunk_positions
        args = (hidden[:, a:b], targets[:, a:b])
        parts.append(checkpoint(one, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else one(*args))
    lp = torch.cat([p[0] for p in parts], dim=1)
    ent = torch.cat([p[1] for p in parts], dim=1) if with_entropy else None
    return lp, ent
