"""GPTModel from an HF-style config (Llama, Qwen2/2.5, Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral).

``build_model`` returns the list of model chunks of this pipeline stage (Megatron style;
one chunk, no virtual pipeline). Each chunk carries ``chunk.model_args`` (the parsed
``ModelArgs``) and ``chunk.padded_vocab_size``.

Vocabulary padding: the embedding and output layer have ``padded_vocab_size`` rows (a
multiple of lcm(128, tp)); rows >= ``model_args.vocab_size`` are not tokens. Logits come out
vocab-parallel ([seq, batch, padded_vocab / tp] per TP rank, or [batch, seq, ...] from
GPTModel.forward); mask the padded columns to -inf before any softmax/log-softmax
(``mask_padded_vocab``) or slice them off.

Attention on the local (CPU) spec: pass an explicit boolean mask [batch, 1, seq, seq]
(True = masked). megatron's local attention only builds its default causal mask when the
mask is None, so the passed mask must include causality. RoPE uses positions 0..S-1 of each
row whatever ``position_ids`` say; because RoPE is relative, packing several sequences into
one row with a block-diagonal causal mask gives the same logits as unpacked rows (up to
float rounding of the larger angles). THD ``packed_seq_params`` need Transformer Engine.
Under TE's causal attention no mask is passed (TE ignores it): ``attention_mask_for``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from dapo_megatron import dtypes
from dapo_megatron.convert.arch import ModelArgs, model_args_from_hf
from dapo_megatron.policy.compat import enable_cpu_execution

logger = logging.getLogger(__name__)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def make_transformer_config(
    args: ModelArgs,
    *,
    params_dtype: torch.dtype,
    use_te: bool,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    recompute: bool | str = False,
    sequence_parallel: bool | None = None,
    moe_aux_loss_coeff: float = 0.0,
    **overrides: Any,
):
    """TransformerConfig for ``args`` under the current parallel_state layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    tp = ps.get_tensor_model_parallel_world_size()
    if sequence_parallel is None:
        sequence_parallel = on_gpu and tp > 1
    if sequence_parallel and not on_gpu:
        raise ValueError("sequence parallelism is unsupported on CPU (torch norm refuses it)")
    kw: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_kv_heads,
        kv_channels=args.head_dim,
        ffn_hidden_size=args.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        qk_layernorm=args.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=args.initializer_range,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not on_gpu,
        # Fused kernels are CUDA-only (and need TE/apex); harmless to keep off on CPU.
        bias_activation_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu and use_te,
        masked_softmax_fusion=on_gpu and use_te,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    if args.is_moe:
        kw.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_top_k,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            # topk-then-softmax == softmax, topk, renormalise (norm_topk_prob=True, Mixtral);
            # softmax-then-topk without renormalising is norm_topk_prob=False.
            moe_router_pre_softmax=not args.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            # The alltoall dispatcher needs CUDA streams; allgather works on both.
            moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
            moe_grouped_gemm=on_gpu and use_te,
            moe_layer_freq=[1 if args.is_moe_layer(i) else 0 for i in range(args.num_layers)],
            moe_shared_expert_intermediate_size=args.shared_expert_size or None,
            moe_shared_expert_gate=args.shared_expert_gate,
            moe_permute_fusion=False,
        )
    if recompute:
        granularity = recompute if isinstance(recompute, str) else "full"
        kw.update(recompute_granularity=granularity)
        if granularity == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=1)
    if fp8:
        if not (on_gpu and use_te):
            raise ValueError("fp8 needs CUDA and Transformer Engine")
        kw.update(fp8=fp8, fp8_recipe=fp8_recipe)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _install_hf_rope(model, args: ModelArgs, hf_config) -> None:
    """Replace megatron's inv_freq with the one transformers computes for this config, so
    every rope type that only rescales frequencies (default, linear, llama3) matches HF."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    if args.rope_type == "default":
        return  # megatron's formula is HF's default
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = hf_config
    if isinstance(cfg, dict):
        cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[args.rope_type](cfg, "cpu")
    if float(scaling) != 1.0:
        raise ValueError(f"rope_type {args.rope_type!r} scales attention; unsupported")
    if args.rope_type == "linear":
        # transformers folds the factor into inv_freq; megatron must not apply it twice.
        rope.seq_len_interpolation_factor = None
    rope.inv_freq = inv_freq.to(device=rope.inv_freq.device, dtype=rope.inv_freq.dtype)


def build_model(
    hf_config,
    *,
    params_dtype: torch.dtype | str | None = None,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    recompute: bool | str = False,
    wrap_ddp: bool | Any = False,
    use_te: bool | None = None,
    sequence_parallel: bool | None = None,
    moe_aux_loss_coeff: float = 0.0,
    **config_overrides: Any,
) -> list:
    """Build this pipeline stage's GPTModel chunks from an HF config.

    Call ``init_parallel`` first. ``params_dtype`` defaults to bf16 on GPU and fp32 on CPU.
    The TE layer spec is used when transformer_engine imports and CUDA is present
    (``use_te`` overrides), the local spec otherwise. ``fp8`` ('e4m3' or 'hybrid') with
    ``fp8_recipe`` ('delayed', 'tensorwise', 'mxfp8', 'blockwise') needs TE.
    ``wrap_ddp`` wraps each chunk in megatron DDP (True: a default
    DistributedDataParallelConfig with fp32 grad reduction; or pass a config).
    Weights are randomly initialised; load them with
    ``dapo_megatron.convert.load_hf_state_dict`` or a dist checkpoint.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from dapo_megatron.convert.spec_keys import spec_with_te_keys

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_execution()
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call dapo_megatron.policy.parallel.init_parallel() before build_model")
    args = model_args_from_hf(hf_config)
    if use_te is None:
        use_te = on_gpu and have_transformer_engine()
    if use_te and not have_transformer_engine():
        raise ValueError("use_te=True but transformer_engine does not import")
    params_dtype = dtypes.params_dtype(params_dtype, on_gpu)

    from dapo_megatron.resolve import layout_errors

    # The one layout check config validation and the planner run too.
    errors = layout_errors(args, ps.get_tensor_model_parallel_world_size(),
                           ps.get_pipeline_model_parallel_world_size(),
                           ps.get_expert_model_parallel_world_size(), ps.get_context_parallel_world_size(),
                           torch.distributed.get_world_size(), rollout=None)
    if errors:
        raise ValueError(f"{args.architecture}: " + "; ".join(errors))
    if ps.get_context_parallel_world_size() > 1 and not use_te:
        raise ValueError("context parallelism (cp > 1) needs the Transformer Engine spec (GPU)")

    config = make_transformer_config(
        args, params_dtype=params_dtype, use_te=use_te, fp8=fp8, fp8_recipe=fp8_recipe,
        recompute=recompute, sequence_parallel=sequence_parallel,
        moe_aux_loss_coeff=moe_aux_loss_coeff, **config_overrides,
    )
    # Checkpoint keys of the TE spec under either spec (convert runs the local one on CPU).
    block_spec = spec_with_te_keys(get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm"
    ))
    if not use_te:  # packed (THD) rows on the local spec: packed_attention.py
        from dapo_megatron.policy.packed_attention import spec_with_packed_local_attention

        block_spec = spec_with_packed_local_attention(block_spec)
    padded = args.padded_vocab_size(ps.get_tensor_model_parallel_world_size())
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=padded,
        max_sequence_length=args.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=args.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(args.rope_theta) if float(args.rope_theta).is_integer() else args.rope_theta,
        parallel_output=True,
    )
    _install_hf_rope(model, args, hf_config)
    # The local spec's torch norms (transformer/torch_norm.py, WrappedTorchNorm) are created
    # in fp32 whatever params_dtype says, while TE's norms and megatron-LM's Float16Module
    # (transformer/module.py) keep every parameter in params_dtype. Megatron's optimizers
    # assume one dtype per param group when they checkpoint (optimizer.py,
    # Float16OptimizerWithFloat16Params.sharded_state_dict; distrib_optimizer.py,
    # _build_optimizer_group_ranges): a bf16 Qwen2's fp32 norms beside its bf16 qkv biases
    # failed at save. Cast them as Float16Module would.
    if params_dtype != torch.float32:
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.data = param.data.to(params_dtype)
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    model.model_args = args
    model.padded_vocab_size = padded
    chunks = [model]
    if wrap_ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = (
            wrap_ddp if isinstance(wrap_ddp, DistributedDataParallelConfig)
            else DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        )
        wrapped = []
        for chunk in chunks:
            ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk)
            ddp.model_args, ddp.padded_vocab_size = args, padded
            wrapped.append(ddp)
        chunks = wrapped
    return chunks


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocab rows to -inf.

    ``logits``: [..., vocab / tp] vocab-parallel shard of this TP rank (or the full padded
    vocab at TP=1). Uses the TP rank to locate the shard's global column range.
    """
    from megatron.core import parallel_state as ps

    part = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * part if ps.model_parallel_is_initialized() else 0
    n_valid = max(0, min(part, vocab_size - start))
    if n_valid == part:
        return logits
    out = logits.clone()
    out[..., n_valid:] = float("-inf")
    return out


def causal_attention_mask(
    attention_mask_2d: torch.Tensor | None, seq_len: int, *, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask [batch, 1, seq, seq] for megatron attention (True = masked out).

    ``attention_mask_2d``: [batch, seq] with 1 for real tokens (None: all real).
    ``segment_ids``: [batch, seq] ids of packed sequences; tokens attend only within their
    segment (block-diagonal causal mask).
    """
    device = (attention_mask_2d if attention_mask_2d is not None else segment_ids)
    device = device.device if device is not None else "cpu"
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    allowed = causal[None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if attention_mask_2d is not None:
        keep = attention_mask_2d.bool()
        allowed = allowed & keep[:, None, :]
        # Fully masked (padding) query rows: let them see themselves to keep softmax finite.
        allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=device)[None]
    return (~allowed)[:, None]


