"""``RewardPool``: batch scoring in worker processes with a hard per-item timeout.

Scoring runs in ``num_workers`` long-lived processes (``forkserver`` by default: a clean
interpreter with this package and sympy preloaded, so a replacement worker starts in
milliseconds and inherits nothing from the trainer). The parent hands each idle worker
a chunk of items and reads one result per item; the clock restarts at every result, so
every item gets ``timeout_s`` of its own. A worker that overruns is SIGKILLed, its
current item scores -1 with reason "timeout" (counted in ``timeouts``), the rest of its
chunk goes back to the queue, and a fresh worker takes its place: one pathological
answer costs at most ``timeout_s`` and the pool keeps serving. An item whose worker
crashes is retried once on a fresh worker (a crash is the machine's fault as often as
the answer's: an OOM kill, a signal) and scores -1 with reason "worker crashed" only if
it crashes again; every crash is counted (``crashes``, in the step metrics). Workers
ignore SIGINT/SIGTERM: the trainer decides when to stop, and a signal to the whole
process group must not crash the batch in flight. A reference answer longer than
``score.MAX_REFERENCE_CHARS`` is refused in the parent without reaching a worker.

Workers run with a memory cap (``RLIMIT_AS``) and no core dumps, so a runaway
expression fails inside the worker instead of swapping the node.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import time
import weakref
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Sequence

from dapo_megatron.reward.extract import DEFAULT_MAX_SCAN_CHARS
from dapo_megatron.reward.latex_parser import DEFAULT_LIMITS, ParseLimits
from dapo_megatron.reward.score import (CORRECT_SCORE, INCORRECT_SCORE, RewardResult, compute_score,
                                        reference_too_long)

logger = logging.getLogger(__name__)

_READY = "ready"
# Worker start-up (interpreter + sympy import) is not charged to any item; it has its
# own, generous bound so a broken environment still fails loudly.
_STARTUP_TIMEOUT_S = 120.0


def _harden(memory_mb: int | None) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if memory_mb:
            limit = int(memory_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError) as exc:  # not fatal: the timeout still holds
        logger.warning("reward worker: could not set resource limits: %s", exc)


def _worker_main(conn, score_fn, score_kwargs, memory_mb, preload_sympy) -> None:
    """Worker loop: receive chunks of (index, response, ground_truth), send results."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent stops workers (SIGKILL)
        signal.signal(sig, signal.SIG_IGN)
    _harden(memory_mb)
    if preload_sympy:
        from dapo_megatron.reward import symbolic

        symbolic._sympy()
    conn.send(_READY)
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for index, response, ground_truth in chunk:
            try:
                result = score_fn(response, ground_truth, **score_kwargs)
            except Exception as exc:  # noqa: BLE001 - a scorer bug must not kill the pool
                result = RewardResult.failure(
                    f"scorer error: {type(exc).__name__}: {exc}",
                    score=score_kwargs.get("incorrect_score", INCORRECT_SCORE),
                )
            conn.send((index, result.score, result.correct, result.answer, result.reason))


class _Worker:
    __slots__ = ("process", "conn", "ready", "inflight", "deadline")

    def __init__(self, process, conn):
        self.process, self.conn = process, conn
        self.ready = False
        self.inflight: deque[int] = deque()
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S


