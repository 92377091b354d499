"""Checkpoint keys that do not depend on the layer spec (local on CPU, Transformer Engine on GPU).

A checkpoint written under one spec must load under the other: tools/convert_hf.py runs
the local spec (no TE on a CPU box), the GPU run builds the TE spec. megatron-core 0.16.1
makes the two agree through ``sharded_state_dict_keys_map`` (models/gpt/gpt_layer_specs.py)
except in two places, both fixed here:

1. The pre-MLP norm of an MoE layer. The local spec maps ``pre_mlp_layernorm.`` onto
   ``mlp.linear_fc1.layer_norm_`` in every layer, dense or MoE
   (``get_gpt_layer_local_spec``). The TE spec fuses that norm into ``linear_fc1`` only in
   dense layers; its MoE layer keeps a ``TENorm`` at ``pre_mlp_layernorm`` with no key map
   (``get_gpt_layer_with_transformer_engine_spec``: ``pre_mlp_layernorm=backend.layer_norm()
   if num_experts else IdentityOp``). ``spec_with_te_keys`` drops the mapping from the
   local spec's MoE layers, so both specs read and write
   ``decoder.layers.N.pre_mlp_layernorm.weight`` there.
2. ``_extra_state``. TE modules (norms, attention, every linear and every grouped GEMM)
   carry FP8 metadata as ``_extra_state`` objects; the local spec has them only on its
   linears. ``extra_state_from_model`` lets a TE model load a checkpoint that lacks some of
   them (a converted one): the module keeps its fresh state, which is what TE starts from.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

_PRE_MLP = "pre_mlp_layernorm."


def _is_moe_layer(layer_spec) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    mlp = getattr(layer_spec.submodules, "mlp", None)
    return getattr(mlp, "module", None) is MoELayer


def spec_with_te_keys(block_spec):
    """``block_spec`` (a ``TransformerBlockSubmodules``) whose MoE layers store the pre-MLP
    norm under the TE spec's key; dense layers and TE specs are returned unchanged."""
    layers = []
    for spec in block_spec.layer_specs:
        keys = getattr(spec.submodules, "sharded_state_dict_keys_map", None) or {}
        if _is_moe_layer(spec) and _PRE_MLP in keys:
            keys = {k: v for k, v in keys.items() if k != _PRE_MLP}
            spec = dataclasses.replace(
                spec, submodules=dataclasses.replace(spec.submodules,
                                                     sharded_state_dict_keys_map=keys))
        layers.append(spec)
    return dataclasses.replace(block_spec, layer_specs=layers)


def checkpoint_keys(checkpoint_dir: str) -> set[str]:
    """Keys of every tensor and object stored in a dist checkpoint (metadata only)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return set(load_sharded_metadata(checkpoint_dir))


def extra_state_from_model(sharded_state_dict: dict, checkpoint_dir: str) -> list[str]:
    """Serve ``_extra_state`` objects the checkpoint lacks from the model itself.

    Each such ``ShardedObject`` in ``sharded_state_dict`` (nested dicts allowed) becomes a
    ``LocalNonpersistentObject`` of its current value, which ``dist_checkpointing.load``
    hands back untouched (dist_checkpointing/serialization.py, load: step 3), so a strict
    ``load_state_dict`` afterwards still finds every key. Returns the keys so served.
    Anything else missing still fails in ``dist_checkpointing.load`` with its key.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    stored = checkpoint_keys(checkpoint_dir)
    served: list[str] = []

    def visit(d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                visit(v)
            elif (isinstance(v, ShardedObject) and v.key.endswith("_extra_state")
                  and v.key not in stored and v.unique_key not in stored):
                d[k] = LocalNonpersistentObject(v.data)
                served.append(v.key)

    visit(sharded_state_dict)
    if served:
        logger.info("%s has no state for %d _extra_state objects (e.g. %s): kept the model's",
                    checkpoint_dir, len(served), served[0])
    return served


__all__ = ["checkpoint_keys", "extra_state_from_model", "spec_with_te_keys"]
