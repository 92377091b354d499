"""A resumable, seeded, epoch-shuffling stream of prompt batches.

The order of epoch e is a permutation drawn from a generator seeded with (seed, e), so a
position (epoch, cursor) fixes everything that follows: `state_dict` saves just that, and
a resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Any, Generic, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """Draws batches from ``items`` in a fresh shuffled order each epoch.

    A batch that runs past the end of an epoch continues into the next one, so every
    item is drawn once per epoch and no item is skipped (dynamic sampling asks for as
    many prompts as it needs, not for whole epochs).
    """

    def __init__(self, items: Sequence[T], *, seed: int = 0, shuffle: bool = True):
        if len(items) == 0:
            raise ValueError("PromptSampler needs at least one item (the dataset is empty)")
        self.items = items
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.cursor = 0  # position inside the current epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    @property
    def consumed(self) -> int:
        """Items drawn since the start of epoch 0."""
        return self.epoch * len(self.items) + self.cursor

    def next_indices(self, batch_size: int) -> list[int]:
        """Indices into ``items`` of the next ``batch_size`` draws."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            if self.cursor == len(self.items):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            take = min(batch_size - len(out), len(self.items) - self.cursor)
            out.extend(int(i) for i in self._order[self.cursor : self.cursor + take])
            self.cursor += take
        return out

    def next_batch(self, batch_size: int) -> list[T]:
        """The next ``batch_size`` items."""
        return [self.items[i] for i in self.next_indices(batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "num_items": len(self.items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state saved for another dataset size."""
        if state["num_items"] != len(self.items):
            raise ValueError(
                f"sampler state 'num_items' is {state['num_items']} but the dataset has "
                f"{len(self.items)} prompts: resume with the same data file and filters"
            )
        if not 0 <= state["cursor"] <= len(self.items) or state["epoch"] < 0:
            raise ValueError(f"sampler state out of range: epoch {state['epoch']}, cursor {state['cursor']}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