def _shutdown(workers: list) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    for w in workers:
        w.process.join(timeout=1.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(timeout=1.0)
        w.conn.close()
    workers.clear()


class RewardPool:
    """Score batches of responses in worker processes with a hard per-item timeout.

    Args:
        num_workers: worker processes (default: min(4, CPU count)).
        timeout_s: wall-clock seconds one item may take before its worker is killed.
        chunk_size: most items handed to a worker at once (amortises IPC).
        start_method: "forkserver" (default) or "spawn"; never "fork", which would copy
            the trainer's threads and CUDA state.
        max_scan_chars: tail of each response that is searched for the answer; the
            parent trims responses to it before sending them.
        limits: parsing/evaluation bounds passed to ``compute_score``.
        worker_memory_mb: address-space cap per worker (None: no cap).
        preload_sympy: import sympy when a worker starts rather than on its first
            symbolic answer (keeps that import out of any item's timeout).
        correct_score, incorrect_score: reward values (DAPO: +1 / -1); timeouts and
            crashes score ``incorrect_score``.
        score_fn: a picklable module-level ``fn(response, ground_truth, **kw)`` returning
            ``RewardResult``; default ``compute_score`` (tests substitute slow ones).

    Counters (cumulative): ``items_scored``, ``timeouts``, ``crashes``,
    ``workers_replaced``, ``oversized_references``; ``stats()`` returns them as a dict.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        *,
        chunk_size: int = 64,
        start_method: str = "forkserver",
        max_scan_chars: int = DEFAULT_MAX_SCAN_CHARS,
        limits: ParseLimits = DEFAULT_LIMITS,
        worker_memory_mb: int | None = 4096,
        preload_sympy: bool = True,
        correct_score: float = CORRECT_SCORE,
        incorrect_score: float = INCORRECT_SCORE,
        score_fn: Callable[..., RewardResult] | None = None,
    ):
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"reward num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0, got {timeout_s}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"reward start_method must be 'forkserver' or 'spawn', got {start_method!r}"
            )
        self.num_workers, self.timeout_s = num_workers, float(timeout_s)
        self.chunk_size = chunk_size
        self.max_scan_chars = max_scan_chars
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            preload = ["dapo_megatron.reward.score"] + (["sympy"] if preload_sympy else [])
            self._ctx.set_forkserver_preload(preload)
        self._score_fn = score_fn or compute_score
        self._score_kwargs = {} if score_fn else {
            "max_scan_chars": max_scan_chars, "limits": limits,
            "correct_score": correct_score, "incorrect_score": incorrect_score,
        }
        self.incorrect_score = incorrect_score
        self._memory_mb, self._preload_sympy = worker_memory_mb, preload_sympy
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.items_scored = self.timeouts = self.crashes = self.workers_replaced = 0
        self.oversized_references = 0
        self._retried: set[int] = set()  # items of the current batch already retried once

    # -- worker lifecycle ----------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._score_fn, self._score_kwargs, self._memory_mb,
                  self._preload_sympy),
            daemon=True,
            name="reward-worker",
        )
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn)
        self._workers.append(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()
        self._workers.remove(worker)

    def start(self) -> "RewardPool":
        """Start the workers now and wait until they are ready (optional: ``score`` does it)."""
        while len(self._workers) < self.num_workers:
            self._start_worker()
        self._run([], [], [])
        return self

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def stats(self) -> dict[str, int]:
        return {
            "items_scored": self.items_scored,
            "timeouts": self.timeouts,
            "crashes": self.crashes,
            "workers_replaced": self.workers_replaced,
            "oversized_references": self.oversized_references,
        }

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        _shutdown(self._workers)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring -------------------------------------------------------------------------
    def score(
        self, responses: Sequence[object], ground_truths: Sequence[str]
    ) -> list[RewardResult]:
        """Score ``responses[i]`` against ``ground_truths[i]``; results in input order.

        Every item gets a result: a timed-out item is -1 with reason "timeout", one whose
        worker died is -1 with reason "worker crashed".
        """
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"reward score: {len(responses)} responses but {len(ground_truths)} ground_truths"
            )
        tail = self.max_scan_chars
        trimmed = [r[-tail:] if isinstance(r, str) and len(r) > tail else r for r in responses]
        results: list[RewardResult | None] = [None] * len(responses)
        refs = [str(g) for g in ground_truths]
        todo = []
        for i, ref in enumerate(refs):
            too_long = reference_too_long(ref)
            if too_long:
                results[i] = RewardResult.failure(too_long, score=self.incorrect_score)
                self.oversized_references += 1
            else:
                todo.append(i)
        if len(todo) < len(refs):
            logger.warning("reward: %d reference answers over the size bound scored %s without "
                           "scoring (%s)", len(refs) - len(todo), self.incorrect_score,
                           next(r.reason for r in results if r is not None))
        while len(self._workers) < self.num_workers:
            self._start_worker()
        try:
            if todo:
                sub: list[RewardResult | None] = [None] * len(todo)
                self._run([trimmed[i] for i in todo], [refs[i] for i in todo], sub)
                for i, r in zip(todo, sub):
                    results[i] = r
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, an error): workers may still be busy with
            # this batch, so none can be trusted with the next one.
            _shutdown(self._workers)
            raise
        self.items_scored += len(results)
        return results  # type: ignore[return-value]

    def _fail_current(self, worker: _Worker, reason: str, pending: deque, results: list) -> None:
        if not worker.ready:
            raise RuntimeError(
                f"reward worker exited during start-up (exit code {worker.process.exitcode}); "
                "run compute_score in-process to see the error"
            )
        if worker.inflight:
            index = worker.inflight.popleft()
            pending.extendleft(reversed(worker.inflight))
            if reason != "timeout" and index not in self._retried:
                self._retried.add(index)
                pending.appendleft(index)  # one retry, first in line on the fresh worker
            else:
                results[index] = RewardResult.failure(reason, score=self.incorrect_score)
        if reason == "timeout":
            self.timeouts += 1
            logger.warning("reward item timed out after %.1fs; worker replaced", self.timeout_s)
        else:
            self.crashes += 1
            logger.warning("reward worker died (%s); replaced", reason)
        self._discard(worker)
        self._start_worker()
        self.workers_replaced += 1

    def _run(self, responses: list, ground_truths: list, results: list) -> None:
        pending = deque(range(len(responses)))
        self._retried = set()
        while True:
            for w in list(self._workers):  # dispatch to idle ready workers
                if w.ready and not w.inflight and pending:
                    share = math.ceil(len(pending) / self.num_workers)
                    size = min(self.chunk_size, share, len(pending))
                    chunk = [pending.popleft() for _ in range(size)]
                    w.inflight.extend(chunk)
                    w.deadline = time.monotonic() + self.timeout_s
                    try:
                        w.conn.send([(i, responses[i], ground_truths[i]) for i in chunk])
                    except OSError:  # died while idle: its first item is reported, the rest retried
                        self._fail_current(w, "worker crashed", pending, results)
            waiting = [w for w in self._workers if w.inflight or not w.ready]
            if not waiting:
                if not pending:
                    return
                continue  # a worker was replaced during dispatch: dispatch again
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            by_conn = {w.conn: w for w in waiting}
            for conn in wait(list(by_conn), timeout=timeout):
                worker = by_conn[conn]
                try:
                    while conn.poll():
                        message = conn.recv()
                        if message == _READY:
                            worker.ready = True
                            continue
                        index, score, correct, answer, reason = message
                        if not worker.inflight or worker.inflight[0] != index:
                            raise RuntimeError(f"reward worker returned item {index} out of order")
                        worker.inflight.popleft()
                        results[index] = RewardResult(score, correct, answer, reason)
                        worker.deadline = time.monotonic() + self.timeout_s
                except (EOFError, OSError):
                    self._fail_current(worker, "worker crashed", pending, results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.inflight and now > w.deadline:
                    self._fail_current(w, "timeout", pending, results)
                elif not w.ready and now > w.deadline:
                    raise RuntimeError(
                        f"reward worker did not start within {_STARTUP_TIMEOUT_S:.0f}s "
                        f"(start method {self._ctx.get_start_method()!r})"
                    )
