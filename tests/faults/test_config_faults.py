"""Finding 10 (and the data half of 9): nonsense and unusable inputs are refused before any
actor starts, with the key named."""

from __future__ import annotations

import json
import os

import pytest

from dapo_megatron.config import (NUMERIC_RANGES, ConfigError, check_run_paths,
                                  load_config, numeric_keys)
from dapo_megatron.controller import task as task_mod
from dapo_megatron.data.tokenizer import CharTokenizer

# The campaign's accepted values, each now refused naming its key.
REFUSED = ["rollout.top_k=0", "rollout.num_engines=-1", "optimizer.adam_beta1=2", "algo.adv_eps=nan",
           "trainer.max_steps=-1", "checkpoint.save_every=-1", "algo.kl_coef=-1",
           "optimizer.weight_decay=-5", "algo.eps_high=inf"]


@pytest.mark.parametrize("override", REFUSED)
def test_out_of_range_values_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"examples/tiny_cpu.yaml: {key}: must"):
        load_config("examples/tiny_cpu.yaml", [override])


def test_every_numeric_key_has_a_range():
    """A numeric knob added without a range entry fails here (config.NUMERIC_RANGES)."""
    keys = numeric_keys()
    assert len(keys) > 60
    assert sorted(set(keys) - set(NUMERIC_RANGES)) == []
    assert sorted(set(NUMERIC_RANGES) - set(keys)) == []


def test_valid_edges_still_load():
    load_config("examples/tiny_cpu.yaml", ["rollout.top_k=1", "rollout.top_k=-1", "trainer.max_steps=0",
                                           "checkpoint.save_every=0", "optimizer.adam_beta1=0"])


def test_unwritable_checkpoint_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = load_config("examples/tiny_cpu.yaml", [f"checkpoint.dir={blocker}/ckpt"])
    with pytest.raises(ConfigError, match=r"checkpoint.dir: cannot write checkpoints to .*a_file/ckpt"):
        check_run_paths(cfg)


def test_missing_data_file_names_the_key(tmp_path):
    cfg = load_config("examples/tiny_cpu.yaml", [f"data.train_path={tmp_path}/nope.parquet",
                                                 f"trainer.run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"data.train_path: no such file: .*nope.parquet"):
        check_run_paths(cfg)


def test_corrupt_parquet_names_the_key(tmp_path):
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(300))
    cfg = load_config("examples/tiny_cpu.yaml", [f"data.train_path={bad}"])
    with pytest.raises(ConfigError, match=r"data.train_path: cannot use .*train.parquet: "):
        task_mod._load_file(cfg, "data.train_path", CharTokenizer())


def _jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                        "reward_model": {"ground_truth": "1"}}) + "\n" for p in prompts))
    return str(path)


def test_all_prompts_too_long_is_refused_at_once(tmp_path):
    path = _jsonl(tmp_path / "long.jsonl", ["x" * 500] * 4)
    cfg = load_config("examples/tiny_cpu.yaml", [f"data.eval_path={path}", "data.template=as-is"])
    with pytest.raises(ConfigError, match=r"data.eval_path: all 4 prompts of .* are longer than "
                                          r"rollout.max_prompt_length=16 tokens"):
        task_mod.load_task(cfg)


def test_dataset_smaller_than_a_generation_round_is_refused(tmp_path):
    path = _jsonl(tmp_path / "small.jsonl", ["1+1"] * 5)
    cfg = load_config("examples/tiny_cpu.yaml", [f"data.train_path={path}", "rollout.gen_batch_size=48",
                                                 "data.template=as-is"])
    train = task_mod._load_file(cfg, "data.train_path", CharTokenizer())
    assert len(train) == 5
    with pytest.raises(ConfigError, match=r"data.train_path: 5 usable training prompts, fewer than "
                                          r"rollout.gen_batch_size=48"):
        task_mod._check_size(cfg, "data.train_path", train)
    cfg = load_config("examples/tiny_cpu.yaml", ["data.synthetic_train_size=10", "rollout.gen_batch_size=48"])
    with pytest.raises(ConfigError, match=r"data.synthetic_train_size: 10 usable"):
        task_mod.load_task(cfg)


def test_prompt_plus_response_beyond_the_hf_models_positions_is_refused():
    # hf_dir's config.json says 128 positions: 16 + 120 does not fit, refused at load time.
    assert json.load(open("examples/tiny_warm_start/config.json"))["max_position_embeddings"] == 128
    with pytest.raises(ConfigError, match=r"algo.max_response_length: .* = 136 exceeds the model's "
                                          r"max_position_embeddings=128"):
        load_config("examples/tiny_cpu.yaml", ["algo.max_response_length=120"])  # 16 + 120 > 128
    load_config("examples/tiny_cpu.yaml")


def test_overwrite_without_resume_false_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.overwrite: .* needs checkpoint.resume=false"):
        load_config("examples/tiny_cpu.yaml", ["checkpoint.overwrite=true"])
    load_config("examples/tiny_cpu.yaml", ["checkpoint.overwrite=true", "checkpoint.resume=false"])
