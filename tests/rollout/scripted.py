"""A scripted RolloutEngine: known responses, decoded one token per step, with real aborts.

It keeps its own count of what it generated, independently of the manager's, so tests can
hold the trainer's count against it. A response is produced token by token (a short
sleep per decode step, all rows of a call together like a batched engine), so abort()
lands in the middle of a call and stops the named requests at the next step.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from dapo_megatron.rollout.protocol import Sample, SamplingParams

# (prompt token ids, request id, sample index) -> the tokens this sample will be.
Script = Callable[[list[int], str, int], list[int]]


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
        self.responses = 0  # samples returned with at least one token
        self.tokens = 0
        self.aborted = 0  # of those, stopped by abort()
        self._dead = False
        self._aborts: set[str] = set()
        self._lock = threading.Lock()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 request_ids: list[str] | None = None) -> list[list[Sample]]:
        if self._dead:
            raise EngineDied("scripted engine is dead")
        self.calls.append(list(request_ids))
        targets = [[self.script(p, rid, j) for j in range(params.n)] for p, rid in zip(prompts, request_ids)]
        tokens = [[[] for _ in range(params.n)] for _ in prompts]
        finish: dict[tuple[int, int], str] = {}
        step = 0
        while len(finish) < len(prompts) * params.n:
            time.sleep(self.step_s)
            for i, rid in enumerate(request_ids):
                for j in range(params.n):
                    if (i, j) in finish:
                        continue
                    tokens[i][j].append(targets[i][j][step])
                    if len(tokens[i][j]) == len(targets[i][j]):
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
            for j in range(params.n):
                ids = tokens[i][j]
                self.responses += 1
                self.tokens += len(ids)
                self.aborted += finish[i, j] == "abort"
                group.append(Sample(ids, [-0.5] * len(ids), finish[i, j], i, rid, j, self.weight_version))
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
