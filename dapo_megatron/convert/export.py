"""Export sharded Megatron weights as HF-named full tensors, bucket by bucket: the inverse
of ``load.py``.

Both generators are collectives: every rank of the job iterates them in lock-step. For
each canonical parameter, the TP shards of the first data-parallel replica that owns it
(its PP stage; for routed experts, its EP rank) are all-gathered in its TP group; the
owner's TP rank 0 (the tensor's *source*) then holds the full tensor. The convert rules
turn it into HF tensors (Q/K/V split, gate/up split, vocab padding removed).

- ``export_owned_buckets`` (the rollout weight sync): each source rank yields buckets of
  the tensors it sourced and sends them to the engines itself; nothing crosses ranks but
  the TP all-gathers, so no rank ever holds more than its shards plus one bucket.
- ``export_hf_weights`` (HF checkpoints, tests): the sources send to one receiving rank
  (or broadcast to all), which holds at most one bucket (plus one full tensor).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from dapo_megatron.convert.load import _unwrap as unwrap
from dapo_megatron.dtypes import to_torch
from dapo_megatron.convert.load import canonical_name, partition_dim, tp_rank_and_size
from dapo_megatron.convert.rules import canonical_names, megatron_to_hf


def _local_params(chunks) -> tuple[object, dict]:
    """canonical name -> (model, param, TP partition dim or None) of this rank."""
    local = {}
    model0 = None
    for chunk in chunks:
        model = unwrap(chunk)
        model0 = model0 or model
        for name, param in model.named_parameters():
            canon = canonical_name(model, name)
            if canon is not None:
                local[canon] = (model, param, partition_dim(model, name, param))
    return model0, local


def _is_expert(canon: str) -> bool:
    return ".mlp.experts." in canon


def _first_replica(canon: str) -> bool:
    from megatron.core import parallel_state as ps

    if _is_expert(canon):
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank(with_context_parallel=True) == 0


def _tp_group(canon: str):
    from megatron.core import parallel_state as ps

    if _is_expert(canon):
        return ps.get_expert_tensor_parallel_group()
    return ps.get_tensor_model_parallel_group()


def _gather_full(model, canon: str, param: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Full tensor of ``param`` from the TP shards of this rank's TP group (collective in it)."""
    data = param.detach()
    if data.device.type == "cpu" and torch.cuda.is_available():
        data = data.to(_device())  # training state offloaded to host: stage one tensor at a time
    if dim is None:
        return data
    rank, size = tp_rank_and_size(canon)
    if size == 1:
        return data
    parts = [torch.empty_like(data) for _ in range(size)]
    dist.all_gather(parts, data.contiguous(), group=_tp_group(canon))
    if canon.endswith("linear_fc1.weight") and model.config.gated_linear_unit:
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)])
    return torch.cat(parts, dim=dim)


def _plan(model, local, dtype):
    """Global list of (canonical name, source rank, full shape, dtype), same on every rank."""
    mine = []
    for canon, (_, param, dim) in local.items():
        if not _first_replica(canon):
            continue
        rank, size = tp_rank_and_size(canon)
        if rank != 0:
            continue
        shape = list(param.shape)
        if dim is not None and size > 1:
            shape[dim] *= size
        mine.append((canon, dist.get_rank(), tuple(shape), str(dtype or param.dtype)))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    by_name = {}
    for entries in gathered:
        for canon, src, shape, dt in entries:
            by_name.setdefault(canon, (src, shape, dt))
    args = model.model_args if model is not None else None
    if args is None:  # a rank with no chunks cannot happen with GPTModel; keep a clear error
        raise RuntimeError("export_hf_weights: this rank holds no model chunk")
    # A tied output layer (last PP stage's copy of the embedding) is not an HF tensor.
    order = [n for n in canonical_names(args) if n in by_name
             and not (n == "output_layer.weight" and args.tie_word_embeddings)]
    missing = [n for n in canonical_names(args) if n not in by_name
               and not (n == "output_layer.weight" and args.tie_word_embeddings)]
    if missing:
        raise RuntimeError(f"export_hf_weights: no rank holds {missing[0]} (and {len(missing) - 1} more)")
    return args, [(n, *by_name[n]) for n in order]


@torch.no_grad()
def export_hf_weights(
    model_chunks,
    *,
    bucket_bytes: int,
    dst: int | None = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of HF (name, full tensor) pairs; collective over all ranks.

    ``dst``: the global rank that receives the tensors (None: every rank receives them).
    Ranks that receive nothing yield empty lists, in lock-step with the receivers, so every
    rank must consume the generator to the end. A bucket closes once it holds at least
    ``bucket_bytes`` (a tensor larger than that is a bucket of its own). ``dtype`` casts
    the exported tensors (default: the parameters' dtype).
    """
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    model, local = _local_params(model_chunks)
    args, plan = _plan(model, local, dtype)
    me = dist.get_rank()
    receiving = dst is None or me == dst
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for canon, src, shape, dt in plan:
        full = None
        if canon in local and _first_replica(canon):
            m, param, dim = local[canon]
            full = _gather_full(m, canon, param, dim)  # TP-group collective among the owners
            if dtype is not None:
                full = full.to(dtype)
        if dst is None:
            if me != src:
                full = torch.empty(shape, dtype=to_torch(dt), device=_device())
            dist.broadcast(full.contiguous() if me == src else full, src=src)
        elif src != dst:
            if me == src:
                dist.send(full.contiguous(), dst=dst)
            elif me == dst:
                full = torch.empty(shape, dtype=to_torch(dt), device=_device())
                dist.recv(full, src=src)
        if receiving:
            bucket.extend(megatron_to_hf(args, canon, full))
        # Counted from the plan, not the tensors, so every rank closes buckets in step.
        size += _numel(shape) * to_torch(dt).itemsize
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket or size:
        yield bucket


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def export_owned_buckets(
    model_chunks, *, bucket_bytes: int, dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of the HF (name, full tensor) pairs this rank sources; collective.

    Every rank must consume the generator to the end (the TP all-gathers run in the
    global plan's order); ranks that source nothing yield nothing. A bucket closes once it
    holds at least ``bucket_bytes`` of this rank's tensors, so a source holds one bucket.
    """
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    model, local = _local_params(model_chunks)
    args, plan = _plan(model, local, dtype)
    me = dist.get_rank()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for canon, src, _shape, _dt in plan:
        if canon not in local or not _first_replica(canon):
            continue
        m, param, dim = local[canon]
        full = _gather_full(m, canon, param, dim)  # TP-group collective among the owners
        if me != src:
            continue
        if dtype is not None:
            full = full.to(dtype)
        for name, tensor in megatron_to_hf(args, canon, full):
            bucket.append((name, _compact(tensor)))
            size += tensor.numel() * tensor.element_size()
        del full
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with a storage of its own size. Q/K/V and gate/up splits are views of the
    fused weight, and a parameter under DDP is a view of the whole contiguous param buffer:
    sent as they are, each would carry (pickle, or pin through an IPC handle) that storage."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


def sources_anything(model_chunks) -> bool:
    """True if this rank is the source of at least one exported tensor (no collective)."""
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    _, local = _local_params(model_chunks)
    return any(_first_replica(c) and tp_rank_and_size(c)[0] == 0 for c in local)


__all__ = ["export_hf_weights", "export_owned_buckets", "sources_anything"]
