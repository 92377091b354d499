"""Dispatch of prompt rounds over several rollout engines, streamed back group by group.

The engines may be in-process objects or Ray actor handles (anything with the
RolloutEngine methods; a handle's methods are called with .remote and awaited). A round's
prompts are cut into chunks; one worker thread per engine takes the next chunk as soon as
its engine is free (least-loaded dispatch), so a slow engine never holds chunks others
could run. Groups come back through `RolloutRound`'s iterator in prompt order, chunk by
chunk as each completes (a chunk that finishes early waits for the ones before it), so
which groups a caller sees first never depends on engine timing: the caller scores them
while later chunks still generate and calls `abort()` once it has enough. An engine whose
call fails and whose health check then fails too is replaced through `factory`, re-synced
through `on_replace` (the pool pushes the policy's weights into it: the manager keeps no
copy of the model), and its chunk is retried next, keeping its place in the order; a run
with a replaced engine therefore sees the same groups as an uninterrupted one.

Every sample an engine returns is counted (`GenerationCount`), whether the caller
consumes it, drops it, never looks at it (the rest of a chunk once the batch is full) or
it was aborted part-way: that count, not the groups scored, is what a round cost.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
from typing import Any, Callable, Iterator

from dapo_megatron.rollout.protocol import Sample, SamplingParams
from dapo_megatron.watchdog import ActorHung, get_watching

logger = logging.getLogger(__name__)

EngineFactory = Callable[[int], Any]  # engine index -> a fresh engine (or actor handle)
EngineHook = Callable[[Any], None]  # called with a fresh engine before it serves


def call_engine(engine: Any, method: str, *args: Any, timeout: float | None = None,
                hang_timeout_s: float | None = None) -> Any:
    """engine.method(*args), through .remote + ray.get for Ray actor handles.

    timeout bounds the whole call; hang_timeout_s instead lets a busy engine take as long as
    it needs and raises `ActorHung` only if the engine stops answering pings
    (dapo_megatron.watchdog)."""
    fn = getattr(engine, method)
    if hasattr(fn, "remote"):
        import ray

        if hang_timeout_s is not None:
            return get_watching([fn.remote(*args)], [engine], ping="get_weight_version",
                                hang_timeout_s=hang_timeout_s, what=f"{method}()", names=["the rollout engine"])[0]
        return ray.get(fn.remote(*args), timeout=timeout)
    return fn(*args)


def engine_is_healthy(engine: Any) -> bool:
    try:
        return bool(call_engine(engine, "health", timeout=60))
    except Exception:  # noqa: BLE001 - a dead actor / server answers with any error
        return False


@dataclasses.dataclass
class GenerationCount:
    """What engines generated: responses with at least one token, and their tokens.

    aborted / aborted_tokens are the part of it that was stopped by abort() before the
    response finished. A response aborted before its first token cost nothing and is not
    counted; one lost with a dead engine is not known and not counted either.
    """

    responses: int = 0
    tokens: int = 0
    aborted: int = 0
    aborted_tokens: int = 0

    def add_samples(self, samples_per_prompt: list[list[Sample]]) -> None:
        for samples in samples_per_prompt:
            for s in samples:
                if not s.token_ids:
                    continue
                self.responses += 1
                self.tokens += len(s.token_ids)
                if s.finish_reason == "abort":
                    self.aborted += 1
                    self.aborted_tokens += len(s.token_ids)

    def __add__(self, other: "GenerationCount") -> "GenerationCount":
        return GenerationCount(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __sub__(self, other: "GenerationCount") -> "GenerationCount":
        return GenerationCount(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass
class CompletedGroup:
    """The n samples of one prompt of the round; prompt_index indexes the round's prompts."""

    prompt_index: int
    request_id: str
    samples: list[Sample]


class RolloutManager:
    """Engines plus what is needed to replace a dead one.

    factory: builds engine i anew; without it a dead engine's error propagates.
    on_replace: gives a fresh engine the current weights (e.g. a push from the policy).
    max_restarts: total engine replacements allowed over the manager's life.
    hang_timeout_s: a generate call on an engine that stops answering pings for this long
        is given up and the engine replaced like a dead one (None: no hang detection).
    """

    def __init__(self, engines: list[Any], factory: EngineFactory | None = None,
                 max_restarts: int = 3, on_replace: EngineHook | None = None,
                 hang_timeout_s: float | None = None):
        if not engines:
            raise ValueError("RolloutManager needs at least one engine")
        self.engines = list(engines)
        self.factory = factory
        self.max_restarts = max_restarts
        self.restarts = 0
        self.on_replace = on_replace
        self.hang_timeout_s = hang_timeout_s
        self._lock = threading.Lock()
        self._produced = GenerationCount()  # over the manager's life, every round

    @property
    def produced(self) -> GenerationCount:
        """Everything the engines generated so far (a copy; subtract two to get a span).

        Complete for a round once it is exhausted or aborted with wait=True.
        """
        with self._lock:
            return dataclasses.replace(self._produced)

    def _count(self, samples_per_prompt: list[list[Sample]]) -> None:
        with self._lock:
            self._produced.add_samples(samples_per_prompt)

    def submit(self, prompts: list[list[int]], params: SamplingParams, tag: str,
               prompts_per_call: int | None = None) -> "RolloutRound":
        """Start generating; prompt i gets request id f"{tag}-{i}" (unique per round)."""
        if prompts_per_call is None:
            # Two chunks per engine at least, so an early abort saves real work.
            prompts_per_call = max(1, math.ceil(len(prompts) / (2 * len(self.engines))))
        return RolloutRound(self, prompts, params, tag, prompts_per_call)

    def replace(self, index: int, error: Exception) -> None:
        """Swap engine index for a fresh, re-synced one (or re-raise error)."""
        with self._lock:
            if self.factory is None or self.restarts >= self.max_restarts:
                raise RuntimeError(
                    f"rollout engine {index} died and cannot be replaced (restarts "
                    f"{self.restarts}/{self.max_restarts}, factory "
                    f"{'set' if self.factory else 'missing'}): {error}"
                ) from error
            self.restarts += 1
            logger.warning("rollout engine %d died (%s: %s); replacing it (restart %d)",
                           index, type(error).__name__, error, self.restarts)
            if not isinstance(error, ActorHung):  # a frozen engine cannot shut itself down
                try:
                    call_engine(self.engines[index], "shutdown", timeout=30)
                except Exception:  # noqa: BLE001 - it is dead already
                    pass
            engine = self.factory(index)  # the factory ends a frozen engine's actor
            if self.on_replace is not None:
                self.on_replace(engine)
            self.engines[index] = engine

    def shutdown(self) -> None:
        for engine in self.engines:
            try:
                call_engine(engine, "shutdown", timeout=30)
            except Exception:  # noqa: BLE001
                logger.warning("engine shutdown failed", exc_info=True)


