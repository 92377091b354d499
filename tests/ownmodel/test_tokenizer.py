"""A real BPE tokenizer with a ChatML template: chat prompts encode under transformers 4.x
and 5.x, and generation stops on every end token of the model.

Before this was fixed, transformers 5's `apply_chat_template(..., tokenize=True)` returned a
BatchEncoding (a UserDict, not a dict) and `encode_prompt` turned the prompt into the list
['input_ids', 'attention_mask']; rollouts and eval stopped only on the tokenizer's eos.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from dapo_megatron.data.templates import dapo_prompt, user_message
from dapo_megatron.data.tokenizer import HFTokenizer
from tests.ownmodel.factory import build_tokenizer, token_id


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    tok = build_tokenizer(d)
    ids = [token_id(tok, t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot|>")]
    with open(os.path.join(d, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": ids}, f)
    return d


def _reference(hf, messages):
    """What the model is conditioned on: the rendered template, tokenized as is."""
    text = hf.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf.tok.encode(text, add_special_tokens=False)


def test_chat_prompt_encodes_to_token_ids_under_transformers_5(tok_dir):
    from transformers import BatchEncoding

    hf = HFTokenizer(tok_dir)
    messages = user_message(dapo_prompt("What is 3 + 4?"))
    raw = hf.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = hf.encode_prompt(messages)
    assert ids == _reference(hf, messages)
    assert all(isinstance(i, int) for i in ids)
    assert ids[0] == token_id(hf.tok, "<|im_start|>") and hf.decode(ids).endswith("assistant\n")
    if isinstance(raw, BatchEncoding):  # transformers >= 5: the reported crash
        assert not isinstance(raw, dict)


@pytest.mark.parametrize("shape", ["list", "dict", "batch_encoding", "batched", "tensor"])
def test_every_apply_chat_template_return_shape_gives_the_same_ids(tok_dir, shape, monkeypatch):
    from transformers import BatchEncoding

    from dapo_megatron.data.tokenizer import token_ids

    hf = HFTokenizer(tok_dir)
    messages = user_message("What is 1 + 2?")
    ref = _reference(hf, messages)
    wrap = {"list": lambda x: list(x),  # transformers 4.x
            "dict": lambda x: {"input_ids": x, "attention_mask": [1] * len(x)},
            "batch_encoding": lambda x: BatchEncoding({"input_ids": x, "attention_mask": [1] * len(x)}),
            "batched": lambda x: {"input_ids": [x]},
            "tensor": lambda x: BatchEncoding({"input_ids": torch.tensor([x])})}[shape]
    monkeypatch.setattr(hf.tok, "apply_chat_template",
                        lambda *a, **k: wrap(ref) if k.get("tokenize") else "")
    assert hf.encode_prompt(messages) == ref
    assert token_ids(wrap(ref)) == ref


def test_token_ids_refuses_what_is_not_ids():
    from dapo_megatron.data.tokenizer import token_ids

    with pytest.raises(TypeError, match="not token ids"):
        token_ids(["input_ids", "attention_mask"])


def test_stop_ids_are_every_end_token_of_the_model(tok_dir, caplog):
    from dapo_megatron.data.tokenizer import generation_eos_ids

    with caplog.at_level(logging.INFO, logger="dapo_megatron.data.tokenizer"):
        hf = HFTokenizer(tok_dir)
    eos, im_end, eot = (token_id(hf.tok, t) for t in ("<|endoftext|>", "<|im_end|>", "<|eot|>"))
    assert hf.eos_id == eos
    assert hf.end_of_turn_id() == im_end  # found from the template, not from a name
    assert hf.stop_ids == (eos, im_end, eot)  # tokenizer eos, end of turn, generation_config
    assert generation_eos_ids(tok_dir) == [im_end, eos, eot]
    assert "'<|im_end|>'" in caplog.text and "'<|eot|>'" in caplog.text


def test_generation_config_of_the_model_dir_counts_too(tok_dir, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    hf = HFTokenizer(tok_dir, model_dir=str(model_dir))
    assert 5 in hf.stop_ids and hf.stop_ids[:2] == (hf.eos_id, hf.end_of_turn_id())


class _RecordingEngines:
    """Engines that answer "Answer: 7<|im_end|>" and record the sampling parameters."""

    def __init__(self, tok):
        from dapo_megatron.rollout.manager import GenerationCount

        self.tok, self.params, self.restarts = tok, [], 0
        self.produced = GenerationCount()

    def generate_streaming(self, prompts, params, tag):
        from dapo_megatron.rollout.protocol import Sample

        self.params.append(params)
        ids = self.tok.encode("Answer: 7") + [token_id(self.tok.tok, "<|im_end|>")]
        out = [[Sample(ids, [-0.1] * len(ids), "stop", i, f"{tag}-{i}", j) for j in range(params.n)]
               for i in range(len(prompts))]
        self.produced.add_samples(out)
        yield list(range(len(prompts))), out

    def abort_all(self):
        pass


def test_rollout_and_eval_stop_on_every_stop_id(tok_dir):
    from dapo_megatron.algo import BatchAssembler
    from dapo_megatron.config import load_config
    from dapo_megatron.controller.rollout_phase import collect_train_groups
    from dapo_megatron.data.datasets import PromptExample
    from dapo_megatron.data.sampler import PromptSampler
    from dapo_megatron.controller.eval_phase import evaluate
    from dapo_megatron.reward import compute_score

    class Scorer:
        def score(self, texts, refs):
            return [compute_score(t, r) for t, r in zip(texts, refs)]

    hf = HFTokenizer(tok_dir)
    cfg = load_config(None, ["algo.group_size=2", "trainer.train_batch_size=1", "trainer.mini_batch_size=1",
                             "rollout.gen_batch_size=2", "algo.max_gen_batches=1", "eval.k=2"])
    examples = [PromptExample(messages=user_message(dapo_prompt(q)), ground_truth=a, index=i)
                for i, (q, a) in enumerate([("What is 3 + 4?", "7"), ("What is 1 + 2?", "3")])]
    engines = _RecordingEngines(hf)
    collect_train_groups(cfg=cfg, step=1, sampler=PromptSampler(examples, seed=0, shuffle=False),
                         tokenizer=hf, engines=engines, scorer=Scorer(),
                         assembler=BatchAssembler(1, 1, "drop"))
    metrics = evaluate(cfg, examples, hf, engines, Scorer(), k=2)
    assert [p.stop_token_ids for p in engines.params] == [hf.stop_ids, hf.stop_ids]
    assert len(hf.stop_ids) == 3
    assert metrics["eval/avg@k"] == 0.5  # "Answer: 7" is right for the first prompt only
