"""Findings 4, 5, 9: one run per directory; an old run is never reused or overwritten
silently; config.yaml belongs to the accepted launch only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dapo_megatron.config import load_config
from dapo_megatron.controller.run_dir import RunDirError, RunDirLock, claim_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "dapo_megatron.cli", "train", "examples/tiny_cpu.yaml", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the run directory's lock (a running training)."""
    run_dir = tmp_path / "run"
    code = textwrap.dedent(f"""
        import sys, time
        from dapo_megatron.controller.run_dir import RunDirLock
        RunDirLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run_dir, proc.pid
    proc.kill()
    proc.wait()


def test_second_run_on_a_directory_fails_at_once_naming_the_holder(holder):
    run_dir, pid = holder
    (run_dir / "config.yaml").write_text("the running launch's config\n")
    out = _cli(f"trainer.run_dir={run_dir}")
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"trainer.run_dir: {run_dir} is in use by process {pid} on " in out.stderr
    assert "Traceback" not in out.stderr
    # The refused launch wrote nothing: the running run's config.yaml is intact.
    assert (run_dir / "config.yaml").read_text() == "the running launch's config\n"
    assert sorted(os.listdir(run_dir)) == [".lock", "config.yaml"]


def test_the_lock_dies_with_its_holder(holder, tmp_path):
    run_dir, pid = holder
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    RunDirLock(str(run_dir)).acquire().release()  # kill -9 leaves no stale lock


def _used_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_000002").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run_dir / "config.yaml").write_text("old run\n")
    return run_dir


def test_resume_false_on_a_used_directory_is_refused(tmp_path):
    run_dir = _used_run(tmp_path)
    out = _cli(f"trainer.run_dir={run_dir}", "checkpoint.resume=false")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "checkpoint.resume is false but" in out.stderr and "checkpoint.overwrite=true" in out.stderr
    # The old run is untouched: its checkpoints, metrics and config.
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    assert (run_dir / "metrics.jsonl").read_text().count("step") == 2
    assert (run_dir / "config.yaml").read_text() == "old run\n"


def test_overwrite_moves_the_old_run_aside_intact(tmp_path):
    run_dir = _used_run(tmp_path)
    cfg = load_config("examples/tiny_cpu.yaml", [f"trainer.run_dir={run_dir}", "checkpoint.resume=false",
                                                 "checkpoint.overwrite=true"])
    lock = claim_run_dir(cfg)
    try:
        assert sorted(os.listdir(run_dir)) == [".lock"]
        aside = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
        assert len(aside) == 1
        moved = tmp_path / aside[0]
        assert (moved / "checkpoints" / "step_000002").is_dir()
        assert (moved / "config.yaml").read_text() == "old run\n"
        with pytest.raises(RunDirError, match="is in use by process"):  # held by this launch
            claim_run_dir(cfg)
    finally:
        lock.release()


def test_fresh_and_resuming_launches_are_accepted(tmp_path):
    run_dir = _used_run(tmp_path)
    cfg = load_config("examples/tiny_cpu.yaml", [f"trainer.run_dir={run_dir}"])  # resume: true
    claim_run_dir(cfg).release()
    cfg = load_config("examples/tiny_cpu.yaml", [f"trainer.run_dir={tmp_path}/new", "checkpoint.resume=false"])
    claim_run_dir(cfg).release()