class RolloutRound:
    """One submitted round: iterate CompletedGroups in prompt order; abort() the rest."""

    def __init__(self, manager: RolloutManager, prompts: list[list[int]], params: SamplingParams,
                 tag: str, prompts_per_call: int):
        self.manager = manager
        self.params = params
        self.request_ids = [f"{tag}-{i}" for i in range(len(prompts))]
        self.produced = GenerationCount()  # this round's share of manager.produced
        self._prompts = prompts
        self._chunks = [list(range(s, min(s + prompts_per_call, len(prompts))))
                        for s in range(0, len(prompts), prompts_per_call)]
        # One lock guards the pending chunks, the in-flight map and the abort flag, so a
        # chunk is either taken before abort() (and aborted by it) or never started.
        self._lock = threading.Lock()
        self._pending = collections.deque(range(len(self._chunks)))  # chunk numbers
        self._inflight: dict[int, int] = {}  # engine index -> chunk number
        self._aborted = False
        self._results: queue.Queue = queue.Queue()  # (kind, chunk number, payload)
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                         for i in range(len(manager.engines))]
        for t in self._threads:
            t.start()

    def _take(self, index: int) -> int | None:
        with self._lock:
            if self._aborted or not self._pending:
                return None
            number = self._pending.popleft()
            self._inflight[index] = number
            return number

    def _worker(self, index: int) -> None:
        while (number := self._take(index)) is not None:
            chunk = self._chunks[number]
            try:
                samples = call_engine(self.manager.engines[index], "generate",
                                      [self._prompts[i] for i in chunk], self.params,
                                      [self.request_ids[i] for i in chunk],
                                      hang_timeout_s=self.manager.hang_timeout_s)
            except Exception as err:  # noqa: BLE001 - sorted into death vs real error below
                with self._lock:
                    self._inflight.pop(index, None)
                    aborted = self._aborted
                if aborted:
                    self._results.put(("done", number, None))
                    return
                if not isinstance(err, ActorHung) and engine_is_healthy(self.manager.engines[index]):
                    self._results.put(("error", number, err))
                    return
                try:
                    self.manager.replace(index, err)
                except Exception as fatal:  # noqa: BLE001 - surfaced by the iterator
                    self._results.put(("error", number, fatal))
                    return
                with self._lock:
                    # First in line again: the iterator is waiting for it, in order.
                    self._pending.appendleft(number)
                continue
            with self._lock:
                self._inflight.pop(index, None)
                self.produced.add_samples(samples)
            self.manager._count(samples)
            self._results.put(("done", number, samples))

    def __iter__(self) -> Iterator[CompletedGroup]:
        ready: dict[int, list[list[Sample]] | None] = {}
        for number in range(len(self._chunks)):
            while number not in ready:
                if self._is_aborted():
                    return
                kind, got, payload = self._results.get()
                if kind == "error":
                    self.abort()
                    raise payload
                ready[got] = payload
            payload = ready.pop(number)
            if payload is None or self._is_aborted():
                return
            for i, samples in zip(self._chunks[number], payload):
                # An aborted group is incomplete: it never leaves the round.
                if any(s.finish_reason == "abort" for s in samples):
                    continue
                yield CompletedGroup(i, self.request_ids[i], samples)

    def _is_aborted(self) -> bool:
        with self._lock:
            return self._aborted

    def abort(self, wait: bool = True) -> None:
        """Stop the round: drop pending chunks, abort in-flight ones, optionally wait for them.

        wait=True returns once every engine call of the round has returned, so `produced`
        (the round's and the manager's) then holds everything the round generated.
        """
        with self._lock:
            self._aborted = True
            self._pending.clear()
            inflight = dict(self._inflight)
        for index, number in inflight.items():
            try:
                call_engine(self.manager.engines[index], "abort",
                            [self.request_ids[i] for i in self._chunks[number]], timeout=60)
            except Exception:  # noqa: BLE001 - a dead engine has nothing to abort
                logger.warning("abort on engine %d failed", index, exc_info=True)
        if wait:
            for t in self._threads:
                t.join()
