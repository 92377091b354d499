"""Megatron-core's GPT layer specs, local and Transformer Engine, read on a CPU box.

``layer_specs(config, use_te=True)`` runs megatron's own spec functions
(models/gpt/gpt_layer_specs.py, ``get_gpt_decoder_layer_specs``) with its own
``TESpecProvider`` (extensions/transformer_engine_spec_provider.py). Only the TE classes
the provider names cannot be imported without Transformer Engine, so each is stood in for
by an empty class of the same name: megatron's code decides *which* TE class fills each
slot; ``tensor_keys`` turns that into sharded-state-dict keys through ``PARAMS`` (what each
class owns, read from transformer_engine 2.20.2 and megatron's wrappers). ``tensor_keys``
reads the local spec the same way, and the tests check it against a real local model, so
the walk itself is tested.
"""

from __future__ import annotations

import importlib
import sys
import types
from contextlib import contextmanager
from unittest import mock

TE_CLASSES = ("TELinear", "TEColumnParallelLinear", "TERowParallelLinear",
              "TELayerNormColumnParallelLinear", "TENorm", "TEDotProductAttention",
              "TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear", "TEActivationOp")

# Parameters each module class owns (RMSNorm, no linear bias except linear_qkv's when the
# model has qkv bias: what model.py builds). TELayerNormColumnParallelLinear registers
# layer_norm_weight and weight (transformer_engine/pytorch/module/layernorm_linear.py).
PARAMS = {
    "TELayerNormColumnParallelLinear": ("layer_norm_weight", "weight"),
    "TEColumnParallelLinear": ("weight",), "TERowParallelLinear": ("weight",),
    "TELinear": ("weight",), "TENorm": ("weight",), "TEDotProductAttention": (),
    "ColumnParallelLinear": ("weight",), "RowParallelLinear": ("weight",),
    "WrappedTorchNorm": ("weight",), "DotProductAttention": (), "IdentityOp": (),
}
# Tensor-parallel split of each linear class: megatron's wrappers pass parallel_mode
# 'column' / 'row' (extensions/transformer_engine.py; tensor_parallel/layers.py).
TP_MODE = {"TELayerNormColumnParallelLinear": "column", "TEColumnParallelLinear": "column",
           "TEColumnParallelGroupedLinear": "column", "ColumnParallelLinear": "column",
           "TERowParallelLinear": "row", "TERowParallelGroupedLinear": "row",
           "RowParallelLinear": "row"}


@contextmanager
def _te_spec_module():
    from megatron.core.models.gpt import gpt_layer_specs

    fake = types.ModuleType("megatron.core.extensions.transformer_engine")
    for name in TE_CLASSES:
        setattr(fake, name, type(name, (), {}))
    provider_name = "megatron.core.extensions.transformer_engine_spec_provider"
    saved = sys.modules.pop(provider_name, None)
    try:
        with mock.patch.dict(sys.modules, {"megatron.core.extensions.transformer_engine": fake}):
            provider = importlib.import_module(provider_name)
    finally:
        sys.modules.pop(provider_name, None)
        if saved is not None:
            sys.modules[provider_name] = saved
    # TE 2.20.2 is newer than any version the provider asks about (asking would import TE).
    provider.is_te_min_version = lambda *a, **k: True
    with mock.patch.object(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider,
                           create=True), \
            mock.patch.object(gpt_layer_specs, "TENorm", fake.TENorm, create=True):
        yield gpt_layer_specs


def layer_specs(config, use_te: bool) -> list:
    """megatron's per-layer specs for ``config`` (a TransformerConfig)."""
    if use_te:
        with _te_spec_module() as g:
            return g.get_gpt_decoder_layer_specs(config, True, normalization="RMSNorm")
    from megatron.core.models.gpt import gpt_layer_specs as g

    return g.get_gpt_decoder_layer_specs(config, False, normalization="RMSNorm")


def _name(module) -> str:
    return getattr(module, "__name__", type(module).__name__)


def _slot(prefix: str, spec, out: dict, bias: bool = False) -> None:
    """Record the parameters of one slot: key -> (class name, param)."""
    module = getattr(spec, "module", spec)
    for p in PARAMS[_name(module)] + (("bias",) if bias else ()):
        out[prefix + p] = (_name(module), p)


def layer_params(spec, config) -> dict:
    """Sharded keys of one layer (relative to ``decoder.layers.N.``) -> (class, param),
    after the layer's ``sharded_state_dict_keys_map``."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    sub = spec.submodules
    out: dict = {}
    _slot("input_layernorm.", sub.input_layernorm, out)
    att = sub.self_attention.submodules
    _slot("self_attention.linear_qkv.", att.linear_qkv, out, bias=config.add_qkv_bias)
    _slot("self_attention.linear_proj.", att.linear_proj, out)
    _slot("self_attention.core_attention.", att.core_attention, out)
    _slot("self_attention.q_layernorm.", att.q_layernorm, out)
    _slot("self_attention.k_layernorm.", att.k_layernorm, out)
    _slot("pre_mlp_layernorm.", sub.pre_mlp_layernorm, out)
    mlp = sub.mlp
    if mlp.module is MoELayer:
        out["mlp.router.weight"] = ("TopKRouter", "weight")  # built by MoELayer itself
        experts = mlp.submodules.experts
        # TEGroupedMLP and SequentialMLP both key experts as experts.experts.linear_fc*.weight with
        # an expert axis (moe/experts.py, sharded_state_dict: "interchangeable").
        out["mlp.experts.experts.linear_fc1.weight"] = (_name(experts.submodules.linear_fc1), "weight")
        out["mlp.experts.experts.linear_fc2.weight"] = (_name(experts.submodules.linear_fc2), "weight")
        shared = mlp.submodules.shared_experts
        if shared is not None and config.moe_shared_expert_intermediate_size:
            _slot("mlp.shared_experts.linear_fc1.", shared.submodules.linear_fc1, out)
            _slot("mlp.shared_experts.linear_fc2.", shared.submodules.linear_fc2, out)
            if config.moe_shared_expert_gate:
                out["mlp.shared_experts.gate_weight"] = ("SharedExpertMLP", "gate_weight")
    else:
        _slot("mlp.linear_fc1.", mlp.submodules.linear_fc1, out)
        _slot("mlp.linear_fc2.", mlp.submodules.linear_fc2, out)
    mapped = {}
    for key, value in out.items():
        for old, new in (sub.sharded_state_dict_keys_map or {}).items():
            if key.startswith(old):  # first match, as apply_prefix_mapping does
                key = new + key[len(old):]
                break
        mapped[key] = value
    return mapped


def model_params(specs, config, tied: bool) -> dict:
    """Every sharded tensor key of a whole GPTModel built from ``specs``."""
    out = {"embedding.word_embeddings.weight": ("VocabParallelEmbedding", "weight"),
           "decoder.final_layernorm.weight": ("norm", "weight")}
    if not tied:
        out["output_layer.weight"] = ("ColumnParallelLinear", "weight")
    # Homogeneous blocks stack their layers under one key with a layer axis; a list-valued
    # moe_layer_freq (what model.py passes for MoE) keys each layer by its global index
    # (transformer/transformer_block.py, TransformerBlock.sharded_state_dict).
    freq = config.moe_layer_freq
    per_layer = isinstance(freq, list) or (isinstance(freq, int) and freq > 1)
    for i, spec in enumerate(specs):
        for key, value in layer_params(spec, config).items():
            out[f"decoder.layers.{i}.{key}" if per_layer else f"decoder.layers.{key}"] = value
    return out


def block(specs):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return TransformerBlockSubmodules(layer_specs=list(specs))
