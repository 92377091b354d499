"""HF <-> Megatron name and layout rules on full (unsharded) tensors.

Megatron names here are *canonical*: the local-spec ``GPTModel.state_dict()`` names with the
global layer index and the global expert index (``mlp.experts.local_experts.{e}``), e.g.
``decoder.layers.3.self_attention.linear_qkv.weight``. ``canonical_name`` maps the names of
one rank's parameters (local layer/expert ids, TE fused-norm names, TE grouped experts)
onto them. HF names are the hub checkpoint names (what ``save_pretrained`` writes and what
rollout engines load), e.g. ``model.layers.3.self_attn.q_proj.weight``.

Layouts:
- linear_qkv: per query group g, rows [q heads of g (heads/groups * head_dim), k_g, v_g].
  TP splits rows contiguously, so each rank holds whole groups.
- linear_fc1 (SwiGLU): rows [gate; up]. Under TP every rank holds [gate_r; up_r].
- word embeddings / output layer: padded with zero rows to ``ModelArgs.padded_vocab_size()``.

TP split dimension (``tp_split_dim``): a property of the canonical name, not read from the
parameter's ``partition_dim`` attribute, because Transformer Engine's expert linears carry
a wrong one (see ``tp_split_dim``).
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from dapo_megatron.convert.arch import ModelArgs

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


class MissingTensorError(KeyError):
    """An HF tensor the model needs is absent from the checkpoint."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


def _mlp_hf_names(args: ModelArgs, prefix: str, expert: int | None) -> tuple[str, str, str]:
    """(gate, up, down) HF names of a dense MLP, routed expert or shared expert."""
    if args.family == "mixtral" and expert is not None:
        p = f"{prefix}.block_sparse_moe.experts.{expert}"
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
    if expert is not None:
        p = f"{prefix}.mlp.experts.{expert}"
    else:
        p = f"{prefix}.mlp"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def _router_hf_name(args: ModelArgs, prefix: str) -> str:
    if args.family == "mixtral":
        return f"{prefix}.block_sparse_moe.gate.weight"
    return f"{prefix}.mlp.gate.weight"


def canonical_names(args: ModelArgs) -> list[str]:
    """Every canonical Megatron parameter name of the whole model (all stages/experts)."""
    names = ["embedding.word_embeddings.weight"]
    for layer in range(args.num_layers):
        p = f"decoder.layers.{layer}"
        names += [f"{p}.input_layernorm.weight", f"{p}.self_attention.linear_qkv.weight"]
        if args.qkv_bias:
            names.append(f"{p}.self_attention.linear_qkv.bias")
        if args.qk_norm:
            names += [f"{p}.self_attention.q_layernorm.weight",
                      f"{p}.self_attention.k_layernorm.weight"]
        names += [f"{p}.self_attention.linear_proj.weight", f"{p}.pre_mlp_layernorm.weight"]
        if args.is_moe_layer(layer):
            names.append(f"{p}.mlp.router.weight")
            for e in range(args.num_experts):
                names += [f"{p}.mlp.experts.local_experts.{e}.linear_fc1.weight",
                          f"{p}.mlp.experts.local_experts.{e}.linear_fc2.weight"]
            if args.shared_expert_size:
                names += [f"{p}.mlp.shared_experts.linear_fc1.weight",
                          f"{p}.mlp.shared_experts.linear_fc2.weight"]
                if args.shared_expert_gate:
                    names.append(f"{p}.mlp.shared_experts.gate_weight")
        else:
            names += [f"{p}.mlp.linear_fc1.weight", f"{p}.mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not args.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


# Column-parallel weights are split along dim 0 (output rows), row-parallel ones along
# dim 1 (input columns); megatron's checkpoint format uses the same axes
# (tensor_parallel/layers.py, ColumnParallelLinear / RowParallelLinear.sharded_state_dict;
# extensions/transformer_engine.py, TEColumn/RowParallelGroupedLinear tp_axis_map).
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                    "linear_fc1.weight")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "linear_fc2.weight")