def dense_mask_needed(te_attention: bool, attn_mask_type) -> bool:
    """Whether GPTModel.forward needs the dense [batch, 1, seq, seq] mask of right-padded rows.

    Not under TE's attention with a causal mask type: TE reads ``attention_mask`` only for
    "padding"/"arbitrary" mask types (transformer_engine 2.20.2,
    pytorch/attention/dot_product_attention/dot_product_attention.py, DotProductAttention
    docstring) and megatron passes the layer's type, causal in the GPT specs
    (gpt_layer_specs.py; extensions/transformer_engine.py, TEDotProductAttention.forward).
    With right padding a causal mask alone is exact for real tokens: padding only follows
    them. The local (CPU) attention applies whatever mask it is given, so it keeps one.
    """
    from megatron.core.transformer.enums import AttnMaskType

    return not (te_attention and attn_mask_type == AttnMaskType.causal)


def _is_te_attention(core_attention) -> bool:
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
    except Exception:  # noqa: BLE001 - no TE: it cannot be TE's attention
        return False
    # Without TE the module imports but binds the name to None.
    return (isinstance(TEDotProductAttention, type)
            and isinstance(core_attention, TEDotProductAttention))


def attention_mask_for(chunk, real_tokens: torch.Tensor) -> torch.Tensor | None:
    """The ``attention_mask`` for ``chunk``'s forward on right-padded rows.

    ``real_tokens``: [batch, seq] bool, True for real tokens. Returns the dense causal mask
    [batch, 1, seq, seq] (``causal_attention_mask``) where an attention layer of this chunk
    reads it, else None: on GPU that mask is about 0.5 GB per 22.5k-token row, kept for
    recompute (issue 14, finding 11).
    """
    layers = getattr(unwrap(chunk).decoder, "layers", [])
    if any(dense_mask_needed(_is_te_attention(layer.self_attention.core_attention),
                             layer.self_attention.attn_mask_type) for layer in layers):
        return causal_attention_mask(real_tokens, real_tokens.shape[1])
    return None


__all__ = [
    "attention_mask_for",
    "build_model",
    "causal_attention_mask",
    "dense_mask_needed",
    "have_transformer_engine",
    "make_transformer_config",
    "mask_padded_vocab",
    "unwrap",
]
