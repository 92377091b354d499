"""bench/peer_bench.py: the TRL configuration built from our config, the shared reward and
the character tokenizer handed to TRL. TRL itself is needed only for the last test."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML = os.path.join(ROOT, "examples/tiny_cpu.yaml")


def _bench():
    spec = importlib.util.spec_from_file_location("peer_bench", os.path.join(ROOT, "bench/peer_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cfg(*overrides):
    from dapo_megatron.config import load_config

    return load_config(YAML, list(overrides))


def test_trl_settings_follow_the_yaml():
    kw, info = _bench().trl_settings(_cfg(), seed=3, budget=12288, snapshot_every=8, out_dir="x")
    # tiny_cpu.yaml: 32 prompts x G 8 per rollout batch, mini-batch 16 prompts: 2 updates.
    assert kw["num_generations"] == 8
    assert kw["per_device_train_batch_size"] == 16 * 8
    assert kw["steps_per_generation"] == 2 and kw["gradient_accumulation_steps"] == 1
    assert kw["per_device_train_batch_size"] * kw["steps_per_generation"] == 256
    assert kw["num_iterations"] == 1
    # 12288 responses / 256 per rollout batch = 48 batches = 96 optimizer steps.
    assert kw["max_steps"] == 96
    assert (kw["loss_type"], kw["epsilon"], kw["epsilon_high"], kw["beta"]) == ("dapo", 0.2, 0.28, 0.0)
    assert kw["max_completion_length"] == 48
    assert kw["learning_rate"] == 3e-4 and kw["weight_decay"] == 0.0 and kw["warmup_steps"] == 0
    assert kw["lr_scheduler_type"] == "constant" and kw["max_grad_norm"] == 1.0
    assert kw["seed"] == 3 and kw["temperature"] == 1.0 and kw["top_p"] == 1.0 and kw["top_k"] == 0
    assert info == {"snapshot_every_steps": 16, "responses_per_step": 128, "eval_k": 4}
    # A budget that is not a whole number of rollout batches rounds up.
    kw, _ = _bench().trl_settings(_cfg(), seed=1, budget=257, snapshot_every=1, out_dir="x")
    assert kw["max_steps"] == 4


def test_trl_settings_refuse_what_they_cannot_map():
    bench = _bench()
    for override in ("algo.kl_coef=0.1", "algo.overlong_filter=true", "optimizer.lr_decay=cosine",
                     "trainer.mini_batch_size=12"):
        with pytest.raises(ValueError):
            bench.trl_settings(_cfg(override), seed=1, budget=256, snapshot_every=1, out_dir="x")


def test_shaped_reward_is_rule_score_plus_soft_overlong():
    algo = _cfg().algo  # L_max 48, L_cache 8: the band starts after 40 tokens
    shaped = _bench().shaped_reward
    assert shaped("4*8=32\n17+32=49\nAnswer: 49", 30, "49", algo) == 1.0
    assert shaped("Answer: 48", 30, "49", algo) == -1.0
    # 45 tokens: 1 + (40 - 45) / 8 by hand.
    assert shaped("Answer: 49", 45, "49", algo) == pytest.approx(0.375)
    assert shaped("Answer: 49", 49, "49", algo) == 0.0  # past L_max: -1 on top of +1


def test_hf_char_tokenizer_gives_our_ids():
    pytest.importorskip("tokenizers")
    from dapo_megatron.data.tokenizer import CharTokenizer

    ours = CharTokenizer()
    hf = _bench().char_tokenizer_hf(ours.itos, ours.bos_id, ours.eos_id, ours.pad_id)
    for text in ("17+4*8=", "1+1*1=", "a b\nc?=\\'\""):
        ids = ours.encode_prompt(text)
        prompt = ours.itos[ids[0]] + ours.decode(ids[1:])
        assert hf(prompt, add_special_tokens=False)["input_ids"] == ids
    assert hf.pad_token_id == ours.pad_id and hf.eos_token_id == ours.eos_id


def test_grpo_config_accepts_the_settings(tmp_path):
    trl = pytest.importorskip("trl")  # an optional bench dependency: see bench/peer_bench.py
    kw, _ = _bench().trl_settings(_cfg(), seed=1, budget=512, snapshot_every=1, out_dir=str(tmp_path))
    conf = trl.GRPOConfig(**kw)
    assert conf.generation_batch_size == 256
    assert conf.loss_type == "dapo" and conf.epsilon_high == 0.28


def test_per_update_floor_on_hand_worked_curves():
    """Ours: start-up 20 s, 10 updates to 0.60 at 50 s, 20 updates by 80 s, 0.8 s of them
    training per update (16 s over 20). TRL: start-up 5 s, 12 updates to 0.60 at 65 s.
    Floor: our 10 updates x 0.8 s of training = 8 s, over TRL's 65 s."""
    ours = [{"wall_s": 20.0, "avg": 0.3, "updates": 0, "train_s": 0.0},
            {"wall_s": 50.0, "avg": 0.62, "updates": 10, "train_s": 8.0},
            {"wall_s": 80.0, "avg": 0.60, "updates": 20, "train_s": 16.0}]
    trl = [{"wall_s": 5.0, "avg": 0.3, "step": 0}, {"wall_s": 35.0, "avg": 0.5, "step": 6},
           {"wall_s": 65.0, "avg": 0.61, "step": 12}, {"wall_s": 95.0, "avg": 0.64, "step": 18}]
    bench = _bench()
    target, x, y = bench.compare(ours, trl)
    assert (target, x, y) == (0.60, 50.0, 65.0)
    got = bench.per_update(ours, trl, target)
    assert got["updates_ours"] == 10 and got["updates_trl"] == 12
    assert got["clock_ours"] == pytest.approx(60.0 / 20) and got["clock_trl"] == pytest.approx(90.0 / 18)
    assert got["train_ours"] == pytest.approx(0.8)
    assert got["floor_s"] == pytest.approx(8.0) and got["floor_ratio"] == pytest.approx(8.0 / 65.0)
    # Records without the counts (older runs) or a side that never reaches the target: no floor.
    assert bench.per_update([{k: p[k] for k in ("wall_s", "avg")} for p in ours], trl, target) is None
    assert bench.per_update(ours, trl, 0.99) is None


