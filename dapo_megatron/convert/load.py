"""Load full HF tensors into one rank's Megatron shards (any TP/PP/EP layout).

Each local parameter is mapped to its canonical name (global layer and expert ids), the
full tensor is built from HF tensors by the rules, and this rank's slice is cut using the
parameter's partition attributes (``tensor_model_parallel``, ``partition_dim``) and the
TP rank (expert TP rank for routed experts).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch

from dapo_megatron.convert.rules import (
    MissingTensorError,
    hf_sources,
    hf_to_megatron,
    tp_split_dim,
)

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_TE_GROUPED = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_TE_NORMS = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}


def _unwrap(chunk):
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _num_local_experts(model) -> int:
    args = model.model_args
    if not args.is_moe:
        return 0
    from megatron.core import parallel_state as ps

    return args.num_experts // ps.get_expert_model_parallel_world_size()


def canonical_name(model, local_name: str) -> str | None:
    """Canonical Megatron name of local parameter ``local_name`` of ``model`` (a GPTModel
    chunk); None for parameters with no HF counterpart (TE ``_extra_state``)."""
    from megatron.core import parallel_state as ps

    if local_name.endswith("_extra_state"):
        return None
    name = local_name
    m = _LOCAL_LAYER.match(name)
    if m:
        layer = model.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[m.end():]
    for te, local in _TE_NORMS.items():
        if name.endswith(te):
            name = name[: -len(te)] + local
    offset = ps.get_expert_model_parallel_rank() * _num_local_experts(model)
    g = _TE_GROUPED.search(name)
    if g:
        name = (name[: g.start()] + f".mlp.experts.local_experts.{offset + int(g.group(2))}."
                f"{g.group(1)}.weight")
    else:
        e = _LOCAL_EXPERT.search(name)
        if e:
            name = (name[: e.start()] + f".mlp.experts.local_experts.{offset + int(e.group(1))}."
                    + name[e.end():])
    return name


def iter_local_params(model) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, canonical name, parameter) of a GPTModel chunk, shared ones once."""
    for local, param in model.named_parameters():
        canon = canonical_name(model, local)
        if canon is not None:
            yield local, canon, param


def partition_dim(model, local_name: str, param: torch.Tensor) -> int | None:
    """The TP-partitioned dim of a parameter, or None if it is replicated.

    Decided by the parameter's canonical name (``rules.tp_split_dim``), not by its
    ``partition_dim`` attribute: megatron sets that only inside its init functions
    (tensor_parallel/layers.py, absent with ``perform_initialization=False``), and
    Transformer Engine sets ``partition_dim=0`` on expert fc2 weights that are split along
    dim 1 (see ``tp_split_dim``). ``param`` is kept for callers' convenience.
    """
    canon = canonical_name(model, local_name)
    return None if canon is None else tp_split_dim(canon)


def _is_expert_param(canon: str) -> bool:
    return ".mlp.experts." in canon


def tp_rank_and_size(canon: str) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if _is_expert_param(canon):
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _is_gated_fc1(model, canon: str) -> bool:
    return canon.endswith("linear_fc1.weight") and model.config.gated_linear_unit


def shard_of(model, canon: str, dim: int | None, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``full`` along TP-partitioned ``dim`` (None: replicated)."""
    if dim is None:
        return full
    rank, size = tp_rank_and_size(canon)
    if size == 1:
        return full
    if _is_gated_fc1(model, canon):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim)[rank], torch.chunk(up, size, dim)[rank]])
    return torch.chunk(full, size, dim)[rank]


def _getter(source) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        try:
            return source[name]
        except KeyError:
            where = getattr(source, "location", None)
            raise MissingTensorError(
                f"HF tensor {name!r} missing"
                + (f" from {where}" if where else "")
            ) from None

    return get


def _read_directly(source, model, canon: str, dim, param: torch.Tensor) -> bool:
    """Fast path for lazy readers: a 1:1, unsharded, unpadded tensor is read straight into
    the parameter (no temporary copy; what keeps conversion memory near one model)."""
    if not hasattr(source, "read_into") or not param.data.is_contiguous():
        return False
    if dim is not None and tp_rank_and_size(canon)[1] > 1:
        return False
    srcs = hf_sources(model.model_args, canon)
    if len(srcs) != 1 or srcs[0] not in source:
        return False
    if canon in ("embedding.word_embeddings.weight", "output_layer.weight") and (
            model.padded_vocab_size != model.model_args.vocab_size):
        return False
    try:
        source.read_into(srcs[0], param.data)
    except ValueError:  # dtype/shape differ: the general path converts or reports it
        return False
    return True


@torch.no_grad()
def load_hf_state_dict(model_chunks, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy HF weights into this rank's shards of ``model_chunks``.

    ``hf_state_dict``: HF (hub) names -> full tensors, or a lazy reader with
    ``__getitem__`` (e.g. ``dapo_megatron.convert.hf_io.SafetensorsReader``). Every rank
    reads only the tensors its shards need. Raises ``MissingTensorError`` naming a missing
    tensor and ``ValueError`` naming a tensor whose shape does not fit.
    """
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    get = _getter(hf_state_dict)
    for chunk in model_chunks:
        model = _unwrap(chunk)
        args, padded = model.model_args, model.padded_vocab_size
        for local, canon, param in iter_local_params(model):
            dim = partition_dim(model, local, param)
            if _read_directly(hf_state_dict, model, canon, dim, param):
                continue
            full = hf_to_megatron(args, canon, get, padded)
            shard = shard_of(model, canon, dim, full)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(
                    f"{canon}: HF tensors give shape {tuple(full.shape)} (this rank's shard "
                    f"{tuple(shard.shape)}) but the model expects {tuple(param.shape)} for "
                    f"{local}; the config does not match the weights"
                )
            param.data.copy_(shard)


__all__ = ["canonical_name", "iter_local_params", "load_hf_state_dict", "partition_dim", "shard_of"]
