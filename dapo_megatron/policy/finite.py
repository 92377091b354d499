"""A finite-values check of the policy's state (weights, fp32 main params, Adam moments).

A NaN or inf in a checkpoint is never useful: written, it poisons every resume; loaded,
it turns the run into garbage generations without an error. `check_finite` runs at save
and at load (policy/checkpoint.py). Every rank checks its own shards and the ranks agree
with one all-reduce, so all of them raise together instead of some entering a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["NonFiniteStateError", "check_finite", "first_non_finite"]


class NonFiniteStateError(RuntimeError):
    """A model or optimizer tensor holds NaN or inf."""


def _named_tensors(model_chunks, optimizer):
    for i, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            yield f"model chunk {i} parameter {name}", param
    if optimizer is None:
        return
    for s, sub in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for g, group in enumerate(inner.param_groups):
            for p, param in enumerate(group["params"]):
                yield f"optimizer {s} group {g} main param {p}", param
                for key, value in inner.state.get(param, {}).items():
                    if torch.is_tensor(value):
                        yield f"optimizer {s} group {g} param {p} state {key!r}", value


def first_non_finite(model_chunks, optimizer=None) -> str | None:
    """The name of the first tensor on this rank holding NaN/inf, or None."""
    for name, tensor in _named_tensors(model_chunks, optimizer):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            return name
    return None


def check_finite(model_chunks, optimizer=None, *, when: str) -> None:
    """Raise `NonFiniteStateError` on every rank if any rank's state holds NaN/inf."""
    bad = first_non_finite(model_chunks, optimizer)
    if dist.is_initialized():
        device = next(model_chunks[0].parameters()).device
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        any_bad = flag.item() > 0
    else:
        any_bad = bad is not None
    if any_bad:
        where = bad or "a tensor on another rank"
        raise NonFiniteStateError(f"{when}: {where} holds NaN or inf; this state is not checkpointed "
                                  "or resumed from")
