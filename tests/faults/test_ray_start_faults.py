"""Finding 7 (Ray start-up) and the mechanism of finding 6: a failed Ray start-up is
retried with a clear message, and Ray's processes start with SIGTERM/SIGINT blocked so a
signal to the whole process group leaves the actors alive for the final checkpoint
(the end-to-end check is test_trainer_faults.py::test_sigterm_to_the_process_group...)."""

from __future__ import annotations

import logging
import signal

import pytest
import ray

from dapo_megatron.config import load_config
from dapo_megatron.controller import loop


@pytest.fixture
def fake_ray(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))  # the mask Ray's children inherit
        if len(calls) <= fake_ray_failures[0]:
            raise Exception("The current node timed out during startup. This could happen because "
                            "some of the Ray processes failed to startup.")

    fake_ray_failures = [0]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(loop, "RAY_START_BACKOFF_S", 0.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls, fake_ray_failures


def test_a_timed_out_start_is_retried(fake_ray, caplog):
    calls, failures = fake_ray
    failures[0] = 2
    with caplog.at_level(logging.WARNING, logger="dapo_megatron"):
        loop._init_ray(load_config("examples/tiny_cpu.yaml"))
    assert len(calls) == 3  # two failures, then up
    assert "Ray start-up failed (attempt 1/5: Exception: The current node timed out during startup" in caplog.text
    assert "attempt 2/5" in caplog.text
    # Every attempt started Ray's processes with the stop signals blocked ...
    assert all({signal.SIGTERM, signal.SIGINT} <= mask for mask in calls)
    # ... and the driver itself is left able to receive them.
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_giving_up_says_what_to_do(fake_ray):
    calls, failures = fake_ray
    failures[0] = 99
    with pytest.raises(loop.RayStartError, match=r"Ray did not start after 5 attempts \(Exception: The current "
                                                 r"node timed out.*rerun later, or start a cluster"):
        loop._init_ray(load_config("examples/tiny_cpu.yaml"))
    assert len(calls) == loop.RAY_START_ATTEMPTS

