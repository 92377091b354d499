"""Dynamic-sampling filter and batch assembler: property tests against a plain-list model."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.algo import BatchAssembler, Group, keep_mask, stack_group_rewards

SAMPLING_LOGGER = "dapo_megatron.algo.sampling"


@contextmanager
def captured_warnings():
    """Collect the sampling module's log records (hypothesis forbids the caplog fixture)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger(SAMPLING_LOGGER)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=12))
def test_keep_mask_on_correctness(rows):
    keep = keep_mask(torch.tensor(rows))
    assert keep.tolist() == [0 < sum(row) < len(row) for row in rows]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from([-1.0, 1.0, 0.5, -1.25]), min_size=3, max_size=3),
                min_size=1, max_size=12))
def test_keep_mask_on_rewards(rows):
    keep = keep_mask(torch.tensor(rows))
    assert keep.tolist() == [len(set(row)) > 1 for row in rows]


def test_keep_mask_rejects_nan_and_bad_shape():
    with pytest.raises(ValueError, match="NaN"):
        keep_mask(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="correct_or_rewards"):
        keep_mask(torch.ones(4))


# A round is a list of groups; each group's rewards come from a tiny alphabet so that
# all-equal groups are common. A group may also carry correctness.
group_values = st.lists(st.sampled_from([-1.0, 1.0]), min_size=4, max_size=4)
rounds_strategy = st.lists(st.lists(group_values, min_size=0, max_size=6), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    rounds=rounds_strategy,
    train_batch_size=st.integers(1, 8),
    max_gen_batches=st.one_of(st.none(), st.integers(1, 4)),
    surplus=st.sampled_from(["drop", "carry"]),
    use_correctness=st.booleans(),
)
def test_assembler_properties(rounds, train_batch_size, max_gen_batches, surplus, use_correctness):
    assembler = BatchAssembler(train_batch_size, max_gen_batches, surplus)
    model_buffer: list[int] = []  # ids of kept groups waiting, oldest first
    next_id = 0
    pending = list(rounds)
    with captured_warnings() as warnings:
        while pending:
            step_generated = 0
            step_carried_in = len(model_buffer)
            # The controller's loop: generate rounds until the assembler is done.
            while not assembler.done and pending:
                round_values = pending.pop(0)
                groups = []
                for values in round_values:
                    rewards = torch.tensor(values)
                    correct = rewards > 0 if use_correctness else None
                    groups.append(Group(payload=next_id, rewards=rewards, correct=correct))
                    if len(set(values)) > 1:
                        model_buffer.append(next_id)
                    next_id += 1
                step_generated += len(groups)
                assembler.add_round(groups)
            if not assembler.done:
                break  # ran out of generated rounds mid-step: nothing to take
            warnings.clear()
            batch = assembler.take()
            stats = batch.stats

            # Never a group without signal.
            for group in batch.groups:
                assert len(set(group.rewards.tolist())) > 1
            # Exactly train_batch_size when enough were kept, else the limit stopped it.
            expected_size = min(train_batch_size, len(model_buffer))
            assert len(batch.groups) == expected_size
            assert [g.payload for g in batch.groups] == model_buffer[:expected_size]
            if len(model_buffer) >= train_batch_size:
                assert not stats.partial and not warnings
            else:
                assert stats.partial and stats.rounds == max_gen_batches
                assert len(warnings) == 1
                message = warnings[0].getMessage()
                assert "max_gen_batches" in message
                assert f"{len(batch.groups)} of {train_batch_size} groups" in message
            # The round limit is honoured.
            if max_gen_batches is not None:
                assert stats.rounds <= max_gen_batches
            # Counts add up.
            assert stats.generated == step_generated == stats.kept + stats.dropped
            assert stats.carried_in == step_carried_in
            assert stats.carried_in + stats.kept == (
                stats.returned + stats.carried_out + stats.surplus_dropped)
            assert stats.returned == len(batch.groups)
            model_buffer = model_buffer[expected_size:]
            if surplus == "drop":
                assert stats.carried_out == 0 and stats.surplus_dropped == len(model_buffer)
                model_buffer = []
            else:
                assert stats.surplus_dropped == 0 and stats.carried_out == len(model_buffer)
            assert assembler.num_buffered == len(model_buffer)


def make_groups(values_list, start=0):
    return [Group(payload=start + i, rewards=values) for i, values in enumerate(values_list)]


MIXED, ALL_RIGHT, ALL_WRONG = [1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]


def test_round_limit_warns_and_refuses_more_rounds(caplog):
    assembler = BatchAssembler(train_batch_size=3, max_gen_batches=2)
    assembler.add_round(make_groups([MIXED, ALL_RIGHT]))
    assert not assembler.done
    with pytest.raises(RuntimeError, match="not ready"):
        assembler.take()
    assembler.add_round(make_groups([ALL_WRONG, ALL_WRONG]))
    assert assembler.done and not assembler.is_full
    with pytest.raises(RuntimeError, match="max_gen_batches=2"):
        assembler.add_round(make_groups([MIXED]))
    with caplog.at_level(logging.WARNING, logger=SAMPLING_LOGGER):
        batch = assembler.take()
    assert [g.payload for g in batch.groups] == [0]
    assert batch.stats.partial
    assert "max_gen_batches=2" in caplog.text and "1 of 3 groups" in caplog.text
    assert "generated 4, kept 1, dropped 3" in caplog.text
    # The next step starts afresh with a new round budget.
    assert assembler.stats.rounds == 0 and not assembler.done


