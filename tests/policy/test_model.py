"""Megatron GPTModel built from HF configs gives HF logits under every layout.

Each layout runs in its own real gloo processes (tests/dist.py); one spawn builds all
families, so the suite pays the megatron import once per layout.
"""

from __future__ import annotations

import pytest
import torch

from tests.convert.tiny import FAMILIES, MOE_FAMILIES, VARIANTS, make_hf_model, prompt_ids

ALL = FAMILIES + tuple(VARIANTS)
MOE = MOE_FAMILIES + tuple(v for v, (fam, _) in VARIANTS.items() if fam in MOE_FAMILIES)
from tests.dist import run_distributed

TOL = 1e-4  # fp32 on CPU; measured ~3e-7


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (hf dir, HF reference logits on the fixed prompt)."""
    out = {}
    for fam in ALL:
        d = tmp_path_factory.mktemp(fam)
        hf = make_hf_model(fam, str(d))
        with torch.no_grad():
            out[fam] = (str(d), hf(prompt_ids()).logits.numpy())
    return out


def _logits_worker(rank, world, layout, dirs):
    from transformers import AutoConfig

    from dapo_megatron.convert import load_hf_state_dict
    from dapo_megatron.policy.model import build_model
    from dapo_megatron.policy.parallel import destroy_parallel, init_parallel
    from tests.convert.tiny import megatron_logits, prompt_ids, read_hf_dir

    init_parallel(**layout)
    out = {}
    for fam, d in dirs.items():
        chunks = build_model(AutoConfig.from_pretrained(d))
        load_hf_state_dict(chunks, read_hf_dir(d))
        out[fam] = megatron_logits(chunks, prompt_ids()).numpy()
    destroy_parallel()
    return out


@pytest.mark.dist
@pytest.mark.parametrize(
    "layout,world",
    [({}, 1), ({"tp": 2}, 2), ({"pp": 2}, 2), ({"ep": 2}, 2)],
    ids=["tp1", "tp2", "pp2", "ep2"],
)
def test_logits_match_hf(hf_models, layout, world):
    fams = MOE if "ep" in layout else ALL
    dirs = {f: hf_models[f][0] for f in fams}
    results = run_distributed(_logits_worker, world, layout, dirs)
    for rank, per_family in enumerate(results):
        for fam, logits in per_family.items():
            diff = abs(logits - hf_models[fam][1]).max()
            assert diff < TOL, f"{fam} {layout} rank {rank}: max abs logit diff {diff}"


def _error_worker(rank, world):
    from dapo_megatron.convert import UnsupportedModelError
    from dapo_megatron.policy.model import build_model
    from dapo_megatron.policy.parallel import init_parallel
    from tests.convert.tiny import tiny_config

    init_parallel(tp=2)
    msgs = []
    cfg = tiny_config("llama", num_key_value_heads=1)
    try:
        build_model(cfg)
    except ValueError as e:
        msgs.append(str(e))
    try:
        build_model({**tiny_config("llama").to_dict(), "architectures": ["GPT2LMHeadModel"]})
    except UnsupportedModelError as e:
        msgs.append(str(e))
    return msgs


@pytest.mark.dist
def test_layout_errors_are_clear():
    msgs = run_distributed(_error_worker, 2)[0]
    assert "num_key_value_heads=1" in msgs[0]
    assert "GPT2LMHeadModel" in msgs[1]


def test_world_size_not_divisible():
    from dapo_megatron.policy.parallel import check_layout

    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        check_layout(3, tp=2)
    assert check_layout(8, tp=2, pp=2) == 2


def test_mask_and_padding_helpers():
    from dapo_megatron.convert.arch import padded_vocab_size
    from dapo_megatron.policy.model import causal_attention_mask, mask_padded_vocab

    assert padded_vocab_size(200, 1) == padded_vocab_size(200, 8) == 256
    assert padded_vocab_size(151936, 2) == 151936
    logits = torch.zeros(1, 2, 256)
    masked = mask_padded_vocab(logits, 200)
    assert torch.isinf(masked[..., 200:]).all() and (masked[..., :200] == 0).all()
    seg = torch.tensor([[0, 0, 1, 1]])
    m = causal_attention_mask(None, 4, segment_ids=seg)[0, 0]
    # token 2 (segment 1) must not see tokens 0,1; token 1 sees 0
    assert m[2, 0] and m[2, 1] and not m[2, 2] and not m[1, 0] and m[0, 1]


def _compat_worker(rank, world, pretend_gpu):
    import threading

    import torch

    from dapo_megatron.policy import compat

    if pretend_gpu:
        original = torch.cuda.current_device
        torch.cuda.is_available = lambda: True
        return [compat.enable_cpu_execution(), torch.cuda.current_device is original]
    out = [compat.enable_cpu_execution(), compat.enable_cpu_execution()]
    out.append(torch.cuda.current_device() == 0)
    out.append(torch.zeros(2, device="cuda").device.type == "cpu")
    out.append(torch.ones(2).cuda().device.type == "cpu")

    seen = []

    def other_thread():
        compat.enable_cpu_execution()
        seen.append(torch.empty(1, device=torch.cuda.current_device()).device.type)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    out.append(seen == ["cpu"])
    from megatron.core.optimizer import clip_grads

    out.append(getattr(clip_grads.clip_grad_by_total_norm_fp32, "_dapo_cpu_wrapped", False))
    out.append(torch.zeros(1).type() == "torch.FloatTensor")  # only inside wrapped calls
    return out


@pytest.mark.dist
def test_cpu_execution_layer_is_idempotent_and_off_with_gpu():
    assert all(run_distributed(_compat_worker, 1, False)[0])
    assert run_distributed(_compat_worker, 1, True)[0] == [False, True]


def _packing_worker(rank, world, hf_dir):
    from transformers import AutoConfig

    from dapo_megatron.convert import load_hf_state_dict
    from dapo_megatron.policy.model import build_model, causal_attention_mask
    from dapo_megatron.policy.parallel import init_parallel
    from tests.convert.tiny import read_hf_dir

    init_parallel()
    chunks = build_model(AutoConfig.from_pretrained(hf_dir))
    load_hf_state_dict(chunks, read_hf_dir(hf_dir))
    model = chunks[0].eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 200, (1, 5), generator=g), torch.randint(0, 200, (1, 7), generator=g)
    seg = torch.tensor([[0] * 5 + [1] * 7])
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, :5], padded[1] = a[0], b[0]
    keep = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])
    with torch.no_grad():
        def run(ids, mask):
            return model(input_ids=ids, position_ids=None, attention_mask=mask)

        packed = run(torch.cat([a, b], 1), causal_attention_mask(None, 12, segment_ids=seg))
        alone_a = run(a, causal_attention_mask(None, 5))
        alone_b = run(b, causal_attention_mask(None, 7))
        pad = run(padded, causal_attention_mask(keep, 7))
    return [float((packed[0, :5] - alone_a[0]).abs().max()),
            float((packed[0, 5:] - alone_b[0]).abs().max()),
            float((pad[0, :5] - alone_a[0]).abs().max()),
            float((pad[1] - alone_b[0]).abs().max())]


@pytest.mark.dist
def test_packed_and_padded_rows_match_separate_sequences(hf_models):
    """Local attention + RoPE use positions 0..S-1 per row; RoPE is relative, so a
    block-diagonal causal mask makes packed rows equal separate ones."""
    diffs = run_distributed(_packing_worker, 1, hf_models["qwen3"][0])[0]
    assert max(diffs) < 1e-5, diffs
