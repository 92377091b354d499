"""Architecture description read from an HF config (transformers PretrainedConfig or dict).

``ModelArgs`` is the one place that interprets HF config fields; the model builder
(``dapo_megatron.policy.model``) and the name/layout rules (``dapo_megatron.convert.rules``)
both read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# HF architectures -> rule family. Mistral is Llama-named (without sliding windows).
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
}
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# Rope types whose only effect is on inv_freq (the builder installs HF's inv_freq).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
VOCAB_DIVISIBLE_BY = 128


class UnsupportedModelError(ValueError):
    """The HF config describes something these rules do not convert."""


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Vocab rows in Megatron: a multiple of lcm(divisible_by, tp).

    Megatron-LM pads to a multiple of divisible_by * tp; lcm gives the same size for every
    power-of-two TP up to ``divisible_by``, so a checkpoint's padded vocab does not depend
    on the layout it was written with. Rows past ``vocab_size`` are zero and never valid
    tokens: mask their logits to -inf (or slice them off) before any softmax.
    """
    multiple = math.lcm(divisible_by, tp)
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    rope_type: str
    rope_parameters: dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    initializer_range: float = 0.02
    torch_dtype: str | None = None
    # MoE
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    moe_layers: tuple = field(default_factory=tuple)  # global layer ids that are MoE

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def padded_vocab_size(self, tp: int = 1) -> int:
        return padded_vocab_size(self.vocab_size, tp)


def _as_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected an HF PretrainedConfig or a dict, got {type(hf_config).__name__}")


def _rope(cfg: dict) -> tuple[float, str, dict]:
    """Rope base and scaling from either transformers 5.x ``rope_parameters`` or the
    4.x form (top-level ``rope_theta`` + ``rope_scaling``)."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and "full_attention" in params and "rope_theta" not in params:
        params = params["full_attention"]  # per-layer-type form
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    merged["rope_theta"] = float(theta)
    merged["rope_type"] = rope_type
    return float(theta), rope_type, merged


def model_args_from_hf(hf_config: Any) -> ModelArgs:
    """Interpret an HF config; raises UnsupportedModelError naming what is unsupported."""
    cfg = _as_dict(hf_config)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPES.get(cfg.get("model_type", ""))
    if arch not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch or cfg.get('model_type')!r} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    family = FAMILIES[arch]
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{arch}: hidden_act={act!r} unsupported (SwiGLU/silu only)")
    if family == "llama" and cfg.get("attention_bias"):
        raise UnsupportedModelError(f"{arch}: attention_bias=True (o_proj bias) is unsupported")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{arch}: mlp_bias=True is unsupported")
    if cfg.get("use_sliding_window") or (
        family in ("llama", "mixtral") and cfg.get("sliding_window")
    ):
        raise UnsupportedModelError(f"{arch}: sliding-window attention is unsupported")
    theta, rope_type, rope_params = _rope(cfg)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{arch}: rope_type={rope_type!r} unsupported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{arch}: partial_rotary_factor != 1 is unsupported")

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"{arch}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}"
        )
    layers = int(cfg["num_hidden_layers"])
    num_experts = 0
    moe = {}
    if family in ("qwen3_moe", "qwen2_moe", "mixtral"):
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        if num_experts <= 0:
            raise UnsupportedModelError(f"{arch}: num_experts missing from the config")
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(
            i for i in range(layers) if i not in dense and (i + 1) % step == 0
        )
        if family == "mixtral":
            moe_ffn = int(cfg["intermediate_size"])
            norm_topk = True  # Mixtral always renormalises the top-k weights
        else:
            moe_ffn = int(cfg["moe_intermediate_size"])
            # Config-class default is False; released Qwen3-MoE checkpoints set True.
            norm_topk = bool(cfg.get("norm_topk_prob", False))
        shared = int(cfg.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
        moe = dict(
            num_experts=num_experts,
            moe_top_k=int(cfg["num_experts_per_tok"]),
            moe_ffn_hidden_size=moe_ffn,
            norm_topk_prob=norm_topk,
            shared_expert_size=shared,
            shared_expert_gate=shared > 0,
            moe_layers=moe_layers,
        )
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return ModelArgs(
        architecture=arch,
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_parameters=rope_params,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family in ("qwen2", "qwen2_moe") and bool(cfg.get("qkv_bias", True)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        torch_dtype=str(dtype).replace("torch.", "") if dtype else None,
        **moe,
    )


__all__ = [
    "FAMILIES",
    "ModelArgs",
    "UnsupportedModelError",
    "VOCAB_DIVISIBLE_BY",
    "model_args_from_hf",
    "padded_vocab_size",
]
