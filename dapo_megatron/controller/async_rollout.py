"""Asynchronous training: the next step's rollout is collected while this step trains.

With `rollout.max_staleness` > 0 (disaggregated engines, which keep their memory while the
policy trains) the loop runs, for step t:

    take rollout t (collected in the background during step t-1)
    start collecting rollout t+1 in a background thread     (engines at version t-1)
    train on rollout t                                      (concurrently)
    join the collection of rollout t+1                      (trainer waits, if it is slower)
    push weights version t to the engines, evaluate, checkpoint

The push waits for the collection, so every rollout is generated under one version and
the run is reproducible: what a step trains on does not depend on when training ended.
A response is then exactly one version old when it is trained on (more for carried
partial responses); `rollout.max_staleness` bounds it (controller/rollout_phase.py). The
behaviour policy is the engine's: its per-token log-probs travel with the samples, and
`algo.rollout_correction` corrects towards them as in the synchronous loop.

The checkpoint written at the end of step t holds rollout t+1 (its groups, counts and
carried partials), so a resumed run trains on exactly what the uninterrupted one did.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class BackgroundRollout:
    """One rollout collection running in a daemon thread; `join` returns its result (or
    raises its error) with the seconds the caller waited and the seconds it ran."""

    def __init__(self, collect: Callable[[], object]):
        self._result: object = None
        self._error: BaseException | None = None
        self._started = time.perf_counter()
        self._ran = 0.0
        self._thread = threading.Thread(target=self._run, args=(collect,), name="rollout-prefetch", daemon=True)
        self._thread.start()

    def _run(self, collect: Callable[[], object]) -> None:
        try:
            self._result = collect()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = err
        finally:
            self._ran = time.perf_counter() - self._started

    def join(self) -> tuple[object, float, float]:
        """(result, seconds waited here, seconds the collection ran)."""
        t0 = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        return self._result, waited, self._ran
