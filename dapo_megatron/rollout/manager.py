"""Dispatch of prompt rounds over several rollout engines, streamed back group by group.

The engines may be in-process objects or Ray actor handles (anything with the
RolloutEngine methods; a handle's methods are called with .remote and awaited). A round's
prompts are cut into chunks; `calls_per_engine` worker threads per engine each take the
next chunk as soon as their previous call returns (least-loaded dispatch), so a slow
engine never holds chunks others could run, and an engine that serves many requests at
once (SGLang) has several calls in flight: the longest response of one call does not hold
up the next. Groups come back through `RolloutRound`'s iterator in prompt order, chunk by
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

Partial rollouts: a round may continue carried responses (`resume`, protocol.Resume), and
after `abort(wait=True)` its `leftovers()` are the prompts it generated but did not yield,
aborted responses included with their tokens, for the caller to carry (rollout/partial.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import threading
from typing import Any, Callable, Iterator

from dapo_megatron.rollout.protocol import Resume, Sample, SamplingParams
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
    continued: calls that continued a carried partial response (partial rollouts): their
    tokens count, the response itself was counted when it started.
    """

    responses: int = 0
    tokens: int = 0
    aborted: int = 0
    aborted_tokens: int = 0
    continued: int = 0

    def add_samples(self, samples_per_prompt: list[list[Sample]],
                    resumed: list[bool] | None = None) -> None:
        """resumed[i]: prompt i's samples continue carried responses (its Samples hold the
        new tokens only)."""
        for i, samples in enumerate(samples_per_prompt):
            for s in samples:
                if not s.token_ids:
                    continue
                if resumed is not None and resumed[i]:
                    self.continued += 1
                else:
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
                 hang_timeout_s: float | None = None, calls_per_engine: int = 1):
        if not engines:
            raise ValueError("RolloutManager needs at least one engine")
        if calls_per_engine < 1:
            raise ValueError(f"calls_per_engine must be >= 1, got {calls_per_engine}")
        self.engines = list(engines)
        self.calls_per_engine = calls_per_engine
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

    def _count(self, samples_per_prompt: list[list[Sample]], resumed: list[bool] | None = None) -> None:
        with self._lock:
            self._produced.add_samples(samples_per_prompt, resumed)

    def submit(self, prompts: list[list[int]], params: SamplingParams, tag: str,
               prompts_per_call: int | None = None,
               resume: list[list[Resume] | None] | None = None) -> "RolloutRound":
        """Start generating; prompt i gets request id f"{tag}-{i}" (unique per round).

        resume[i] (not None): continue those carried responses of prompt i instead of
        sampling params.n fresh ones (RolloutEngine.generate)."""
        if prompts_per_call is None:
            # Two chunks per call slot at least, so an early abort saves real work.
            slots = len(self.engines) * self.calls_per_engine
            prompts_per_call = max(1, math.ceil(len(prompts) / (2 * slots)))
        return RolloutRound(self, prompts, params, tag, prompts_per_call, resume)

    def replace(self, index: int, error: Exception, failed: Any = None) -> None:
        """Swap engine index for a fresh, re-synced one (or re-raise error).

        failed: the engine the caller saw fail; if another call on it has replaced it
        already, nothing more is done (several calls per engine fail together)."""
        with self._lock:
            if failed is not None and self.engines[index] is not failed:
                return
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
                 tag: str, prompts_per_call: int, resume: list[list[Resume] | None] | None = None):
        self.manager = manager
        self.params = params
        self.request_ids = [f"{tag}-{i}" for i in range(len(prompts))]
        self.produced = GenerationCount()  # this round's share of manager.produced
        self._prompts = prompts
        self._resume = resume if resume is not None else [None] * len(prompts)
        if len(self._resume) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(self._resume)} resume entries")
        self._chunks = [list(range(s, min(s + prompts_per_call, len(prompts))))
                        for s in range(0, len(prompts), prompts_per_call)]
        # One lock guards the pending chunks, the in-flight map and the abort flag, so a
        # chunk is either taken before abort() (and aborted by it) or never started.
        self._lock = threading.Lock()
        self._pending = collections.deque(range(len(self._chunks)))  # chunk numbers
        self._inflight: dict[tuple[int, int], int] = {}  # (engine index, call slot) -> chunk number
        self._aborted = False
        self._results: queue.Queue = queue.Queue()  # (kind, chunk number, payload)
        self._received: dict[int, list[list[Sample]] | None] = {}  # chunk number -> its samples
        self._yielded: set[int] = set()  # prompt indices handed to the caller
        self._threads = [threading.Thread(target=self._worker, args=(i, slot), daemon=True)
                         for i in range(len(manager.engines))
                         for slot in range(manager.calls_per_engine)]
        for t in self._threads:
            t.start()

    def _take(self, key: tuple[int, int]) -> int | None:
        with self._lock:
            if self._aborted or not self._pending:
                return None
            number = self._pending.popleft()
            self._inflight[key] = number
            return number

    def _worker(self, index: int, slot: int) -> None:
        key = (index, slot)
        while (number := self._take(key)) is not None:
            chunk = self._chunks[number]
            engine = self.manager.engines[index]
            args = [[self._prompts[i] for i in chunk], self.params, [self.request_ids[i] for i in chunk]]
            resume = [self._resume[i] for i in chunk]
            if any(r is not None for r in resume):
                args.append(resume)  # engines without partial rollouts keep their 3-arg generate
            try:
                samples = call_engine(engine, "generate", *args, hang_timeout_s=self.manager.hang_timeout_s)
            except Exception as err:  # noqa: BLE001 - sorted into death vs real error below
                with self._lock:
                    self._inflight.pop(key, None)
                    aborted = self._aborted
                if aborted:
                    self._results.put(("done", number, None))
                    return
                # the engine that failed: another call may have replaced it already
                if not isinstance(err, ActorHung) and engine_is_healthy(engine):
                    self._results.put(("error", number, err))
                    return
                try:
                    self.manager.replace(index, err, failed=engine)
                except Exception as fatal:  # noqa: BLE001 - surfaced by the iterator
                    self._results.put(("error", number, fatal))
                    return
                with self._lock:
                    # First in line again: the iterator is waiting for it, in order.
                    self._pending.appendleft(number)
                continue
            resumed = [r is not None for r in resume]
            with self._lock:
                self._inflight.pop(key, None)
                self.produced.add_samples(samples, resumed)
            self.manager._count(samples, resumed)
            self._results.put(("done", number, samples))

    def __iter__(self) -> Iterator[CompletedGroup]:
        for number in range(len(self._chunks)):
            while number not in self._received:
                if self._is_aborted():
                    return
                kind, got, payload = self._results.get()
                if kind == "error":
                    self.abort()
                    raise payload
                self._received[got] = payload
            payload = self._received[number]
            if payload is None or self._is_aborted():
                return
            for i, samples in zip(self._chunks[number], payload):
                # An aborted group is incomplete: it never leaves the round.
                if any(s.finish_reason == "abort" for s in samples):
                    continue
                self._yielded.add(i)
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
        by_engine: dict[int, list[str]] = {}
        for (index, _slot), number in inflight.items():
            by_engine.setdefault(index, []).extend(self.request_ids[i] for i in self._chunks[number])
        for index, request_ids in by_engine.items():
            try:
                call_engine(self.manager.engines[index], "abort", request_ids, timeout=60)
            except Exception:  # noqa: BLE001 - a dead engine has nothing to abort
                logger.warning("abort on engine %d failed", index, exc_info=True)
        if wait:
            for t in self._threads:
                t.join()

    def leftovers(self) -> list[CompletedGroup]:
        """After abort(wait=True): every prompt the engines generated for but the caller
        never got, in prompt order: complete groups left unconsumed and groups with aborted
        samples (their tokens so far). A continued prompt's samples hold its new tokens only.
        Prompts whose chunk never started (or was lost with an engine) are not listed."""
        with self._lock:
            if not self._aborted or any(t.is_alive() for t in self._threads):
                raise RuntimeError("RolloutRound.leftovers() needs abort(wait=True) first")
        while not self._results.empty():
            kind, got, payload = self._results.get_nowait()
            if kind == "done":
                self._received.setdefault(got, payload)
        out = []
        for number in sorted(self._received):
            payload = self._received[number]
            if payload is None:
                continue
            for i, samples in zip(self._chunks[number], payload):
                if i not in self._yielded:
                    out.append(CompletedGroup(i, self.request_ids[i], samples))
        return out
