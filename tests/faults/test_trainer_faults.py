"""The whole trainer under faults (real Ray actors, Megatron rank, engine, reward pool).
Marked `faults_slow`: CI runs them as a separate step (`pytest -m faults_slow tests/faults`).

- findings 1, 2: bit rot in the newest checkpoint and a truncated one before it: the
  rerun says which it skipped and why, resumes from the newest that verifies, and its
  metrics equal the uninterrupted run's;
- finding 9: `eval --ckpt RUN/checkpoints` finds the run's checkpoints; a launch refused
  at resume (a changed dataset) leaves config.yaml as it was;
- finding 6: SIGTERM to the whole process group (scancel, preemption) checkpoints at the
  step boundary, exits 0, and the resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dapo_megatron.controller import checkpoint as ckpt_io
from tests.controller.test_train_e2e import COMPARED, TINY, _assert_close, _records

pytestmark = pytest.mark.faults_slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["trainer.max_steps=3", "eval.every=0", "checkpoint.save_every=1", "checkpoint.keep_last=3"]


def _launch(run_dir, *overrides, command="train", extra=()):
    args = [sys.executable, "-m", "dapo_megatron.cli", command, "examples/tiny_cpu.yaml", *TINY,
            f"trainer.run_dir={run_dir}", *overrides, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    log_path = f"{run_dir}.{command}.{time.monotonic_ns()}.log"
    log = open(log_path, "w")
    # A session of its own, as under Slurm: the test can signal the whole process group.
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log_path


def _run(run_dir, *overrides, expect=0, **kw):
    proc, log = _launch(run_dir, *overrides, **kw)
    rc = proc.wait(timeout=1200)
    text = open(log).read()
    assert rc == expect, text[-4000:]
    return text


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-step run with a checkpoint after every step."""
    run_dir = str(tmp_path_factory.mktemp("faults") / "reference")
    _run(run_dir, *COMMON)
    return run_dir, _records(run_dir)


def test_bit_rot_and_truncation_resume_from_the_newest_good_checkpoint(reference, tmp_path):
    ref_dir, ref = reference
    run_dir = str(tmp_path / "rotted")
    shutil.copytree(ref_dir, run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    # step 3: 4 KiB overwritten in its largest file, size unchanged (bit rot)
    step3 = os.path.join(ckpts, "step_000003")
    largest = max((os.path.join(b, n) for b, _, ns in os.walk(step3) for n in ns), key=os.path.getsize)
    size = os.path.getsize(largest)
    with open(largest, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    assert os.path.getsize(largest) == size
    # step 2: a truncated file
    step2 = os.path.join(ckpts, "step_000002")
    victim = max((os.path.join(b, n) for b, _, ns in os.walk(step2) for n in ns), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)

    text = _run(run_dir, *COMMON)
    assert f"skipping checkpoint {step3}: " in text and "does not match its SHA-256" in text
    assert f"skipping checkpoint {step2}: " in text and "(truncated or partly written)" in text
    assert f"resumed from {os.path.join(ckpts, 'step_000001')} at step 1" in text
    records = _records(run_dir)
    assert sorted(records) == [1, 2, 3]
    for step in (2, 3):  # retrained from step 1: the uninterrupted run's trajectory
        _assert_close(records[step], ref[step], COMPARED, 1e-5)
    # Every checkpoint verifies again (2 and 3 were rewritten).
    assert [ckpt_io.verify(p) for _, p in ckpt_io.step_dirs(ckpts)] == [None, None, None]


def test_eval_finds_the_runs_checkpoints_and_a_refused_launch_keeps_config_yaml(reference, tmp_path):
    ref_dir, _ = reference
    run_dir = str(tmp_path / "copy")
    shutil.copytree(ref_dir, run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    text = _run(run_dir, "eval.max_prompts=4", command="eval", extra=["--ckpt", ckpts, "--k", "2"])
    assert f"resumed from {os.path.join(ckpts, 'step_000003')} at step 3" in text
    metrics = json.loads(text[text.index("{\n"):text.index("\n}") + 2])
    assert metrics["eval/num_prompts"] == 4

    before = open(os.path.join(run_dir, "config.yaml")).read()
    text = _run(run_dir, *COMMON, "data.synthetic_train_size=999", expect=1)
    assert "the dataset has 999 prompts" in text
    assert open(os.path.join(run_dir, "config.yaml")).read() == before


def test_sigterm_to_the_process_group_checkpoints_and_resumes_losslessly(reference, tmp_path):
    _, ref = reference
    run_dir = str(tmp_path / "preempted")
    proc, log = _launch(run_dir, "trainer.max_steps=3", "eval.every=0", "checkpoint.save_every=0",
                        "checkpoint.keep_last=3")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 1200
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(metrics) and any('"step": 1' in line for line in open(metrics)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, open(log).read()[-3000:]
    os.killpg(proc.pid, signal.SIGTERM)  # the driver, Ray's GCS and raylet, actors, reward workers
    rc = proc.wait(timeout=600)
    text = open(log).read()
    assert rc == 0, text[-4000:]
    assert "received SIGTERM" in text
    stopped = max(_records(run_dir))
    assert 1 <= stopped <= 3
    ckpts = os.path.join(run_dir, "checkpoints")
    assert ckpt_io.newest_verified(ckpts)[0] == os.path.join(ckpts, f"step_{stopped:06d}")
    if stopped < 3:
        text = _run(run_dir, "trainer.max_steps=3", "eval.every=0", "checkpoint.save_every=0")
        assert f"at step {stopped}" in text
    records = _records(run_dir)
    assert sorted(records) == [1, 2, 3]
    for step in (1, 2, 3):
        _assert_close(records[step], ref[step], COMPARED, 1e-5)
