"""Dispatch of prompt rounds over several rollout engines, streamed back group by group.

The engines may be in-process objects or Ray actor handles (anything with the
RolloutEngine methods; a handle's methods are called with .remote and awaited). A round's
prompts are cut into chunks; one worker thread per engine takes the next chunk as soon as
its engine is free (least-loaded dispatch), so a slow engine never holds chunks others
could run. Groups come back through `RolloutRound`'s iterator as their chunk completes:
the caller scores them while other chunks still generate and calls `abort()` once it
has enough. An engine whose call fails and whose health check then fails too is replaced
through `factory`, re-synced through `on_replace` (the pool pushes the policy's weights to
it: the manager keeps no copy of the model), and the chunk is retried on it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from typing import Any, Callable, Iterator

from dapo_megatron.rollout.protocol import Sample, SamplingParams

logger = logging.getLogger(__name__)

EngineFactory = Callable[[int], Any]  # engine index -> a fresh engine (or actor handle)
EngineHook = Callable[[Any], None]  # called with a fresh engine before it serves


def call_engine(engine: Any, method: str, *args: Any, timeout: float | None = None) -> Any:
    """engine.method(*args), through .remote + ray.get for Ray actor handles."""
    fn = getattr(engine, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args), timeout=timeout)
    return fn(*args)


def engine_is_healthy(engine: Any) -> bool:
    try:
        return bool(call_engine(engine, "health", timeout=60))
    except Exception:  # noqa: BLE001 - a dead actor / server answers with any error
        return False


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
    """

    def __init__(self, engines: list[Any], factory: EngineFactory | None = None,
                 max_restarts: int = 3, on_replace: EngineHook | None = None):
        if not engines:
            raise ValueError("RolloutManager needs at least one engine")
        self.engines = list(engines)
        self.factory = factory
        self.max_restarts = max_restarts
        self.restarts = 0
        self.on_replace = on_replace
        self._lock = threading.Lock()

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
            try:
                call_engine(self.engines[index], "shutdown", timeout=30)
            except Exception:  # noqa: BLE001 - it is dead already
                pass
            engine = self.factory(index)
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
    """One submitted round: iterate CompletedGroups as they finish; abort() the rest."""

    def __init__(self, manager: RolloutManager, prompts: list[list[int]], params: SamplingParams,
                 tag: str, prompts_per_call: int):
        self.manager = manager
        self.params = params
        self.request_ids = [f"{tag}-{i}" for i in range(len(prompts))]
        self._prompts = prompts
        self._pending: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._aborted = threading.Event()
        self._inflight: dict[int, list[int]] = {}  # engine index -> prompt indices
        self._inflight_lock = threading.Lock()
        chunks = [list(range(s, min(s + prompts_per_call, len(prompts))))
                  for s in range(0, len(prompts), prompts_per_call)]
        for chunk in chunks:
            self._pending.put(chunk)
        self._remaining = len(chunks)
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True)
                         for i in range(len(manager.engines))]
        for t in self._threads:
            t.start()

    def _worker(self, index: int) -> None:
        while not self._aborted.is_set():
            try:
                chunk = self._pending.get_nowait()
            except queue.Empty:
                return
            with self._inflight_lock:
                self._inflight[index] = chunk
            try:
                samples = call_engine(self.manager.engines[index], "generate",
                                      [self._prompts[i] for i in chunk], self.params,
                                      [self.request_ids[i] for i in chunk])
            except Exception as err:  # noqa: BLE001 - sorted into death vs real error below
                with self._inflight_lock:
                    self._inflight.pop(index, None)
                if self._aborted.is_set():
                    self._results.put(("done", chunk, None))
                    return
                if engine_is_healthy(self.manager.engines[index]):
                    self._results.put(("error", chunk, err))
                    return
                try:
                    self.manager.replace(index, err)
                except Exception as fatal:  # noqa: BLE001 - surfaced by the iterator
                    self._results.put(("error", chunk, fatal))
                    return
                self._pending.put(chunk)
                continue
            with self._inflight_lock:
                self._inflight.pop(index, None)
            self._results.put(("done", chunk, samples))

    def __iter__(self) -> Iterator[CompletedGroup]:
        while self._remaining_chunks() > 0:
            kind, chunk, payload = self._results.get()
            with self._inflight_lock:
                self._remaining -= 1
            if kind == "error":
                self.abort()
                raise payload
            if payload is None or self._aborted.is_set():
                continue
            for i, samples in zip(chunk, payload):
                # An aborted group is incomplete: it never leaves the round.
                if any(s.finish_reason == "abort" for s in samples):
                    continue
                yield CompletedGroup(i, self.request_ids[i], samples)

    def _remaining_chunks(self) -> int:
        with self._inflight_lock:
            return self._remaining

    def abort(self, wait: bool = True) -> None:
        """Stop the round: drop pending chunks, abort in-flight ones, optionally wait for them."""
        self._aborted.set()
        while True:
            try:
                self._pending.get_nowait()
            except queue.Empty:
                break
            with self._inflight_lock:
                self._remaining -= 1
        with self._inflight_lock:
            inflight = dict(self._inflight)
        for index, chunk in inflight.items():
            try:
                call_engine(self.manager.engines[index], "abort",
                            [self.request_ids[i] for i in chunk], timeout=60)
            except Exception:  # noqa: BLE001 - a dead engine has nothing to abort
                logger.warning("abort on engine %d failed", index, exc_info=True)
        if wait:
            for t in self._threads:
                t.join()
