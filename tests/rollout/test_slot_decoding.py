"""Slot decoding (rollout/slot_decoder.py, rollout/kv_cache.py) against the engine's
HF-forward path (transformers' own attention and DynamicCache, one chunk at a time).

The same engine, weights and seeds run both ways: every response must come back with the
same tokens and finish reason (each sequence draws from its own stream, so its slot,
neighbours and refill order must not matter), log-probs within 1e-5 absolute or relative,
whichever is larger (the two paths differ only in fp32 reassociation: attention kernel,
prefill split, and the matmul kernel MKL picks for each batch shape; on an AMD EPYC with
AVX2 a log-prob of -4.29 after 64 tokens came out 1.1e-5 apart), and the same routed
experts. Independent float64 checks of the log-probs themselves are in test_embedded.py
(test_kv_cache_logprobs_equal_full_recompute runs the slot path).
"""

import pytest
import torch

from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.protocol import Resume, SamplingParams
from tests.rollout.reference import tiny_config

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 8, 9, 10], [11], [3, 3, 3, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
STOPS = list(range(0, 96, 7))  # ~14% of the vocabulary: rows finish at scattered steps


def _engine(model_type="llama", **kw):
    torch.manual_seed(0)
    return EmbeddedEngine(tiny_config(model_type, init_range=0.3), **kw)


def _both(engine, *args, **kwargs):
    assert engine.slot_decoding
    slots = engine.generate(*args, **kwargs)
    engine.slot_decoding = False
    try:
        hf = engine.generate(*args, **kwargs)
    finally:
        engine.slot_decoding = True
    return slots, hf


def _assert_same(slots, hf):
    assert [len(g) for g in slots] == [len(g) for g in hf]
    for gs, gh in zip(slots, hf):
        for a, b in zip(gs, gh):
            assert (a.request_id, a.sample_index, a.prompt_index) == (b.request_id, b.sample_index,
                                                                      b.prompt_index)
            assert a.token_ids == b.token_ids
            assert a.finish_reason == b.finish_reason
            assert a.logprobs == pytest.approx(b.logprobs, rel=1e-5, abs=1e-5)
            if b.raw_logprobs is not None:
                assert a.raw_logprobs == pytest.approx(b.raw_logprobs, rel=1e-5, abs=1e-5)
            if b.routed_experts is not None:
                assert torch.equal(torch.as_tensor(a.routed_experts), torch.as_tensor(b.routed_experts))
            else:
                assert a.routed_experts is None


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_refilled_slots_give_the_hf_path_responses(model_type):
    # 5 prompts x 3 samples through 4 slots: finished rows are refilled mid-decode.
    engine = _engine(model_type, max_batch_size=4)
    params = SamplingParams(n=3, temperature=0.8, top_k=40, top_p=0.95, max_new_tokens=14,
                            stop_token_ids=STOPS, seed=3, return_raw_logprobs=True,
                            return_routed_experts=True)
    slots, hf = _both(engine, PROMPTS, params)
    _assert_same(slots, hf)
    lengths = {len(s.token_ids) for g in slots for s in g}
    assert len(lengths) > 2 and 14 in lengths, "rows must finish at different steps"
    if model_type == "qwen3_moe":  # positions [0, prompt + response - 1), every layer routed
        s = slots[1][0]
        assert torch.as_tensor(s.routed_experts).shape[:2] == (7 + len(s.token_ids) - 1, 2)


def test_batch_stays_full_while_requests_wait():
    # One final-norm call per step; its batch is the number of occupied slots. With 15 rows
    # for 4 slots, every step runs 4 rows until fewer than 4 are left unfinished.
    engine = _engine(max_batch_size=4)
    batches = []
    engine.model.model.norm.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    params = SamplingParams(n=3, max_new_tokens=14, stop_token_ids=STOPS, seed=3)
    out = engine.generate(PROMPTS, params)
    lengths = sorted(len(s.token_ids) for g in out for s in g)
    assert sum(batches) == sum(lengths)  # every step sampled one token per occupied slot
    # Slots empty only once the queue is: the last 3 rows to finish may run alone.
    assert all(b == 4 for b in batches[: len(batches) - lengths[-1]])
    assert len(batches) < sum(lengths) / 4 + lengths[-1]


def test_continuations_and_spent_budgets_match_the_hf_path():
    engine = _engine(max_batch_size=3)
    params = SamplingParams(n=2, max_new_tokens=10, seed=4, stop_token_ids=STOPS)
    first = engine.generate(PROMPTS[:3], params, ["a", "b", "c"])
    # Continue each sample from a cut of its response (the whole of it for sample 1 of
    # prompt 0: a budget already spent).
    resume = [[Resume(j, tuple(s.token_ids[: (len(s.token_ids) if (i, j) == (0, 1) else 3)]),
                      params.seed, rid) for j, s in enumerate(group)]
              for i, (group, rid) in enumerate(zip(first, "abc"))]
    slots, hf = _both(engine, PROMPTS[:3], params, ["a2", "b2", "c2"], resume)
    _assert_same(slots, hf)
    # A continuation is the uninterrupted run's tail (same stream, same weights).
    for i, group in enumerate(slots):
        for j, s in enumerate(group):
            cut = len(resume[i][j].token_ids)
            if cut < len(first[i][j].token_ids):
                assert resume[i][j].token_ids + tuple(s.token_ids) == tuple(first[i][j].token_ids)
                assert s.finish_reason == first[i][j].finish_reason
            elif cut >= 10:
                assert s.token_ids == [] and s.finish_reason == "length"


def test_stop_strings_and_aborted_requests_match_the_hf_path():
    engine = EmbeddedEngine(tiny_config(init_range=0.3), max_batch_size=2,
                            decode=lambda ids: "".join(chr(97 + t % 26) for t in ids))
    params = SamplingParams(n=2, max_new_tokens=12, seed=9, stop_strings=["e", "q"])
    engine.abort(["gone"])
    slots, hf = _both(engine, PROMPTS[:3], params, ["x", "gone", "z"])
    # The abort is claimed by the first call; run the second path against it again.
    engine.abort(["gone"])
    hf_again = engine.generate(PROMPTS[:3], params, ["x", "gone", "z"])
    _assert_same(slots, hf_again)
    assert [s.finish_reason for s in slots[1]] == ["abort", "abort"]
    assert any(s.finish_reason == "stop" for g in slots for s in g)


def test_new_weights_reach_the_fused_projections():
    # The slot path runs q/k/v and gate/up as concatenated copies of the weights: after a
    # weight sync (in-place copies) and after replacing a parameter object, it must sample
    # from the new weights exactly as the HF path does.
    engine = _engine(max_batch_size=4)
    params = SamplingParams(n=2, max_new_tokens=8, seed=1)
    before = engine.generate(PROMPTS, params)
    torch.manual_seed(5)
    donor = EmbeddedEngine(tiny_config(init_range=0.3))
    engine.update_weights(donor.state_dict_buckets(), 1)
    slots, hf = _both(engine, PROMPTS, params)
    _assert_same(slots, hf)
    assert [s.token_ids for g in slots for s in g] != [s.token_ids for g in before for s in g]
    up = engine.model.model.layers[1].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight * 3)
    slots, hf = _both(engine, PROMPTS, params)
    _assert_same(slots, hf)


def test_other_families_use_the_hf_path():
    torch.manual_seed(0)
    engine = EmbeddedEngine(tiny_config("mistral", sliding_window=4))
    assert not engine.slot_decoding
    out = engine.generate(PROMPTS[:2], SamplingParams(n=2, max_new_tokens=4, seed=0))
    assert [len(s.token_ids) for g in out for s in g] == [4] * 4


def test_responses_longer_than_the_first_buffer_match_the_hf_path():
    # The KV buffer starts at the longest prompt + 64 columns and grows while rows run on.
    engine = _engine(max_batch_size=3)
    params = SamplingParams(n=2, max_new_tokens=90, seed=8)  # no stop: every row runs 90
    slots, hf = _both(engine, PROMPTS[:4], params)
    _assert_same(slots, hf)
    longest_prompt = max(len(p) for p in PROMPTS[:4])
    assert any(len(PROMPTS[i]) + len(s.token_ids) > longest_prompt + 64
               for i, g in enumerate(slots) for s in g), "no row outgrew the first buffer"
