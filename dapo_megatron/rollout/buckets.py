"""Weight-sync buckets: size-bounded re-bucketing and strict HF-name loading into a module."""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch

from dapo_megatron.rollout.protocol import WeightBucket

logger = logging.getLogger(__name__)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_nbytes(bucket: WeightBucket) -> int:
    return sum(tensor_nbytes(t) for _, t in bucket)


def rebucket(buckets: Iterable[WeightBucket], max_bytes: int) -> Iterator[WeightBucket]:
    """Regroup a stream of named tensors into buckets of at most max_bytes each.

    Tensors keep their order and are never split: a single tensor larger than max_bytes
    travels alone in its own bucket. Lazily consumes the input, so at most one input
    bucket plus one output bucket are alive at a time.
    """
    if max_bytes <= 0:
        raise ValueError(f"bucket max_bytes must be > 0, got {max_bytes}")
    current: WeightBucket = []
    size = 0
    for bucket in buckets:
        for name, tensor in bucket:
            nbytes = tensor_nbytes(tensor)
            if current and size + nbytes > max_bytes:
                yield current
                current, size = [], 0
            current.append((name, tensor))
            size += nbytes
    if current:
        yield current


class StrictLoader:
    """Copies HF-named tensors into a module's parameters, refusing anything off-spec.

    One loader serves one full weight sync: every parameter must arrive exactly once
    (aliases of tied parameters, e.g. lm_head.weight with tied embeddings, count as the
    parameter they alias). Each bucket is validated whole before any of it is copied.
    """

    def __init__(self, module: torch.nn.Module):
        self._params: dict[str, torch.Tensor] = {}
        self._canonical: dict[str, str] = {}
        by_id: dict[int, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            canonical = by_id.setdefault(id(param), name)
            self._params[name] = param
            self._canonical[name] = canonical
        for name, buf in module.named_buffers():
            # Persistent buffers are part of the HF checkpoint; rotary inv_freq is not.
            leaf_owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if name.rsplit(".", 1)[-1] not in leaf_owner._non_persistent_buffers_set:
                self._params[name] = buf
                self._canonical[name] = name
        self._covers = _per_expert_views(self._params, self._canonical)
        self._missing = set(self._canonical.values()) - set(self._covers)
        self.bytes_loaded = 0

    def load_bucket(self, bucket: WeightBucket) -> None:
        unknown = [name for name, _ in bucket if name not in self._params]
        if unknown:
            raise KeyError(
                f"update_weights: unknown tensor name(s) {unknown[:8]}"
                f"{' ...' if len(unknown) > 8 else ''}; the engine's model expects HF names such "
                f"as {sorted(self._params)[:3]}: check the export's name conversion"
            )
        for name, tensor in bucket:
            expected = tuple(self._params[name].shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                    f"expects {expected}: was a TP shard sent instead of the gathered tensor?"
                )
        with torch.no_grad():
            for name, tensor in bucket:
                self._params[name].copy_(tensor)
                self._missing.discard(self._canonical[name])
                self._missing.difference_update(self._covers.get(name, ()))
                self.bytes_loaded += tensor_nbytes(tensor)

    def finish(self) -> None:
        """Raise if some parameter never arrived during this sync."""
        if self._missing:
            missing = sorted(self._missing)
            raise KeyError(
                f"update_weights: {len(missing)} tensor(s) missing from the sync, e.g. "
                f"{missing[:8]}: every parameter must be sent on each sync"
            )


def _per_expert_views(params: dict[str, torch.Tensor], canonical: dict[str, str]) -> dict[str, list[str]]:
    """Make the hub's per-expert names loadable into fused expert tensors.

    transformers 5 keeps a MoE layer's experts fused, ``experts.gate_up_proj`` [experts,
    2 * inter, hidden] (gate rows first) and ``experts.down_proj`` [experts, hidden, inter],
    and converts from and to the hub's ``experts.{e}.gate_proj / up_proj / down_proj.weight``
    when it loads and saves (transformers/conversion_mapping.py, qwen2_moe's
    MergeModulelist + Concatenate, which qwen3_moe shares); the weight export sends hub names.
    Each per-expert name is added as a view of its slice; returns fused name -> its pieces
    (a sync may send either form).
    """
    covers: dict[str, list[str]] = {}
    for name in [n for n in params if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        fused = params[name]
        if fused.dim() != 3:
            continue
        prefix, kind = name.rsplit(".", 1)
        half = fused.shape[1] // 2
        pieces = []
        for e in range(fused.shape[0]):
            views = ({f"{prefix}.{e}.gate_proj.weight": fused[e, :half],
                      f"{prefix}.{e}.up_proj.weight": fused[e, half:]} if kind == "gate_up_proj"
                     else {f"{prefix}.{e}.down_proj.weight": fused[e]})
            for piece, view in views.items():
                params[piece], canonical[piece] = view, piece
                pieces.append(piece)
        covers[name] = pieces
    return covers


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under the hub's names: fused expert tensors split per expert
    (``_per_expert_views``; views, no copy), what the policy's HF loader reads."""
    state = dict(model.state_dict())
    canonical = {name: name for name in state}
    for fused in _per_expert_views(state, canonical):
        del state[fused]
    return state
