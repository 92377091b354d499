"""SlotKVCache against per-slot Python lists of the positions written by hand."""

import torch

from dapo_megatron.rollout.kv_cache import SlotKVCache


def _held(cache, layer, slot):
    """The keys and values slot holds, position by position, as lists [D] each."""
    n = int(cache.length[slot])
    keys = cache.k[layer, slot, 0].t()[:n].tolist()  # stored [D, columns]
    values = cache.v[layer, slot, 0, :n].tolist()
    return keys, values


def test_fill_step_move_and_growth_keep_every_position():
    cache = SlotKVCache(layers=1, slots=2, kv_heads=1, max_len=9, head_dim=2, dtype=torch.float32,
                        device=torch.device("cpu"), initial_len=2)
    ref = {0: ([[1, 2], [3, 4], [5, 6]], [[-1, -2], [-3, -4], [-5, -6]]), 1: ([[7, 8]], [[-7, -8]])}
    for s, (ks, vs) in ref.items():
        # fill takes [layers, kv_heads, positions, D]; slot 0's 3 positions outgrow 2 columns.
        cache.fill(s, torch.tensor(ks, dtype=torch.float32)[None, None],
                   torch.tensor(vs, dtype=torch.float32)[None, None])
    assert cache.columns == 4 and cache.length.tolist() == [3, 1]
    for step, new in enumerate([([[9, 9], [8, 8]]), ([[0, 1], [1, 0]])]):
        mask = cache.begin_step(2, torch.float32)
        span = max(len(ref[0][0]), len(ref[1][0])) + 1
        assert mask.shape == (2, 1, 1, span)
        for s in (0, 1):  # 0 up to and including the column being written, -inf after
            allowed = len(ref[s][0]) + 1
            assert mask[s, 0, 0].tolist() == [0.0] * allowed + [float("-inf")] * (span - allowed)
        k = torch.tensor(new, dtype=torch.float32)[:, None, None]  # [A, kv_heads, 1, D]
        keys, values = cache.append(0, k, -k)
        cache.end_step()
        for s in (0, 1):
            ref[s][0].append(new[s])
            ref[s][1].append([-x for x in new[s]])
            # The views returned cover [0, span) and hold the new position at its column.
            assert keys[s, 0].t()[len(ref[s][0]) - 1].tolist() == new[s]
    assert cache.columns == 8  # slot 0 reached 5 positions: doubled from 4
    for s in (0, 1):
        assert _held(cache, 0, s) == ref[s]
    cache.move(0, 1)
    assert _held(cache, 0, 1) == ref[0] and cache.length.tolist() == [5, 5]
