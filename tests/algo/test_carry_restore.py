"""Carried surplus groups survive a checkpoint: a restored assembler continues exactly."""

import pickle

import pytest
import torch

from dapo_megatron.algo import BatchAssembler, Group


def _round(start, n):
    # Alternate flat (dropped) and mixed (kept) groups; the payload names the group.
    return [Group(payload=start + i, rewards=torch.tensor([1.0, -1.0] if i % 2 else [1.0, 1.0]))
            for i in range(n)]


def test_restored_assembler_continues_like_the_original():
    live = BatchAssembler(3, None, "carry")
    live.add_round(_round(0, 10))  # keeps 5: batch of 3, 2 carried
    assert [g.payload for g in live.take().groups] == [1, 3, 5]
    saved = pickle.loads(pickle.dumps(live.carried_groups()))
    resumed = BatchAssembler(3, None, "carry")
    resumed.restore_carried(saved)
    for a in (live, resumed):
        a.add_round(_round(10, 4))
    one, two = live.take(), resumed.take()
    assert [g.payload for g in one.groups] == [g.payload for g in two.groups] == [7, 9, 11]
    assert one.stats == two.stats and one.stats.carried_in == 2


def test_restore_refuses_a_used_assembler():
    a = BatchAssembler(3, None, "carry")
    a.add_round(_round(0, 2))
    with pytest.raises(RuntimeError, match="fresh assembler"):
        a.restore_carried([])