def test_carry_keeps_surplus_for_next_step_and_drop_discards_it():
    for surplus, expected_next in (("carry", [2, 3, 4]), ("drop", [5, 6, 7])):
        assembler = BatchAssembler(train_batch_size=3, surplus=surplus)
        assembler.add_round(make_groups([MIXED] * 5))
        first = assembler.take()
        assert [g.payload for g in first.groups] == [0, 1, 2]
        assert (first.stats.carried_out, first.stats.surplus_dropped) == (
            (2, 0) if surplus == "carry" else (0, 2))
        if surplus == "drop":
            assert not assembler.done
        assembler.add_round(make_groups([MIXED] * 3, start=5))
        second = assembler.take()
        assert [g.payload for g in second.groups] == (
            [3, 4, 5] if surplus == "carry" else expected_next)
        assert second.stats.carried_in == (2 if surplus == "carry" else 0)


def test_no_filter_ablation_keeps_every_group():
    assembler = BatchAssembler(train_batch_size=4, filter_groups=False)
    assembler.add_round(make_groups([ALL_RIGHT, ALL_WRONG, MIXED, ALL_RIGHT]))
    batch = assembler.take()
    assert [g.payload for g in batch.groups] == [0, 1, 2, 3]
    assert batch.stats.dropped == 0
    assert batch.stats.as_metrics()["dynamic_sampling/kept"] == 4.0


def test_correctness_overrides_rewards_in_the_filter():
    # All correct but different lengths: shaped rewards differ, the paper's filter drops it.
    shaped = Group(payload=None, rewards=[1.0, 0.75], correct=[True, True])
    assert not shaped.has_signal
    assert Group(payload=None, rewards=[1.0, 0.75]).has_signal


def test_stack_group_rewards_and_errors():
    groups = make_groups([MIXED, ALL_RIGHT])
    assert stack_group_rewards(groups).tolist() == [MIXED, ALL_RIGHT]
    with pytest.raises(ValueError, match="sizes"):
        stack_group_rewards(groups + [Group(payload=None, rewards=[1.0, 1.0, -1.0])])
    with pytest.raises(ValueError, match="Group.correct"):
        Group(payload=None, rewards=[1.0, -1.0], correct=[True])
    for kwargs, field in ((dict(train_batch_size=0), "train_batch_size"),
                          (dict(train_batch_size=1, max_gen_batches=0), "max_gen_batches"),
                          (dict(train_batch_size=1, surplus="keep"), "surplus")):
        with pytest.raises(ValueError, match=field):
            BatchAssembler(**kwargs)


def test_adaptive_round_sizes_by_hand():
    # train batch 10, cap 20 prompts per round, at most 4 rounds; decay 0.7, headroom 1.1.
    assembler = BatchAssembler(train_batch_size=10, max_gen_batches=4, adaptive=True)
    assert assembler.round_size(20) == 20  # nothing seen yet: the configured size
    assembler.add_round(make_groups([MIXED] * 8 + [ALL_RIGHT] * 12))  # 8 of 20 kept
    # 2 needed at a rate of 8/20: 2 * 20/8 * 1.1 = 5.5 -> 6.
    assert assembler.round_size(20) == 6
    assembler.add_round(make_groups([MIXED] + [ALL_WRONG] * 5, start=20))  # 1 of 6
    # Kept 0.7 * 8 + 1 = 6.6 of 0.7 * 20 + 6 = 20: 1 needed -> 1 * 20/6.6 * 1.1 = 3.33 -> 4.
    assert assembler.round_size(20) == 4
    assert assembler.round_size(3) == 3  # never above the configured size
    assembler.add_round(make_groups([ALL_WRONG] * 4, start=26))  # 0 of 4
    assert assembler.round_size(20) == 20  # the 4th round is the last allowed: all of it
    assembler.add_round(make_groups([MIXED] * 3, start=30))
    batch = assembler.take()
    assert len(batch.groups) == 10 and batch.stats.rounds == 4
    # The rate carries into the next batch: kept 0.7 * (0.7 * 6.6 + 0) + 3 = 6.234 of
    # 0.7 * (0.7 * 20 + 4) + 3 = 15.6; 10 needed -> 10 * 15.6 / 6.234 * 1.1 = 27.5 -> capped.
    assert assembler.round_size(40) == 28 and assembler.round_size(20) == 20


def test_adaptive_rounds_restore_from_a_checkpoint_and_without_the_filter():
    live = BatchAssembler(train_batch_size=4, max_gen_batches=3, adaptive=True)
    live.add_round(make_groups([MIXED, ALL_RIGHT] * 4))
    live.take()
    resumed = BatchAssembler(train_batch_size=4, max_gen_batches=3, adaptive=True)
    resumed.restore_keep_history(live.keep_history())
    assert resumed.round_size(16) == live.round_size(16) == 9  # 4 * 8/4 * 1.1 = 8.8
    with pytest.raises(ValueError, match="kept <= examined"):
        resumed.restore_keep_history([3.0, 2.0])
    # Fixed rounds ignore the rate; without the filter every group counts, so exactly the need.
    fixed = BatchAssembler(train_batch_size=4, adaptive=False)
    fixed.add_round(make_groups([MIXED, ALL_RIGHT]))
    assert fixed.round_size(16) == 16
    unfiltered = BatchAssembler(train_batch_size=4, filter_groups=False, adaptive=True)
    assert unfiltered.round_size(16) == 4
    unfiltered.add_round(make_groups([ALL_RIGHT]))
    assert unfiltered.round_size(16) == 3
