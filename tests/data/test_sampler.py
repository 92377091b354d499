"""PromptSampler: seeded epoch shuffles and exact resumption."""

from __future__ import annotations

import json

import pytest

from dapo_megatron.data.sampler import PromptSampler

ITEMS = [f"prompt-{i}" for i in range(13)]


def test_resume_continues_exactly(tmp_path):
    full = PromptSampler(ITEMS, seed=7)
    expected = [full.next_batch(5) for _ in range(8)]  # 40 draws: crosses three epochs
    first = PromptSampler(ITEMS, seed=7)
    drawn = [first.next_batch(5) for _ in range(3)]
    saved = tmp_path / "sampler.json"
    saved.write_text(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(ITEMS, seed=0)  # the saved seed wins
    resumed.load_state_dict(json.loads(saved.read_text()))
    drawn += [resumed.next_batch(5) for _ in range(5)]
    assert drawn == expected
    assert resumed.state_dict() == full.state_dict()
    assert resumed.consumed == 40 and resumed.epoch == 3


def test_every_item_once_per_epoch_and_epochs_differ():
    sampler = PromptSampler(ITEMS, seed=1)
    draws = sampler.next_indices(4) + sampler.next_indices(13 * 3 - 4)
    epochs = [draws[i * 13:(i + 1) * 13] for i in range(3)]
    assert all(sorted(e) == list(range(13)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert PromptSampler(ITEMS, seed=1).next_indices(39) == draws
    assert PromptSampler(ITEMS, seed=2).next_indices(13) != epochs[0]


def test_without_shuffle_order_is_sequential_and_wraps():
    sampler = PromptSampler(ITEMS, shuffle=False)
    assert sampler.next_indices(10) == list(range(10))
    assert sampler.next_indices(5) == [10, 11, 12, 0, 1]
    assert sampler.next_batch(1) == ["prompt-2"]


def test_refuses_a_state_for_another_dataset():
    state = PromptSampler(ITEMS).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        PromptSampler(ITEMS[:5]).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one"):
        PromptSampler([])
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(ITEMS).next_batch(0)
