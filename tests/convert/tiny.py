"""Tiny random HF models for every supported family, built from configs (no downloads),
and a Megatron forward that works under any TP/PP/EP layout (used by several tests)."""

from __future__ import annotations

import os

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")
# Config variants worth a logits check of their own: name -> (family, config overrides).
VARIANTS = {
    "llama3_rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "qwen3_moe_dense0": ("qwen3_moe", {"mlp_only_layers": [0], "norm_topk_prob": False}),
}
VOCAB = 200  # not a multiple of 128: exercises vocab padding


def tiny_config(family: str, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=50000.0)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "tie_word_embeddings": True})  # tied + qkv bias
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=24)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, norm_topk_prob=True)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                norm_topk_prob=False)
    else:
        raise ValueError(family)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_hf_model(family: str, out_dir: str, seed: int = 0, **overrides):
    """Random HF model saved to ``out_dir`` (config.json + model.safetensors); returns it.

    ``family`` may also be a VARIANTS name."""
    import transformers as tf

    if family in VARIANTS:
        family, extra = VARIANTS[family]
        overrides = {**extra, **overrides}
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = getattr(tf, cfg.architectures[0])(cfg).eval()
    # Random (not zero/one) norms so a norm-mapping mistake cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(out_dir)
    return model


def read_hf_dir(hf_dir: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, f)))
    return out


def prompt_ids(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def megatron_logits(chunks, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [batch, seq, vocab] of ``input_ids`` on every rank.

    Handles PP by sending the hidden states stage to stage with plain torch.distributed
    point-to-point calls, and TP by all-gathering the vocab-parallel logits.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron.policy.model import causal_attention_mask, unwrap

    model = unwrap(chunks[0]).eval()
    b, s = input_ids.shape
    mask = causal_attention_mask(None, s).expand(b, 1, s, s)
    hidden = model.config.hidden_size
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            recv = torch.empty(s, b, hidden, dtype=model.config.params_dtype)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        out = model(input_ids=input_ids, position_ids=None, attention_mask=mask)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            result = None
        else:
            tp = ps.get_tensor_model_parallel_world_size()
            if tp > 1:
                parts = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                out = torch.cat(parts, dim=-1)
            result = out[..., : model.model_args.vocab_size].float().contiguous()
    # Share with every rank (the first stage holds no logits under PP).
    if ps.get_pipeline_model_parallel_world_size() > 1:
        shape_src = ps.get_pipeline_model_parallel_last_rank()
        buf = result if result is not None else torch.empty(b, s, model.model_args.vocab_size)
        dist.broadcast(buf, src=shape_src, group=ps.get_pipeline_model_parallel_group())
        result = buf
    return result
