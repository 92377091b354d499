"""`logging.num_examine`: decoded responses per data source in the log (controller/examine.py)."""

from __future__ import annotations

import logging

import pytest

from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.controller.examine import log_examples, pick_examples
from dapo_megatron.controller.rollout_phase import ScoredGroup
from dapo_megatron.data.datasets import PromptExample
from dapo_megatron.rollout.protocol import Sample


def _group(index, source, texts, lengths, correct, truncated=()):
    samples = [Sample(token_ids=list(range(n)), logprobs=[0.0] * n,
                      finish_reason="length" if j in truncated else "stop", prompt_index=0,
                      request_id=f"r{index}", sample_index=j) for j, n in enumerate(lengths)]
    example = PromptExample(messages=[{"role": "user", "content": f"Q{index}: what is 6*7?"}],
                            ground_truth="42", data_source=source, index=index)
    return ScoredGroup(example=example, prompt_ids=[1, 2], samples=samples, texts=texts,
                       correct=correct, scores=[1.0 if c else -1.0 for c in correct],
                       reasons=[None] * len(texts))


GROUPS = [
    _group(0, "aime", ["Answer: 42", "Answer: 41"], [3, 5], [True, False]),
    _group(1, "math", ["Answer: 7", "Answer: 42"], [4, 9], [False, True], truncated={1}),
    _group(2, "aime", ["Answer: 40", "Answer: 42"], [6, 2], [False, True]),
]


def test_picks_per_source_one_sample_from_each_group_first():
    got = [(g.example.index, i) for g, i in pick_examples(GROUPS, 3)]
    # aime: groups 0 and 2 give their first samples, then group 0 its second; math: both of group 1
    assert got == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
    assert [(g.example.index, i) for g, i in pick_examples(GROUPS, 1)] == [(0, 0), (1, 0)]
    assert pick_examples(GROUPS, 0) == [] and pick_examples([], 2) == []


def test_logged_block_has_response_reward_length_and_reference(caplog):
    with caplog.at_level(logging.INFO, logger="dapo_megatron.examine"):
        blocks = log_examples(GROUPS, 2, tag="step 3")
    assert len(blocks) == 4 and [r.getMessage() for r in caplog.records] == blocks
    math_second = blocks[3]
    assert math_second.splitlines() == [
        "[step 3] data_source=math reward=+1 (correct) length=9 tokens, truncated",
        "[prompt] Q1: what is 6*7?",
        "[response] Answer: 42",
        "[ground_truth] 42",
    ]
    assert blocks[0].startswith("[step 3] data_source=aime reward=+1 (correct) length=3 tokens\n")
    assert blocks[1].startswith("[step 3] data_source=math reward=-1 (wrong) length=4 tokens\n")
    assert "data_source=aime reward=-1 (wrong) length=6 tokens\n[prompt] Q2" in blocks[2]


def test_num_examine_defaults_to_one_and_refuses_negatives():
    assert load_config(None).logging.num_examine == 1
    with pytest.raises(ConfigError, match="logging.num_examine"):
        load_config(None, ["logging.num_examine=-1"])
