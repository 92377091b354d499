"""Run-directory bookkeeping: metrics.jsonl across a resume, the plot, checkpoint rotation."""

import json
import os

from dapo_megatron.config import load_config
from dapo_megatron.controller import checkpoint as ckpt_io
from dapo_megatron.controller.metrics import MetricsLogger, console_line, plot_metrics


def test_metrics_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path))
    for step in range(5):
        log.log(step, {"reward/mean": 0.1 * step, "actor/entropy": 1.0, "eval/avg@k": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward/me')  # a line cut by a crash mid-write
    resumed = MetricsLogger(str(tmp_path), resume_step=2)
    resumed.log(3, {"reward/mean": 9.0})
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert lines[-1]["reward/mean"] == 9.0
    plot_metrics(lines, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_console_line_skips_missing_and_nonfinite():
    line = console_line(3, {"reward/mean": 0.25, "actor/entropy": float("nan"), "time/step": 1.5}, 10)
    assert line == "step 3/10 | reward +0.250 | s 1.5"


def test_checkpoints_are_atomic_and_rotated(tmp_path):
    cfg = load_config(None, [f"checkpoint.dir={tmp_path}", "checkpoint.keep_last=2"])
    for step in (1, 2, 3):
        ckpt_io.save(cfg, step, lambda d: (os.makedirs(d), open(os.path.join(d, "x"), "w").write(str(step))))
    assert [s for s, _ in ckpt_io.step_dirs(str(tmp_path))] == [2, 3]
    assert ckpt_io.newest_verified(str(tmp_path))[0].endswith("step_000003")

    def crash(d):
        os.makedirs(d)
        raise RuntimeError("disk full")

    try:
        ckpt_io.save(cfg, 4, crash)
    except ckpt_io.CheckpointSaveError:
        pass
    # a half-written checkpoint is never newest
    assert ckpt_io.newest_verified(str(tmp_path))[0].endswith("step_000003")
