"""EmbeddedEngine: sampling correctness, KV cache vs full recompute, weights, abort, stops."""

import math
import threading
import time

import pytest
import torch

from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.protocol import RolloutEngine, SamplingParams
from tests.rollout.reference import chi_square_ok, full_recompute_logits, reference_probs, tiny_config

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 8, 9, 10], [11], [3, 3, 3, 3]]


def make_engine(model_type="llama", seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg_kwargs = {k: kwargs.pop(k) for k in ("vocab", "init_range") if k in kwargs}
    return EmbeddedEngine(tiny_config(model_type, **cfg_kwargs), **kwargs)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 6, 0.9)], ids=["plain", "truncated"]
)
def test_first_token_frequencies_match_model_softmax(temperature, top_k, top_p):
    # A wide init gives a far-from-uniform next-token distribution worth testing against.
    engine = make_engine(vocab=40, init_range=0.6, max_batch_size=4096)
    prompt = [3, 14, 15, 9]
    params = SamplingParams(n=4000, temperature=temperature, top_k=top_k, top_p=top_p,
                            max_new_tokens=1, seed=11)
    samples = engine.generate([prompt], params)[0]
    # Logits after the whole prompt (the dummy response token only sets the slice length).
    logits = full_recompute_logits(engine.model, prompt, [0])[0].tolist()
    q = reference_probs(logits, temperature, top_k, top_p)
    counts = [0] * 40
    for s in samples:
        counts[s.token_ids[0]] += 1
        assert s.logprobs[0] == pytest.approx(math.log(q[s.token_ids[0]]), abs=1e-5)
        assert s.finish_reason == "length"
    ok, stat, crit = chi_square_ok(counts, q)
    assert ok, f"chi-square {stat:.1f} >= {crit:.1f}"
    assert max(q) < 0.6  # the test distribution is not degenerate


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_kv_cache_logprobs_equal_full_recompute(model_type):
    engine = make_engine(model_type, init_range=0.3, max_batch_size=5)
    stops = set(range(0, 96, 5))  # ~20% of the vocabulary: some rows stop early
    params = SamplingParams(n=3, temperature=0.8, top_k=40, top_p=0.95, max_new_tokens=12,
                            stop_token_ids=sorted(stops), seed=3, return_raw_logprobs=True)
    out = engine.generate(PROMPTS, params)
    assert [len(g) for g in out] == [3] * len(PROMPTS)
    lengths = set()
    for i, group in enumerate(out):
        for j, s in enumerate(group):
            assert (s.prompt_index, s.sample_index, s.request_id) == (i, j, f"req-{i}")
            logits = full_recompute_logits(engine.model, PROMPTS[i], s.token_ids)
            raw_ref = torch.log_softmax(logits, -1)
            for t, tok in enumerate(s.token_ids):
                q = reference_probs(logits[t].tolist(), 0.8, 40, 0.95)
                assert q[tok] > 0, "sampled a token outside the truncated support"
                assert s.logprobs[t] == pytest.approx(math.log(q[tok]), abs=1e-5)
                assert s.raw_logprobs[t] == pytest.approx(raw_ref[t, tok].item(), abs=1e-5)
            if s.finish_reason == "stop":
                assert s.token_ids[-1] in stops and not stops & set(s.token_ids[:-1])
            else:
                assert s.finish_reason == "length" and len(s.token_ids) == 12
                assert not stops & set(s.token_ids)
            lengths.add(len(s.token_ids))
    assert len(lengths) > 1, "no row finished early: the compaction path went untested"


def test_same_seed_reproduces_across_batch_sizes_and_new_seed_differs():
    params = SamplingParams(n=2, max_new_tokens=10, seed=5)
    big = make_engine(max_batch_size=64).generate(PROMPTS, params)
    small = make_engine(max_batch_size=1).generate(PROMPTS, params)
    tokens = lambda out: [[s.token_ids for s in g] for g in out]
    assert tokens(big) == tokens(small)
    for gb, gs in zip(big, small):
        for a, b in zip(gb, gs):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    other = make_engine().generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=6))
    assert tokens(other) != tokens(big)
    # Samples of one prompt use distinct streams.
    assert big[0][0].token_ids != big[0][1].token_ids


