"""A scripted RolloutEngine: known responses, decoded one token per step, with real aborts.

It keeps its own count of what it generated, independently of the manager's, so tests can
hold the trainer's count against it. A response is produced token by token (a short
sleep per decode step, all rows of a call together like a batched engine), so abort()
lands in the middle of a call and stops the named requests at the next step.

Token t of sample j has log-prob `scripted_logprob(t, j, version)`, so a response continued
from its first k tokens (protocol.Resume: the script is keyed by the stream's request id)
must come out equal to the uninterrupted one at the same version. Several generate calls
may run at once (`max_concurrent` records how many did).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from dapo_megatron.rollout.protocol import Sample, SamplingParams

# (prompt token ids, request id, sample index) -> the tokens this sample will be.
Script = Callable[[list[int], str, int], list[int]]


def scripted_logprob(position: int, sample_index: int, version: int) -> float:
    """The log-prob the scripted engine reports for a token (depends on where and when)."""
    return -0.01 * (position + 1) - 0.001 * sample_index - 0.1 * version


class EngineDied(RuntimeError):
    pass


class ScriptedEngine:
    """RolloutEngine over a script. die_on_call=k: the k-th generate call (1-based) raises
    after its first decode step and the engine is unhealthy from then on."""

    def __init__(self, script: Script, *, step_s: float = 0.001, die_on_call: int | None = None):
        self.script = script
        self.step_s = step_s
        self.die_on_call = die_on_call
        self.weight_version = 0
        self.calls: list[list[str]] = []  # request ids of each generate call, in call order
        self.responses = 0  # samples returned with at least one token (continuations apart)
        self.continued = 0  # continuations of carried responses returned with a token
        self.tokens = 0
        self.aborted = 0  # of those, stopped by abort()
        self._dead = False
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self.running = 0
        self.max_concurrent = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 request_ids: list[str] | None = None, resume=None) -> list[list[Sample]]:
        with self._lock:
            self.running += 1
            self.max_concurrent = max(self.max_concurrent, self.running)
        try:
            return self._generate(prompts, params, request_ids, resume)
        finally:
            with self._lock:
                self.running -= 1

    def _generate(self, prompts, params, request_ids, resume):
        if self._dead:
            raise EngineDied("scripted engine is dead")
        self.calls.append(list(request_ids))
        resume = resume or [None] * len(prompts)
        # rows[i]: (sample index, prefix length, stream id) of each sample prompt i generates
        rows = [[(j, 0, rid) for j in range(params.n)] if r is None else
                [(c.sample_index, len(c.token_ids), c.stream_id) for c in r]
                for rid, r in zip(request_ids, resume)]
        targets = [[self.script(p, sid, j) for j, _, sid in row] for p, row in zip(prompts, rows)]
        tokens = [[[] for _ in row] for row in rows]
        finish: dict[tuple[int, int], str] = {}
        step = 0
        while len(finish) < sum(len(row) for row in rows):
            time.sleep(self.step_s)
            if self._dead:  # died in another call: every call in flight fails with it
                raise EngineDied("scripted engine died during this call")
            for i, rid in enumerate(request_ids):
                for j, (_, start, _) in enumerate(rows[i]):
                    if (i, j) in finish:
                        continue
                    tokens[i][j].append(targets[i][j][start + step])
                    if start + len(tokens[i][j]) == len(targets[i][j]):
                        finish[i, j] = "stop"
                    elif self._is_aborted(rid):
                        finish[i, j] = "abort"
            step += 1
            if self.die_on_call == len(self.calls):
                self._dead = True  # the tokens of this call are lost with the engine
                raise EngineDied(f"scripted engine died in call {len(self.calls)}")
        out = []
        for i, rid in enumerate(request_ids):
            group = []
            for j, (sample_index, start, _) in enumerate(rows[i]):
                ids = tokens[i][j]
                self.responses += bool(ids) and resume[i] is None
                self.continued += bool(ids) and resume[i] is not None
                self.tokens += len(ids)
                self.aborted += finish[i, j] == "abort" and bool(ids)
                lps = [scripted_logprob(start + t, sample_index, self.weight_version) for t in range(len(ids))]
                group.append(Sample(ids, lps, finish[i, j], i, rid, sample_index, self.weight_version))
            out.append(group)
        with self._lock:
            self._aborts.difference_update(request_ids)
        return out

    def _is_aborted(self, rid: str) -> bool:
        with self._lock:
            return rid in self._aborts

    def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            self._aborts.update(request_ids)

    def update_weights(self, buckets, version: int) -> None:
        self.weight_version = version

    def release_memory(self) -> None:
        pass

    def resume_memory(self) -> None:
        pass

    def health(self) -> bool:
        return not self._dead

    def shutdown(self) -> None:
        pass
