"""Dynamic sampling (DAPO Sec. 3.2): keep only groups that carry a learning signal.

A group whose G responses are all correct (or all wrong) has equal rewards, hence zero
advantage and zero gradient: it only dilutes the batch. DAPO drops such groups and keeps
generating until the train batch holds ``train_batch_size`` groups with
0 < #correct < G, bounded by ``max_gen_batches`` generation rounds.

``keep_mask`` is the filter on a whole [num_groups, G] tensor; ``BatchAssembler``
accumulates the kept groups of successive rounds into train batches. The controller's
loop is::

    assembler = BatchAssembler(train_batch_size=512, max_gen_batches=10, surplus="drop")
    while not assembler.done:
        assembler.add_round(generate_and_score_groups())
    batch = assembler.take()      # batch.groups, batch.stats
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

SURPLUS_MODES = ("drop", "carry")
# Adaptive rounds (BatchAssembler.round_size): each past round's counts weigh KEEP_DECAY more
# than the round before it, and a round draws ROUND_HEADROOM times the estimate, since a
# round that comes up short costs another round (on a GPU, another whole generation's latency).
KEEP_DECAY = 0.7
ROUND_HEADROOM = 1.1


def keep_mask(correct_or_rewards: torch.Tensor) -> torch.Tensor:
    """Which groups to keep: those whose G values are not all equal.

    Args:
        correct_or_rewards: [num_groups, G], either bool correctness (keep when
            0 < #correct < G, the paper's criterion) or scalar rewards (keep when not all
            equal; for 0/1 or +-1 rewards that is the same criterion, and with other
            reward terms it is exactly "the group has a nonzero advantage").

    Returns:
        [num_groups] bool.

    Raises:
        ValueError: not 2-D, or NaN rewards (which compare unequal and would be kept).
    """
    values = correct_or_rewards
    if values.dim() != 2:
        raise ValueError(
            f"correct_or_rewards must be [num_groups, G], got shape {tuple(values.shape)}"
        )
    if values.is_floating_point() and torch.isnan(values).any():
        bad = torch.isnan(values).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"rewards contain NaN in groups {bad[:10]}")
    # For bool, "all equal" is #correct == 0 or #correct == G.
    return ~(values == values[:, :1]).all(dim=-1)


@dataclass
class Group:
    """The G responses to one prompt: an opaque payload and what the filter reads.

    Attributes:
        payload: anything the caller needs later (token ids, log-probs, the prompt); the
            algo code never looks inside.
        rewards: [G] scalar rewards (a sequence of numbers is converted to a tensor).
        correct: optional [G] bool correctness; when given, the filter uses it
            (0 < #correct < G) instead of the rewards.
    """

    payload: Any
    rewards: torch.Tensor
    correct: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, torch.Tensor):
            self.rewards = torch.as_tensor(self.rewards, dtype=torch.float32)
        if self.rewards.dim() != 1:
            raise ValueError(f"Group.rewards must be [G], got shape {tuple(self.rewards.shape)}")
        if self.correct is not None:
            if not isinstance(self.correct, torch.Tensor):
                self.correct = torch.as_tensor(self.correct, dtype=torch.bool)
            if self.correct.shape != self.rewards.shape:
                raise ValueError(
                    f"Group.correct has shape {tuple(self.correct.shape)} but Group.rewards "
                    f"has shape {tuple(self.rewards.shape)}"
                )

    @property
    def has_signal(self) -> bool:
        """True if the group passes the dynamic-sampling filter."""
        values = self.correct.bool() if self.correct is not None else self.rewards
        return bool(keep_mask(values[None])[0])


@dataclass
class SamplingStats:
    """What dynamic sampling did for one train batch; counts are groups.

    Invariants: generated == kept + dropped, and
    carried_in + kept == returned + carried_out + surplus_dropped.
    """

    rounds: int = 0            # generation rounds this step
    generated: int = 0         # groups generated this step
    kept: int = 0              # groups that passed the filter
    dropped: int = 0           # groups filtered out (all rewards equal)
    carried_in: int = 0        # kept groups carried over from the previous step
    returned: int = 0          # groups in the train batch
    carried_out: int = 0       # surplus kept groups carried to the next step
    surplus_dropped: int = 0   # surplus kept groups discarded (surplus="drop")
    partial: bool = False      # the round limit stopped sampling before the batch was full

    def as_metrics(self, prefix: str = "dynamic_sampling/") -> dict[str, float]:
        """Flat {name: float} for the metrics logger."""
        return {prefix + name: float(value) for name, value in asdict(self).items()}


@dataclass
class AssembledBatch:
    """A train batch of kept groups (oldest first) and how it was assembled."""

    groups: list[Group]
    stats: SamplingStats


class BatchAssembler:
    """Accumulates kept groups across generation rounds into train batches.

    Args:
        train_batch_size: groups per train batch (prompts per step; 512 in the paper).
        max_gen_batches: most generation rounds per train batch; None = unbounded. When
            the limit is hit first, ``take()`` warns and returns the short batch.
        surplus: what happens to kept groups beyond ``train_batch_size``: "drop" them, or
            "carry" them into the next batch (they were sampled by the policy of this
            step, so they are one step off-policy when trained on).
        filter_groups: False disables the filter (the "no dynamic sampling" ablation):
            every generated group is kept.
        adaptive: size each generation round from the keep rate of past rounds
            (``round_size``) instead of drawing the configured round size every time.
    """

    def __init__(
        self,
        train_batch_size: int,
        max_gen_batches: int | None = None,
        surplus: str = "drop",
        *,
        filter_groups: bool = True,
        adaptive: bool = False,
    ) -> None:
        if train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {train_batch_size}")
        if max_gen_batches is not None and max_gen_batches < 1:
            raise ValueError(f"max_gen_batches must be >= 1 or None, got {max_gen_batches}")
        if surplus not in SURPLUS_MODES:
            raise ValueError(f"surplus={surplus!r} is not one of {SURPLUS_MODES}")
        self.train_batch_size = train_batch_size
        self.max_gen_batches = max_gen_batches
        self.surplus = surplus
        self.filter_groups = filter_groups
        self.adaptive = adaptive
        self._buffer: list[Group] = []
        self._stats = SamplingStats()
        # Kept and examined groups of every round so far, each round's weight KEEP_DECAY**age
        # (its age in rounds); the run's keep rate is their ratio. Carried across batches.
        self._seen = [0.0, 0.0]

    @property
    def num_buffered(self) -> int:
        """Kept groups waiting for the next ``take()``."""
        return len(self._buffer)

    @property
    def groups_needed(self) -> int:
        """How many more kept groups would fill the batch (0 when full)."""
        return max(0, self.train_batch_size - len(self._buffer))

    @property
    def is_full(self) -> bool:
        return len(self._buffer) >= self.train_batch_size

    @property
    def round_limit_reached(self) -> bool:
        return self.max_gen_batches is not None and self._stats.rounds >= self.max_gen_batches

    @property
    def done(self) -> bool:
        """True when ``take()`` can be called: the batch is full or no round is left."""
        return self.is_full or self.round_limit_reached

    def round_size(self, cap: int) -> int:
        """Prompts the next generation round should hold (carried partial groups included).

        Fixed rounds (DAPO's recipe): ``cap``, the configured round size, every time. Adaptive:
        the groups still needed divided by the keep rate of past rounds (decayed kept /
        examined counts), times ROUND_HEADROOM, rounded up, between 1 and ``cap``. Without the
        filter every group is kept, so exactly the groups needed. ``cap`` where there is no
        rate to go by (the run's first round, or nothing kept yet) and for the last round
        ``max_gen_batches`` allows, which is the batch's last chance to fill.
        """
        needed = self.groups_needed
        if not self.adaptive or needed == 0:
            return cap
        if not self.filter_groups:
            return max(1, min(cap, needed))
        kept, examined = self._seen
        last = self.max_gen_batches is not None and self._stats.rounds + 1 >= self.max_gen_batches
        if kept <= 0 or last:
            return cap
        # A hair below the exact ceiling, so that float noise in an integral estimate does not
        # draw one prompt more.
        return max(1, min(cap, math.ceil(needed * examined / kept * ROUND_HEADROOM - 1e-9)))

    def keep_history(self) -> list[float]:
        """The decayed (kept, examined) counts ``round_size`` estimates from, for a checkpoint."""
        return list(self._seen)

    def restore_keep_history(self, values: Sequence[float]) -> None:
        """Put checkpointed ``keep_history()`` back, so a resumed run sizes rounds as before."""
        kept, examined = (float(v) for v in values)
        if not 0 <= kept <= examined:
            raise ValueError(f"keep history {list(values)}: need 0 <= kept <= examined")
        self._seen = [kept, examined]

    @property
    def stats(self) -> SamplingStats:
        """Counts of the batch being assembled (a copy)."""
        return SamplingStats(**asdict(self._stats))

    def add_round(self, groups: Iterable[Group]) -> int:
        """Filter one generation round and keep the groups with signal.

        Args:
            groups: the round's groups, in generation order.

        Returns:
            How many of them were kept.

        Raises:
            RuntimeError: the round limit is already reached (call ``take()`` first).
        """
        if self.round_limit_reached:
            raise RuntimeError(
                f"dynamic sampling: max_gen_batches={self.max_gen_batches} rounds already "
                "generated for this batch; call take() before adding another round"
            )
        groups = list(groups)
        kept = [g for g in groups if g.has_signal] if self.filter_groups else groups
        self._buffer.extend(kept)
        self._stats.rounds += 1
        self._stats.generated += len(groups)
        self._stats.kept += len(kept)
        self._stats.dropped += len(groups) - len(kept)
        if groups:
            self._seen = [KEEP_DECAY * self._seen[0] + len(kept), KEEP_DECAY * self._seen[1] + len(groups)]
        return len(kept)

    def carried_groups(self) -> list[Group]:
        """Kept groups waiting for the next batch (surplus="carry"), for a checkpoint."""
        return list(self._buffer)

    def restore_carried(self, groups: Sequence[Group]) -> None:
        """Put checkpointed carried groups back before the first round of a resumed run."""
        if self._stats.rounds or self._buffer:
            raise RuntimeError("restore_carried must be called on a fresh assembler")
        self._buffer = list(groups)
        self._stats = SamplingStats(carried_in=len(self._buffer))

    def take(self) -> AssembledBatch:
        """Return the train batch and start the next one.

        Exactly ``train_batch_size`` groups (oldest first) when that many were kept;
        otherwise, once the round limit is reached, all kept groups (possibly none) with a
        warning and ``stats.partial`` set. Surplus is carried or dropped per ``surplus``.

        Raises:
            RuntimeError: the batch is neither full nor out of rounds.
        """
        stats = self._stats
        if self.is_full:
            groups = self._buffer[: self.train_batch_size]
            rest = self._buffer[self.train_batch_size:]
        elif self.round_limit_reached:
            groups, rest = self._buffer, []
            stats.partial = True
            logger.warning(
                "dynamic sampling stopped at max_gen_batches=%d rounds with %d of %d groups "
                "(generated %d, kept %d, dropped %d with all-equal rewards, %d carried in); "
                "%s. Raise max_gen_batches or the generation batch size, or check that the "
                "data is neither too easy nor too hard for the model.",
                self.max_gen_batches, len(groups), self.train_batch_size, stats.generated,
                stats.kept, stats.dropped, stats.carried_in,
                f"this step trains on the {len(groups)} groups it has" if groups
                else "this step has no group to train on",
            )
        else:
            raise RuntimeError(
                f"dynamic sampling: batch not ready ({len(self._buffer)} of "
                f"{self.train_batch_size} groups after {stats.rounds} rounds); "
                "add rounds until `done`"
            )
        stats.returned = len(groups)
        if self.surplus == "carry":
            stats.carried_out = len(rest)
            self._buffer = list(rest)
        else:
            stats.surplus_dropped = len(rest)
            self._buffer = []
        self._stats = SamplingStats(carried_in=len(self._buffer))
        return AssembledBatch(groups=list(groups), stats=stats)


def stack_group_rewards(groups: Sequence[Group]) -> torch.Tensor:
    """[num_groups, G] rewards of ``groups`` (all of the same size G), for group_advantages."""
    if not groups:
        return torch.zeros(0, 0)
    sizes = {g.rewards.shape[0] for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups have different sizes G: {sorted(sizes)}")
    return torch.stack([g.rewards for g in groups])
