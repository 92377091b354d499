"""A preallocated KV buffer of fixed slots, written in place.

Keys ``[layers, slots, kv_heads, head_dim, max_len]`` (stored transposed, the layout the
score product q @ k^T reads) and values ``[layers, slots, kv_heads, max_len, head_dim]``,
allocated once per generate call. A sequence owns one slot from its admission until it
finishes, and its token at position p lives in column p of that slot. Nothing is ever
concatenated or re-gathered per step (transformers' DynamicCache grows its tensors with
torch.cat at every step: transformers/cache_utils.py, DynamicLayer.update), so a decode
step costs one in-place write per layer.

The buffer starts zeroed: attention masks the columns at and past a slot's length, and a
masked column must still hold a finite number (0 * NaN would poison the weighted sum).
Its columns grow on demand (doubling, up to ``max_len``), so a call whose responses stop
early never holds the worst case of prompt + max_new_tokens for every slot.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """K/V of ``slots`` sequences of up to ``max_len`` tokens each.

    ``length[s]``: how many positions slot s holds (its next token goes to that column).
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, initial_len: int | None = None):
        self.max_len = max_len
        cols = min(max_len, initial_len or max_len)
        self.k = torch.zeros((layers, slots, kv_heads, head_dim, cols), dtype=dtype, device=device)
        self.v = torch.zeros((layers, slots, kv_heads, cols, head_dim), dtype=dtype, device=device)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)
        self._step: tuple | None = None

    @property
    def columns(self) -> int:
        return self.k.shape[-1]

    def _reserve(self, cols: int) -> None:
        """Make room for positions [0, cols)."""
        if cols <= self.columns:
            return
        if cols > self.max_len:
            raise ValueError(f"SlotKVCache: {cols} positions asked, max_len is {self.max_len}")
        new = min(self.max_len, max(cols, 2 * self.columns))
        k = self.k.new_zeros((*self.k.shape[:-1], new))
        v = self.v.new_zeros((*self.v.shape[:3], new, self.v.shape[-1]))
        k[..., : self.columns] = self.k
        v[:, :, :, : self.columns] = self.v
        self.k, self.v = k, v

    def fill(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Give ``slot`` a new sequence whose first positions have keys/values
        ``k, v [layers, kv_heads, positions, head_dim]`` (positions may be 0)."""
        n = k.shape[2]
        self._reserve(n)
        if n:
            self.k[:, slot, :, :, :n] = k.transpose(-1, -2)
            self.v[:, slot, :, :n] = v
        self.length[slot] = n

    def move(self, src: int, dst: int) -> None:
        """Slot ``dst`` takes over the sequence of slot ``src`` (src is then free)."""
        n = int(self.length[src])
        self.k[:, dst, :, :, :n] = self.k[:, src, :, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.length[dst] = n

    def begin_step(self, active: int, dtype: torch.dtype) -> torch.Tensor:
        """Start a decode step of slots [0, A), one new position each at its own column
        ``length``. Returns the additive mask ``[A, 1, 1, L]``, L = max length + 1: 0 on
        each slot's columns [0, length] (held positions and the one being written), -inf
        after."""
        cols = self.length[:active]
        span = int(cols.max()) + 1
        self._reserve(span)
        self._step = (torch.arange(active, device=cols.device), cols, span)
        valid = torch.arange(span, device=cols.device) <= cols[:, None]
        mask = torch.zeros(valid.shape, dtype=dtype, device=cols.device)
        return mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's position of each slot: ``k, v [A, kv_heads, 1, head_dim]``.
        Returns views: keys ``[A, kv_heads, head_dim, L]``, values ``[A, kv_heads, L, head_dim]``."""
        rows, cols, span = self._step
        a = rows.shape[0]
        self.k[layer, rows, :, :, cols] = k[:, :, 0]
        self.v[layer, rows, :, cols] = v[:, :, 0]
        return self.k[layer, :a, :, :, :span], self.v[layer, :a, :, :span]

    def end_step(self) -> None:
        rows, _, _ = self._step
        self.length[: rows.shape[0]] += 1
        self._step = None
