"""Hang detection for calls on Ray actors: a slow call is waited for, a frozen actor is named.

A call's duration says nothing about a hang (a 20k-token generation or a 235B train step
takes as long as it takes), so the watchdog asks a different question every
``hang_timeout_s`` while a call is pending: does the actor still answer a trivial ping,
served beside the busy call (a threaded actor, or a concurrency group of its own)? A live
actor answers within moments however busy its main thread is; a frozen one (SIGSTOP, a
deadlocked process, a node that stopped answering) does not, and the call is given up with
`ActorHung` naming the actor, so the caller can replace it (engines) or end the run cleanly
(policy ranks). A dead actor needs no watchdog: Ray fails its call at once.
"""

from __future__ import annotations

import time
from typing import Any, Sequence


class ActorHung(RuntimeError):
    """An actor with a pending call did not answer a ping: it is frozen, not busy."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index  # position of the frozen actor in the list given to get_watching


# A ping to a live actor on a heavily loaded machine can take seconds (measured: over 10 s
# at load average 30 on 2 cores); a frozen actor never answers. Wrongly calling a rank
# frozen ends a run, so a ping gets at least this long.
MIN_PATIENCE_S = 30.0


def ping_patience(hang_timeout_s: float) -> float:
    """How long a ping may take before its actor counts as frozen."""
    return max(MIN_PATIENCE_S, min(hang_timeout_s, 600.0))


def get_watching(refs: Sequence[Any], actors: Sequence[Any], *, ping: str, hang_timeout_s: float | None,
                 what: str, names: Sequence[str] | None = None) -> list:
    """ray.get(refs), where refs[i] is a call pending on actors[i]; pings every pending
    actor's ``ping`` method each hang_timeout_s (None: wait forever, plain ray.get) and
    raises ActorHung for the first one that does not answer within ping_patience.
    what names the call, names[i] the actor (for the message)."""
    import ray

    refs = list(refs)
    if hang_timeout_s is None:
        return ray.get(refs)
    pending = list(range(len(refs)))
    start = time.monotonic()
    while pending:
        ready, _ = ray.wait([refs[i] for i in pending], num_returns=len(pending), timeout=hang_timeout_s)
        done = {r.hex() for r in ready}
        pending = [i for i in pending if refs[i].hex() not in done]
        for i in pending:
            try:
                ray.get(getattr(actors[i], ping).remote(), timeout=ping_patience(hang_timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise ActorHung(
                    f"{what}: {names[i] if names else f'actor {i}'} has not answered for {time.monotonic() - start:.0f} s and does "
                    f"not answer a ping within {ping_patience(hang_timeout_s):.0f} s: it is frozen "
                    f"(the hang timeout is {hang_timeout_s:g} s)", i) from None
            except ray.exceptions.RayActorError:
                break  # dead, not frozen: ray.get below raises its error
    return ray.get(refs)  # raises the actors' own errors, if any
