"""bench/rollout_bench.py: what it counts as generated on each side, worked by hand, and a
tiny run of both workloads (every response full length; responses ending at stop tokens, with
every row in one batch and with fewer slots than rows)."""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("rollout_bench",
                                                  os.path.join(ROOT, "bench/rollout_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_rows_count_up_to_their_first_stop_token():
    responses = torch.tensor([
        [5, 9, 7, 0, 0],   # stops at its 3rd token (7), then padding
        [5, 5, 5, 5, 5],   # never stops: the whole width
        [8, 7, 9, 9, 0],   # 8 is the first stop token (the 9s after it are not counted)
    ])
    assert _bench()._response_tokens(responses, [7, 8]) == 3 + 5 + 1
    assert _bench()._response_tokens(responses, []) == 15


def _args(**over):
    args = dict(hidden=64, layers=1, vocab=64, prompts=2, n=2, prompt_len=4, new_tokens=12,
                stop_tokens=0, slots=0, temperature=1.0, top_p=1.0, repeats=1)
    args.update(over)
    return argparse.Namespace(**args)


def test_full_length_workload_counts_every_token():
    out = _bench().bench_generate(_args())
    for side in ("embedded", "hf_generate"):
        assert out[side]["tokens"] == 2 * 2 * 12
    assert out["speedup_embedded_over_hf"] > 0


@pytest.mark.parametrize("slots", [0, 2])  # 2 of 8 rows at once: the engine refills slots
def test_stop_token_workload_counts_what_the_engine_returned(slots):
    bench = _bench()
    # A quarter of the vocabulary stops a response: most end early.
    args = _args(prompts=4, stop_tokens=16, slots=slots)
    out = bench.bench_generate(args)
    # The engine's count, recomputed from its own responses under the same seeded params with
    # every row in one batch (a row's draws do not depend on its slot).
    from dapo_megatron.rollout.embedded import EmbeddedEngine
    from dapo_megatron.rollout.protocol import SamplingParams

    torch.manual_seed(0)
    engine = EmbeddedEngine(bench._model_config(args), max_batch_size=8)
    prompts = torch.randint(1, args.vocab, (4, 4), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(n=2, max_new_tokens=12, stop_token_ids=list(range(48, 64)))
    samples = [s for g in engine.generate(prompts.tolist(), params) for s in g]
    assert out["embedded"]["tokens"] == sum(len(s.token_ids) for s in samples)
    assert any(s.finish_reason == "stop" for s in samples)
    assert all(s.token_ids[-1] >= 48 for s in samples if s.finish_reason == "stop")
    assert 0 < out["hf_generate"]["tokens"] <= 4 * 2 * 12
