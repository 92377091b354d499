"""What a run records and says: metrics.jsonl after failed starts and resumes, the
no-learning-signal warning, the end-of-run summary, the config reference and `--help`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import torch

from dapo_megatron.controller.batch import RolloutBatch
from dapo_megatron.controller.metrics import MetricsLogger, run_summary, warn_if_no_learning_signal


def _write(path, steps):
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "x": s}) + "\n")


def _steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def test_fresh_start_after_failed_starts_rewrites_metrics(tmp_path):
    """Three failed starts each logged step 0 (the initial eval) and wrote no checkpoint:
    the next start from scratch keeps none of them."""
    path = tmp_path / "metrics.jsonl"
    _write(path, [0, 0, 0])
    m = MetricsLogger(str(tmp_path), resume_step=None)
    m.log(0, {"eval/avg@k": 0.5})
    m.close()
    assert _steps(path) == [0]


def test_resume_keeps_steps_up_to_the_checkpoint_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [0, 1, 2, 2, 3, 4])  # a step 2 twice (an older restart), 3-4 after the checkpoint
    m = MetricsLogger(str(tmp_path), resume_step=2)
    assert [r["step"] for r in m.records] == [0, 1, 2]
    m.log(3, {})
    m.close()
    assert _steps(path) == [0, 1, 2, 3]


def _batch(advantages):
    n = len(advantages)
    return RolloutBatch(input_ids=[[1, 2]] * n, prompt_lengths=[1] * n,
                        advantages=torch.tensor(advantages), loss_weights=torch.ones(n),
                        engine_logprobs=[[0.0]] * n, rewards=torch.zeros(n),
                        correct=torch.zeros(n, dtype=torch.bool), truncated=torch.zeros(n, dtype=torch.bool))


def test_no_learning_signal_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dapo_megatron"):
        warn_if_no_learning_signal(3, _batch([0.0, 0.0, 0.0, 0.0]))
    assert "step 3: no learning signal" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dapo_megatron"):
        warn_if_no_learning_signal(4, _batch([0.8, -0.8, 0.0, 0.0]))
    assert caplog.text == ""


def test_run_summary():
    records = [{"step": 0, "eval/avg@k": 0.25}, {"step": 1, "dynamic_sampling/kept": 0},
               {"step": 2, "actor/grad_norm": 0.3, "eval/avg@k": 0.5}]
    text = run_summary(records, "runs/x", "runs/x/checkpoints", "runs/x/checkpoints/step_000002")
    assert text.splitlines()[0] == "run finished: 2 steps logged (3 records)"
    assert "held-out avg@k: 0.250 (step 0) -> 0.500 (step 2)" in text
    assert "steps without an update (no kept group): 1" in text
    assert "runs/x/metrics.jsonl" in text and "runs/x/metrics.png" in text
    assert "runs/x/checkpoints (newest: step_000002)" in text


def test_config_reference_is_up_to_date():
    """docs/CONFIG.md is generated from config.py; regenerate it with
    `python -m dapo_megatron.config_doc --write` after changing config.py."""
    import dataclasses

    from dapo_megatron.config import DapoConfig
    from dapo_megatron.config_doc import DOC_PATH, render

    with open(DOC_PATH, encoding="utf-8") as f:
        assert f.read() == render(), "docs/CONFIG.md is stale: python -m dapo_megatron.config_doc --write"
    text = render()
    for section in dataclasses.fields(DapoConfig):
        if dataclasses.is_dataclass(section.type) or isinstance(section.type, str):
            sub = getattr(DapoConfig(), section.name)
            if dataclasses.is_dataclass(sub):
                for f in dataclasses.fields(sub):
                    assert f"`{section.name}.{f.name}`" in text


def test_config_reference_reads_comments_and_defaults():
    from dapo_megatron.config import AlgoConfig
    from dapo_megatron.config_doc import field_comments, render

    assert field_comments(AlgoConfig)["group_size"] == "G responses per prompt (paper sec. 4.1)"
    assert "| `algo.eps_high` | float | `0.28` | ... and upper clip range |" in render()


def test_train_help_points_at_the_config_reference():
    out = subprocess.run([sys.executable, "-m", "dapo_megatron.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "docs/CONFIG.md" in out.stdout and "algo, rollout" in out.stdout
