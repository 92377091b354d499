"""Rotary embeddings for the CPU execution layer: megatron-core 0.16.1's unfused RoPE, bit for bit,
without its per-call overheads.

What megatron/core/models/common/embeddings/rope_utils.py does on every call of
``apply_rotary_pos_emb`` (twice per layer: query and key), unfused:
- for packed rows (``cu_seqlens``, THD), ``_apply_rotary_pos_emb_thd`` slices the frequencies
  sequence by sequence in a Python loop and concatenates them;
- ``_apply_rotary_pos_emb_bshd`` takes cos and sin of the result, then computes
  ``t * cos + cat(-t2, t1) * sin`` and concatenates an empty pass-through tail onto it.
Every layer and both of q and k repeat the same frequency work on the same tensors, and the
two concatenations copy the activations twice more. Without them a training step of the
tiny default's shape takes 4-7% less time (one core, same process, alternated: 0.889 s
against 0.925 s best of six, 0.939 against 1.008 median).

Here, on CPU only (``compat.enable_cpu_execution``): the packed cos and sin are made once per
(frequencies, cu_seqlens) pair, which a forward passes unchanged to every layer, and the
rotation runs as one autograd function on the two halves, forward and backward. Every value
is the same as upstream's, to the bit: the same products, each sum of the same two terms
(``x + (-y)`` is ``x - y`` in IEEE arithmetic), and cos and sin computed by the same calls
(tests/policy/test_rope_cpu.py holds outputs and gradients to ``torch.equal`` against
upstream's function). Interleaved rotary, multi-latent attention, partial rotary, context
parallelism and fused RoPE go to upstream's function unchanged.
"""

from __future__ import annotations

import weakref

import torch

_CACHE: list = []  # newest first: (weakref(freqs), weakref(cu_seqlens) or None, mscale, dtype, cos, sin)
_CACHE_SIZE = 4  # a forward's query and key pairs, with room to spare


class _Rotate(torch.autograd.Function):
    """``t * cos + rotate_half(t) * sin`` with rotate_half(t) = cat(-t2, t1)."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        half = t.shape[-1] // 2
        out = t * cos
        out[..., :half] -= t[..., half:] * sin[..., :half]
        out[..., half:] += t[..., :half] * sin[..., half:]
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        scaled = grad * sin
        grad_t = grad * cos
        grad_t[..., :half] += scaled[..., half:]
        grad_t[..., half:] -= scaled[..., :half]
        return grad_t, None, None


def _cos_sin(freqs, cu_seqlens, mscale, dtype):
    """Upstream's packed frequencies and its cos and sin of them, made once per pair."""
    for f_ref, c_ref, m, d, cos, sin in _CACHE:
        # Identity, not equality: a weakly held tensor that is still alive is the same tensor.
        if f_ref() is freqs and (c_ref() if c_ref is not None else None) is cu_seqlens and m == mscale and d == dtype:
            return cos, sin
    if cu_seqlens is not None:
        # _apply_rotary_pos_emb_thd with one CP rank: each sequence's slice of the
        # frequencies, from its own offset when freqs covers every packed position.
        seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if freqs.dim() >= 1 and freqs.size(0) == cu_seqlens[-1]:
            starts = cu_seqlens[:-1].tolist()
            packed = torch.cat([freqs[s:s + n] for s, n in zip(starts, seqlens)], dim=0)
        else:
            packed = torch.cat([freqs[:n] for n in seqlens], dim=0)
    else:
        packed = freqs
    cos = (torch.cos(packed) * mscale).to(dtype)
    sin = (torch.sin(packed) * mscale).to(dtype)
    if cu_seqlens is not None:  # upstream rotates t.unsqueeze(1) and squeezes it back
        cos, sin = cos.squeeze(1), sin.squeeze(1)
    _CACHE.insert(0, (weakref.ref(freqs), weakref.ref(cu_seqlens) if cu_seqlens is not None else None,
                      mscale, dtype, cos, sin))
    del _CACHE[_CACHE_SIZE:]
    return cos, sin


def make_apply_rotary_pos_emb(upstream):
    """``apply_rotary_pos_emb`` with upstream's signature, falling back to ``upstream``."""

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        if (config.apply_rope_fusion or config.rotary_interleaved or config.multi_latent_attention
                or freqs.shape[-1] != t.shape[-1] or t.shape[-1] % 2 or freqs.requires_grad
                or (cp_group is not None and cp_group.size() > 1)):
            return upstream(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
        cos, sin = _cos_sin(freqs, cu_seqlens, mscale, t.dtype)
        return _Rotate.apply(t, cos, sin)

    apply_rotary_pos_emb._dapo_upstream = upstream
    return apply_rotary_pos_emb


def install() -> None:
    """Route megatron's attention (its only caller on this path) through the function above."""
    from megatron.core.transformer import attention

    if not hasattr(attention.apply_rotary_pos_emb, "_dapo_upstream"):
        attention.apply_rotary_pos_emb = make_apply_rotary_pos_emb(attention.apply_rotary_pos_emb)
