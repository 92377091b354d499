"""Start-up checks and records of a run, before any Ray actor exists.

- `trainer.device: cuda` without a usable GPU fails in seconds with the key named, instead
  of waiting in Ray's scheduler for GPU resources that never come;
- config.yaml records the model shape that runs: with `model.hf_dir` (or `model.hf_config`)
  it is read from a config.json, and the inline `model.*` shape keys are ignored.
"""

from __future__ import annotations

import os
import typing

import torch

from dapo_megatron.config import ConfigError, DapoConfig, ModelConfig


def check_local_device(cfg: DapoConfig) -> None:
    """Before Ray starts: a local run with trainer.device=cuda needs a GPU torch can use."""
    if cfg.trainer.device != "cuda" or os.environ.get("RAY_ADDRESS"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device: cuda, but torch sees no usable GPU on this machine (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); set "
            "trainer.device=cpu (or auto), or run where a GPU is visible")


def check_cluster_device(cfg: DapoConfig) -> None:
    """After ray.init: with trainer.device=cuda every policy rank needs a GPU in the cluster."""
    if cfg.trainer.device != "cuda":
        return
    import ray

    gpus, need = int(ray.cluster_resources().get("GPU", 0)), cfg.parallel.world_size
    if gpus < need:
        raise ConfigError(
            f"trainer.device: cuda needs {need} GPUs (parallel.nodes x parallel.gpus_per_node), "
            f"the Ray cluster has {gpus}; set trainer.device=cpu (or auto), or start the run "
            "where the GPUs are")


def record_model_shape(cfg: DapoConfig, resolved) -> None:
    """Put the shape the run reads (from model.hf_dir's config.json or the model.hf_config
    copy, see resolve.py) into cfg.model, whose inline shape keys the run then ignores, so
    that the dumped config.yaml says what ran. ``resolved``: `resolve.Resolved`."""
    from dapo_megatron.resolve import INLINE

    a, m = resolved.args, cfg.model
    if resolved.source == INLINE or a is None:
        return
    if a.family in typing.get_args(typing.get_type_hints(ModelConfig)["architecture"]):
        m.architecture = a.family
    m.vocab_size, m.hidden_size, m.num_layers = a.vocab_size, a.hidden_size, a.num_layers
    m.num_attention_heads, m.num_key_value_heads = a.num_heads, a.num_kv_heads
    m.head_dim, m.intermediate_size = a.head_dim, a.ffn_hidden_size
    m.max_position_embeddings = a.max_position_embeddings
    m.rope_theta, m.rms_norm_eps = float(a.rope_theta), float(a.norm_eps)
    m.tie_word_embeddings, m.init_std = bool(a.tie_word_embeddings), float(a.initializer_range)
    m.num_experts = a.num_experts
    if a.is_moe:
        m.num_experts_per_tok, m.moe_intermediate_size = a.moe_top_k, a.moe_ffn_hidden_size
        m.norm_topk_prob = bool(a.norm_topk_prob)