def tp_split_dim(name: str) -> int | None:
    """Dimension along which canonical Megatron parameter ``name`` is split over its TP group
    (the expert TP group for routed experts); None: replicated on every TP rank.

    Routed-expert ``linear_fc2`` is row parallel (split along dim 1, its input) whatever the
    parameter says: under the Transformer Engine spec megatron builds expert linears with
    ``parallel_mode=None`` once expert TP or EP > 1 (extensions/transformer_engine.py,
    TEGroupedLinear / TELinear, ``explicit_expert_comm``), and TE then marks every weight
    ``partition_dim=0`` (transformer_engine 2.20.2, pytorch/module/grouped_linear.py and
    linear.py, ``dim=1 if parallel_mode == "row" else 0``), so that attribute is wrong for fc2.
    """
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return 0
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def hf_sources(args: ModelArgs, name: str) -> list[str]:
    """HF tensors that make up canonical Megatron parameter ``name`` (in combine order)."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "output_layer.weight":
        return ["model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no HF rule for Megatron parameter {name!r}")
    layer, rest = int(m.group(1)), m.group(2)
    p = f"model.layers.{layer}"
    attn = f"{p}.self_attn"
    simple = {
        "input_layernorm.weight": f"{p}.input_layernorm.weight",
        "pre_mlp_layernorm.weight": f"{p}.post_attention_layernorm.weight",
        "self_attention.linear_proj.weight": f"{attn}.o_proj.weight",
        "self_attention.q_layernorm.weight": f"{attn}.q_norm.weight",
        "self_attention.k_layernorm.weight": f"{attn}.k_norm.weight",
        "mlp.router.weight": _router_hf_name(args, p),
        "mlp.shared_experts.gate_weight": f"{p}.mlp.shared_expert_gate.weight",
    }
    if rest in simple:
        return [simple[rest]]
    if rest == "self_attention.linear_qkv.weight":
        return [f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"]
    if rest == "self_attention.linear_qkv.bias":
        return [f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"]
    expert = None
    em = _EXPERT.match(rest)
    if em:
        expert, rest = int(em.group(1)), "mlp." + em.group(2)
    elif rest.startswith("mlp.shared_experts."):
        gate, up, down = (n.replace(f"{p}.mlp.", f"{p}.mlp.shared_expert.")
                          for n in _mlp_hf_names(args, p, None))
        rest = rest.replace("shared_experts.", "")
        return [gate, up] if rest == "mlp.linear_fc1.weight" else [down]
    gate, up, down = _mlp_hf_names(args, p, expert)
    if rest == "mlp.linear_fc1.weight":
        return [gate, up]
    if rest == "mlp.linear_fc2.weight":
        return [down]
    raise KeyError(f"no HF rule for Megatron parameter {name!r}")


def _qkv_fuse(args: ModelArgs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups, hd = args.num_kv_heads, args.head_dim
    per = args.num_heads // groups
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, per * hd, *tail), k.reshape(groups, hd, *tail),
         v.reshape(groups, hd, *tail)], dim=1)
    return fused.reshape(groups * (per + 2) * hd, *tail)


def _qkv_split(args: ModelArgs, qkv: torch.Tensor):
    groups, hd = args.num_kv_heads, args.head_dim
    per = args.num_heads // groups
    tail = qkv.shape[1:]
    g = qkv.reshape(groups, (per + 2) * hd, *tail)
    q, k, v = torch.split(g, [per * hd, hd, hd], dim=1)
    return (q.reshape(groups * per * hd, *tail), k.reshape(groups * hd, *tail),
            v.reshape(groups * hd, *tail))


def _pad_vocab(args: ModelArgs, t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    out = torch.zeros((padded, *t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def hf_to_megatron(
    args: ModelArgs, name: str, get_hf: Callable[[str], torch.Tensor], padded_vocab: int
) -> torch.Tensor:
    """Full tensor of canonical Megatron parameter ``name`` built from HF tensors."""
    sources = [get_hf(s) for s in hf_sources(args, name)]
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return _pad_vocab(args, sources[0], padded_vocab)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return _qkv_fuse(args, *sources)
    if len(sources) == 2:  # gate/up -> linear_fc1
        return torch.cat(sources, dim=0)
    return sources[0]


def megatron_to_hf(
    args: ModelArgs, name: str, full: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of canonical Megatron parameter ``name``; padding removed.

    ``output_layer.weight`` of a tied model yields nothing (HF checkpoints omit lm_head).
    """
    if name == "output_layer.weight" and args.tie_word_embeddings:
        return []
    sources = hf_sources(args, name)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [(sources[0], full[: args.vocab_size])]
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return list(zip(sources, _qkv_split(args, full), strict=True))
    if len(sources) == 2:
        gate, up = torch.chunk(full, 2, dim=0)
        return [(sources[0], gate), (sources[1], up)]
    return [(sources[0], full)]


def hf_names(args: ModelArgs) -> list[str]:
    """Every HF tensor name of the model (hub layout, lm_head only when untied)."""
    out: list[str] = []
    for name in canonical_names(args):
        if name == "output_layer.weight" and args.tie_word_embeddings:
            continue
        out += hf_sources(args, name)
    return out


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Expected shape of each HF tensor, from the config alone."""
    h, hd = args.hidden_size, args.head_dim
    shapes = {}
    for n in hf_names(args):
        if n in ("model.embed_tokens.weight", "lm_head.weight"):
            s = (args.vocab_size, h)
        elif n.endswith("norm.weight") and ".self_attn." in n:
            s = (hd,)
        elif n.endswith("layernorm.weight") or n == "model.norm.weight":
            s = (h,)
        elif n.endswith("q_proj.weight"):
            s = (args.num_heads * hd, h)
        elif n.endswith(("k_proj.weight", "v_proj.weight")):
            s = (args.num_kv_heads * hd, h)
        elif n.endswith("q_proj.bias"):
            s = (args.num_heads * hd,)
        elif n.endswith(("k_proj.bias", "v_proj.bias")):
            s = (args.num_kv_heads * hd,)
        elif n.endswith("o_proj.weight"):
            s = (h, args.num_heads * hd)
        elif n.endswith("shared_expert_gate.weight"):
            s = (1, h)
        elif n.endswith("gate.weight") and ".experts." not in n:
            s = (args.num_experts, h)
        else:
            if ".shared_expert." in n:
                ffn = args.shared_expert_size
            elif ".experts." in n:
                ffn = args.moe_ffn_hidden_size
            else:
                ffn = args.ffn_hidden_size
            s = (h, ffn) if n.endswith(("down_proj.weight", "w2.weight")) else (ffn, h)
        shapes[n] = s
    return shapes


def iter_canonical_for_layers(args: ModelArgs, layers: range) -> Iterator[str]:
    """Canonical names of the given global layers (helper for streaming conversions)."""
    wanted = set(layers)
    for name in canonical_names(args):
        m = _LAYER.match(name)
        if m and int(m.group(1)) in wanted:
            yield name


__all__ = [
    "MissingTensorError",
    "canonical_names",
    "hf_names",
    "hf_shapes",
    "hf_sources",
    "hf_to_megatron",
    "megatron_to_hf",
    "tp_split_dim",
]