def test_stop_strings_use_decoder():
    decode = lambda ids: "".join("abcdefgh"[t % 8] for t in ids)
    engine = make_engine(decode=decode)
    params = SamplingParams(n=8, max_new_tokens=15, stop_strings=["ca"], seed=1)
    out = engine.generate(PROMPTS, params)
    stopped = 0
    for group in out:
        for s in group:
            text = decode(s.token_ids)
            if s.finish_reason == "stop":
                stopped += 1
                assert "ca" in text and "ca" not in decode(s.token_ids[:-1])
            else:
                assert "ca" not in text and len(s.token_ids) == 15
    assert stopped > 0
    with pytest.raises(ValueError, match="decoder"):
        make_engine().generate(PROMPTS, params)


def test_update_weights_changes_outputs_and_is_strict():
    engine, donor = make_engine(seed=0), make_engine(seed=1)
    params = SamplingParams(n=1, max_new_tokens=6, seed=2)
    before = engine.generate(PROMPTS, params)
    engine.update_weights(iter(donor.state_dict_buckets(max_tensors=5)), version=3)
    assert engine.weight_version == 3 and engine.last_sync["bytes"] > 0
    after = engine.generate(PROMPTS, params)
    assert [s.token_ids for g in after for s in g] == [s.token_ids for g in donor.generate(PROMPTS, params) for s in g]
    assert [s.token_ids for g in after for s in g] != [s.token_ids for g in before for s in g]
    assert all(s.weight_version == 3 for g in after for s in g)

    good = donor.state_dict_buckets()
    with pytest.raises(KeyError, match="model.layers.0.mlp.bogus.weight"):
        engine.update_weights([good[0] + [("model.layers.0.mlp.bogus.weight", torch.zeros(2))]], 4)
    name, tensor = good[0][0]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        engine.update_weights([[(name, tensor[:-1])]], 4)
    with pytest.raises(KeyError, match="missing"):
        engine.update_weights(good[:1], 4)
    assert engine.weight_version == 3 and not engine.health()
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.generate(PROMPTS, params)
    engine.update_weights(good, 5)
    assert engine.health() and engine.weight_version == 5


def test_abort_stops_in_flight_request():
    engine = make_engine(max_batch_size=8)
    params = SamplingParams(n=2, max_new_tokens=100000, seed=0)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=engine.generate(PROMPTS[:2], params, ["keep", "drop"]))
    )
    thread.start()
    time.sleep(0.3)
    engine.abort(["drop", "keep"])
    thread.join(timeout=30)
    assert not thread.is_alive()
    for group in result["out"]:
        for s in group:
            assert s.finish_reason == "abort" and 0 < len(s.token_ids) < 100000
            assert len(s.logprobs) == len(s.token_ids)


def test_abort_stops_only_the_named_request_within_one_decode_step():
    # An abort that arrives during the forward pass that computes the logits of token m
    # (its final-norm call: one per sampling step, whichever decoding path) stops the request
    # after that token: m tokens exactly; the other request of the same call runs to its
    # length limit, and an unaborted run of the call gives the same tokens.
    engine = make_engine(max_batch_size=8)
    params = SamplingParams(n=2, max_new_tokens=12, seed=0)
    reference = engine.generate(PROMPTS[:2], params, ["keep", "drop"])
    calls = []

    def abort_at_fifth(*_):
        calls.append(1)
        if len(calls) == 5:
            engine.abort(["drop"])  # as if it came from another thread during this pass

    engine.model.model.norm.register_forward_pre_hook(abort_at_fifth)
    keep, drop = engine.generate(PROMPTS[:2], params, ["keep", "drop"])
    assert [s.finish_reason for s in drop] == ["abort", "abort"]
    assert [len(s.token_ids) for s in drop] == [5, 5]
    assert [s.token_ids for s in drop] == [s.token_ids[:5] for s in reference[1]]
    assert [s.finish_reason for s in keep] == ["length", "length"]
    assert [s.token_ids for s in keep] == [s.token_ids for s in reference[0]]


def test_bad_prompts_are_named():
    engine = make_engine()
    assert isinstance(engine, RolloutEngine)
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([[1], [1, 999]], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())


def test_tied_embeddings_accept_lm_head_alias_or_not():
    torch.manual_seed(0)
    engine = EmbeddedEngine(tiny_config(tie_word_embeddings=True))
    torch.manual_seed(1)
    donor = EmbeddedEngine(tiny_config(tie_word_embeddings=True))
    state = {k: v.clone() for k, v in donor.model.state_dict().items()}
    engine.update_weights([[(k, v) for k, v in state.items() if k != "lm_head.weight"]], 1)
    assert torch.equal(engine.model.lm_head.weight, state["model.embed_tokens.weight"])
    engine.update_weights([list(state.items())], 2)
    assert engine.weight_version == 2
