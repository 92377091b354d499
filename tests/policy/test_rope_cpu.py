"""The CPU layer's RoPE (policy/rope_cpu.py) against megatron-core's own unfused function:
outputs and gradients equal to the bit, for packed (THD, both frequency layouts) and padded
(BSHD) rows, and upstream's function wherever the fast path does not apply."""

from __future__ import annotations

import types

import pytest
import torch

torch.set_num_threads(1)


def _config(**overrides):
    base = dict(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    return types.SimpleNamespace(**{**base, **overrides})


class _OneRank:
    def size(self):
        return 1

    def rank(self):
        return 0


def _freqs(positions: int, dim: int) -> torch.Tensor:
    # megatron's RotaryEmbedding layout: [positions, 1, 1, dim], the halves repeated.
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def _both(t, freqs, config, **kw):
    """(ours, upstream's): output and gradient of a fixed random projection of it."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb as upstream

    from dapo_megatron.policy.rope_cpu import make_apply_rotary_pos_emb

    ours = make_apply_rotary_pos_emb(upstream)
    results = []
    for fn in (ours, upstream):
        x = t.detach().clone().requires_grad_(True)
        out = fn(x, freqs, config, cp_group=_OneRank(), **kw)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        (out * weight).sum().backward()
        results.append((out.detach(), x.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["thd_max_positions", "thd_every_position", "bshd"])
def test_rope_equals_upstream_to_the_bit(layout, dtype):
    g = torch.Generator().manual_seed(1)
    heads, dim = 3, 16
    lengths = [5, 1, 9, 4]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    if layout == "bshd":
        t = torch.randn(9, 2, heads, dim, generator=g, dtype=dtype)
        kw, freqs = {}, _freqs(9, dim)
    else:
        t = torch.randn(sum(lengths), heads, dim, generator=g, dtype=dtype)
        # "every position": freqs covers the whole packed row (offset per sequence);
        # "max positions": the longest sequence's positions, each sequence from 0.
        freqs = _freqs(sum(lengths), dim) if layout == "thd_every_position" else _freqs(max(lengths) + 3, dim)
        if layout == "thd_every_position":
            freqs = freqs * 0.5 + torch.randn(freqs.shape, generator=g)  # positions that differ per offset
        kw = {"cu_seqlens": cu}
    (out, grad), (ref_out, ref_grad) = _both(t, freqs, _config(), mscale=1.0, **kw)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert torch.equal(out, ref_out)
    assert torch.equal(grad, ref_grad)


def test_cached_frequencies_follow_the_tensors_not_their_addresses():
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb as upstream

    from dapo_megatron.policy.rope_cpu import make_apply_rotary_pos_emb

    ours = make_apply_rotary_pos_emb(upstream)
    t = torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(2))
    for lengths in ([2, 4], [4, 2], [2, 4], [6]):  # new cu_seqlens every call, some equal in value
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        freqs = _freqs(6, 8)
        got = ours(t, freqs, _config(), cu_seqlens=cu, cp_group=_OneRank())
        assert torch.equal(got, upstream(t, freqs, _config(), cu_seqlens=cu, cp_group=_OneRank()))


@pytest.mark.parametrize("change", [dict(rotary_interleaved=True), dict(partial=True)])
def test_other_variants_go_to_upstream(change):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb as upstream

    from dapo_megatron.policy import rope_cpu

    calls = []

    def recording(*args, **kwargs):
        calls.append(1)
        return upstream(*args, **kwargs)

    ours = rope_cpu.make_apply_rotary_pos_emb(recording)
    t = torch.randn(5, 2, 2, 8, generator=torch.Generator().manual_seed(3))
    partial = change.get("partial", False)
    freqs = _freqs(5, 4 if partial else 8)  # partial rotary: fewer frequency dims than head dims
    ours(t, freqs, _config(**{k: v for k, v in change.items() if k != "partial"}), cp_group=_OneRank())
    assert calls == [1]


def test_cpu_layer_routes_megatron_attention_through_it():
    from dapo_megatron.policy.compat import enable_cpu_execution

    enable_cpu_execution()
    from megatron.core.transformer import attention

    assert hasattr(attention.apply_rotary_pos_emb, "_dapo_upstream")