def test_report_reprints_a_stored_run_with_its_floor(tmp_path, capsys):
    """--report: the lines of a finished run from its results.json, the floor recomputed."""
    import json

    ours = [{"wall_s": 20.0, "avg": 0.3, "responses": 0, "updates": 0, "train_s": 0.0},
            {"wall_s": 50.0, "avg": 0.62, "responses": 1920, "updates": 10, "train_s": 8.0},
            {"wall_s": 80.0, "avg": 0.60, "responses": 3840, "updates": 20, "train_s": 16.0}]
    trl = [{"wall_s": 5.0, "avg": 0.3, "step": 0, "responses": 0},
           {"wall_s": 65.0, "avg": 0.61, "step": 12, "responses": 1536},
           {"wall_s": 95.0, "avg": 0.64, "step": 18, "responses": 2304}]
    stored = [{"seed": 1, "target": 0.60, "x": 50.0, "y": 65.0, "ours": ours, "trl": trl,
               "walls": {"dapo-megatron": 90.0, "TRL": 100.0}}]
    (tmp_path / "results.json").write_text(json.dumps(stored))
    _bench().main(["--report", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "peer wall clock to equal held-out accuracy: dapo-megatron 50 s, TRL 65 s, ratio 0.77"
    assert lines[-2] == "floor (our training phase alone, for the updates it took): 8 s against TRL's 65 s, ratio >= 0.12"
    assert "updates to 0.600: dapo-megatron 10, TRL 12" in lines[-3]
