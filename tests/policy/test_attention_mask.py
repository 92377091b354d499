"""The dense [b,1,s,s] mask is built only where the attention reads it (issue 14, finding 11)."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed


def test_te_causal_attention_needs_no_dense_mask():
    from megatron.core.transformer.enums import AttnMaskType

    from dapo_megatron.policy.model import dense_mask_needed

    assert not dense_mask_needed(True, AttnMaskType.causal)
    assert dense_mask_needed(True, AttnMaskType.padding_causal)  # TE would read the mask
    assert dense_mask_needed(False, AttnMaskType.causal)  # local attention applies it


def _worker(rank, world, hf_config):
    import warnings

    warnings.filterwarnings("ignore")
    from dapo_megatron.policy.model import attention_mask_for, build_model, causal_attention_mask
    from dapo_megatron.policy.parallel import init_parallel

    init_parallel()
    torch.manual_seed(0)
    model = build_model(hf_config)[0].eval()
    lens = torch.tensor([10, 6])
    ids = torch.randint(0, hf_config["vocab_size"], (2, 10))
    real = torch.arange(10)[None] < lens[:, None]
    mask = attention_mask_for(model, real)
    with torch.no_grad():
        dense = model(ids, None, mask)
        causal_only = model(ids, None, None)  # megatron's own causal mask, no padding mask
    same_mask = mask is not None and torch.equal(mask, causal_attention_mask(real, 10))
    diff = max(float((dense[i, :n] - causal_only[i, :n]).abs().max()) for i, n in enumerate(lens))
    return same_mask, diff


@pytest.mark.dist
def test_local_attention_keeps_the_mask_and_causal_alone_is_exact_for_real_tokens():
    from dapo_megatron.config import ModelConfig

    cfg = ModelConfig(hidden_size=32, num_layers=2, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    same_mask, diff = run_distributed(_worker, 1, cfg.hf_config_dict(vocab_size=50))[0]
    assert same_mask  # CPU path unchanged: the dense mask, as before
    # The premise of passing None under TE: with right padding, causal masking alone gives
    # the real tokens exactly the outputs the padding mask gives.
    assert diff < 1e-5, diff
