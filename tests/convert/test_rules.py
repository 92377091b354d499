"""Name/layout rules on full tensors: HF -> Megatron -> HF is the identity, per family."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.convert.arch import UnsupportedModelError, model_args_from_hf
from dapo_megatron.convert.rules import (
    MissingTensorError,
    canonical_names,
    hf_names,
    hf_shapes,
    hf_to_megatron,
    megatron_to_hf,
)
from tests.convert.tiny import FAMILIES, tiny_config


def _random_hf(args):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in hf_shapes(args).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_identity(family):
    args = model_args_from_hf(tiny_config(family))
    hf = _random_hf(args)
    padded = args.padded_vocab_size(2)
    back = {}
    for name in canonical_names(args):
        full = hf_to_megatron(args, name, hf.__getitem__, padded)
        for hf_name, t in megatron_to_hf(args, name, full):
            assert hf_name not in back
            back[hf_name] = t
    assert sorted(back) == sorted(hf) == sorted(hf_names(args))
    for n in hf:
        assert torch.equal(back[n], hf[n]), n


def test_qkv_layout_is_grouped():
    args = model_args_from_hf(tiny_config("llama"))  # 4 heads, 2 groups, head_dim 16
    hd = args.head_dim
    hf = {f"model.layers.0.self_attn.{p}_proj.weight": torch.full(
        (args.num_heads * hd if p == "q" else args.num_kv_heads * hd, args.hidden_size), i,
        dtype=torch.float32) for i, p in enumerate("qkv")}
    qkv = hf_to_megatron(args, "decoder.layers.0.self_attention.linear_qkv.weight", hf.__getitem__, 256)
    rows = qkv[:, 0].reshape(args.num_kv_heads, -1)
    # per group: 2 q heads, then k, then v
    expect = torch.tensor([0] * (2 * hd) + [1] * hd + [2] * hd, dtype=torch.float32)
    assert torch.equal(rows[0], expect) and torch.equal(rows[1], expect)


def test_vocab_padding_and_tied_output():
    args = model_args_from_hf(tiny_config("qwen2"))  # tied
    assert "output_layer.weight" not in canonical_names(args)
    assert "lm_head.weight" not in hf_names(args)
    emb = torch.randn(args.vocab_size, args.hidden_size)
    full = hf_to_megatron(args, "output_layer.weight", {"model.embed_tokens.weight": emb}.__getitem__, 256)
    assert full.shape[0] == 256 and torch.equal(full[:200], emb) and not full[200:].any()
    assert megatron_to_hf(args, "output_layer.weight", full) == []


def test_missing_tensor_and_unknown_arch_are_named():
    args = model_args_from_hf(tiny_config("llama"))

    def get(name):
        raise MissingTensorError(f"HF tensor {name!r} missing")

    with pytest.raises(MissingTensorError, match="model.layers.1.mlp.gate_proj.weight"):
        hf_to_megatron(args, "decoder.layers.1.mlp.linear_fc1.weight", get, 256)
    cfg = tiny_config("llama").to_dict()
    cfg["architectures"] = ["FalconForCausalLM"]
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        model_args_from_hf(cfg)


def test_rope_and_moe_config_forms():
    cfg = tiny_config("llama").to_dict()
    cfg.pop("rope_parameters", None)
    old = {**cfg, "rope_theta": 123.0, "rope_scaling": None}
    assert model_args_from_hf(old).rope_theta == 123.0
    new = {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 77.0}}
    assert model_args_from_hf(new).rope_theta == 77.0
    q = tiny_config("qwen3_moe").to_dict()
    assert model_args_from_hf({**q, "norm_topk_prob": False}).norm_topk_prob is False
    assert model_args_from_hf({**q, "norm_topk_prob": True}).norm_topk_prob is True
    q.pop("norm_topk_prob")  # the config class default
    assert model_args_from_hf(q).norm_topk_prob is False
    assert model_args_from_hf({**q, "mlp_only_layers": [0]}).moe_layers == (1,)
