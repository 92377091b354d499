"""The rollout engines of a run: Ray actors behind a `RolloutManager`, made from the config.

`generate_streaming` yields each prompt's group as soon as its chunk completes, so the
controller scores while other chunks still generate, and `abort_all` stops the rest once
the train batch is full. `sync_weights` opens a weight-update session on each engine and
has the weight source (the policy) push its buckets into it. A dead engine is replaced by
the manager (through `_start_engine`), re-synced from the same source, and its chunk
retried: nothing in the driver keeps a copy of the weights.
"""

from __future__ import annotations

import logging
from typing import Protocol

from dapo_megatron import dtypes
from dapo_megatron.resolve import EngineSlot, engine_layout
from dapo_megatron.rollout.manager import RolloutManager, call_engine
from dapo_megatron.rollout.protocol import SamplingParams
from dapo_megatron.watchdog import ActorHung, ping_patience

logger = logging.getLogger(__name__)

# Sequences decoded together by one embedded engine call (its KV-cache batch). SGLang
# schedules its own batches, so its calls have no row cap.
EMBEDDED_BATCH_ROWS = 256
# rollout.calls_per_engine=0: calls in flight per engine. The embedded engine decodes one
# call at a time (a second would only wait); SGLang serves many requests at once.
AUTO_CALLS_PER_ENGINE = {"embedded": 1, "sglang": 4}


def calls_per_engine(rollout_cfg) -> int:
    """Generate calls in flight per engine (rollout.calls_per_engine, 0: by engine kind)."""
    return rollout_cfg.calls_per_engine or AUTO_CALLS_PER_ENGINE[rollout_cfg.engine]


class WeightSource(Protocol):
    def push_weights(self, engines: list, version: int) -> dict[str, float]:
        """Push a full set of weights into engines whose update session is open."""
        ...


class EnginePool:
    def __init__(self, cfg, hf_config: dict, weight_source: WeightSource | None = None,
                 slots: tuple[EngineSlot, ...] | None = None, policy_pg=None) -> None:
        """slots: where each engine runs (dapo_megatron.resolve; default: resolved from cfg).
        policy_pg: the policy's placement group, whose bundles colocated engines share."""
        self.cfg = cfg
        self.hf_config = hf_config
        self.weight_source = weight_source
        self.weight_version: int | None = None  # of the last completed sync
        self.slots = slots if slots is not None else engine_layout(cfg)
        self.policy_pg = policy_pg
        engines = [self._start_engine(i) for i in range(len(self.slots))]
        _wait_started(engines)
        self.manager = RolloutManager(engines, factory=self._replacement,
                                      max_restarts=cfg.rollout.max_engine_restarts,
                                      on_replace=self._resync, hang_timeout_s=cfg.rollout.hang_timeout_s,
                                      calls_per_engine=calls_per_engine(cfg.rollout))
        self._round = None
        self._leftovers: list = []  # of the last aborted round (rollout/partial.py carries them)

    @property
    def engines(self) -> list:
        return self.manager.engines

    @property
    def restarts(self) -> int:
        return self.manager.restarts

    def _replacement(self, index: int):
        _kill(self.engines[index])  # a frozen engine must not keep its CPUs / GPU memory
        engine = self._start_engine(index)
        _wait_started([engine])
        return engine

    @property
    def produced(self):
        """Every response and token the engines generated so far (a `GenerationCount`)."""
        return self.manager.produced

    def _start_engine(self, index: int):
        slot, r = self.slots[index], self.cfg.rollout
        placement = {}
        if slot.policy_bundle is not None and self.policy_pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # Colocated: on the node of the training rank whose GPUs the engine serves.
            placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.policy_pg, placement_group_bundle_index=slot.policy_bundle)
        if r.engine == "sglang":
            from dapo_megatron.rollout.sglang_engine import create_sglang_actor

            return create_sglang_actor(self.cfg, self.hf_config, engine_index=index, slot=slot,
                                       max_concurrency=4 + calls_per_engine(r), **placement)
        from dapo_megatron.rollout.embedded import create_embedded_actor

        # Room for abort() and a sync's calls beside the generate calls in flight.
        return create_embedded_actor(self.hf_config, num_cpus=slot.resources["CPU"],
                                     max_batch_size=EMBEDDED_BATCH_ROWS, num_threads=r.engine_num_cpus,
                                     dtype=dtypes.engine_dtype(self.cfg.model.params_dtype),
                                     max_concurrency=8 + calls_per_engine(r))

    # ------------------------------------------------------------------ weights and memory
    def sync_weights(self, version: int, engines: list | None = None) -> dict[str, float]:
        """Push the source's weights into ``engines`` (default: all), one weight-update
        session per engine; returns the push's stats.

        An engine that dies during a full sync is replaced (within
        rollout.max_engine_restarts) and the sync is run again on the whole pool, so every
        engine ends with the same, complete weights.
        """
        if self.weight_source is None:
            raise RuntimeError("EnginePool.sync_weights: no weight source (pass weight_source=)")
        if engines is not None:
            return self._push(version, list(engines))
        while True:
            try:
                stats = self._push(version, list(self.engines))
                self.weight_version = version
                return stats
            except Exception as err:  # noqa: BLE001 - sorted into engine death vs a real error
                patience = ping_patience(self.cfg.rollout.hang_timeout_s)
                states = [_liveness(e, patience) for e in self.engines]
                if all(state == "alive" for state in states):
                    raise
                self.weight_version = None  # replacements get their weights from the retry
                for i, state in enumerate(states):
                    if state == "frozen":  # replace() then skips asking it to shut down
                        why = ActorHung(f"weight sync ({type(err).__name__}): rollout engine {i} does not "
                                        f"answer a ping within {patience:.0f} s: it is frozen", i)
                        self.manager.replace(i, why)  # _replacement kills its actor
                    elif state == "dead":
                        self.manager.replace(i, err)

    def _push(self, version: int, engines: list) -> dict[str, float]:
        timeout = self.cfg.rollout.hang_timeout_s
        _on_all(engines, "begin_weight_update", version, timeout=timeout)
        stats = self.weight_source.push_weights(engines, version)
        _on_all(engines, "end_weight_update", timeout=timeout)
        return stats

    def _resync(self, engine) -> None:
        """A replacement engine gets the current weights by the same push as a step's sync."""
        if self.weight_version is not None:
            self.sync_weights(self.weight_version, [engine])

    def release_memory(self) -> None:
        """Give the accelerator memory to training (colocated; a no-op where nothing is held)."""
        _on_all(self.engines, "release_memory")

    def resume_memory(self, tags: list[str]) -> None:
        """Take back what release_memory freed: ["weights"] before a sync, ["kv_cache"] after."""
        _on_all(self.engines, "resume_memory", tags)

    def generate_streaming(self, prompts: list[list[int]], params: SamplingParams, tag: str,
                           resume: list | None = None):
        """Yield ([prompt index], [its n samples]) for each group as it completes.

        resume[i] (not None): continue those carried responses of prompt i (protocol.Resume);
        its group then holds their new tokens only."""
        # Two chunks per call slot, so an early abort saves real work.
        slots = len(self.engines) * self.manager.calls_per_engine
        per_call = max(1, -(-len(prompts) // (2 * slots)))
        if self.cfg.rollout.engine == "embedded":
            per_call = min(per_call, max(1, EMBEDDED_BATCH_ROWS // params.n))
        self._leftovers = []
        self._round = self.manager.submit(prompts, params, tag, prompts_per_call=per_call, resume=resume)
        try:
            for group in self._round:
                yield [group.prompt_index], [group.samples]
        finally:
            self._round = None

    def abort_all(self) -> None:
        """Abort the chunks of the current round that are still generating; what the round
        generated but did not yield is then `take_leftovers()`."""
        if self._round is not None:
            self._round.abort(wait=True)
            self._leftovers = self._round.leftovers()

    def take_leftovers(self) -> list:
        """The last aborted round's unyielded groups (`RolloutRound.leftovers`), once."""
        out, self._leftovers = self._leftovers, []
        return out

    def shutdown(self) -> None:
        """Let each engine end its own processes first: an SGLang server runs in its own
        session and outlives a killed actor, holding GPU memory (SGLangEngine.shutdown
        ends its whole process group); then kill the actors."""
        self.manager.shutdown()
        for engine in self.engines:
            _kill(engine)


def _on_all(engines: list, method: str, *args, timeout: float | None = None) -> None:
    """engine.method(*args) on every engine, at once for Ray actors; waits for all."""
    import ray

    remote = [e for e in engines if isinstance(e, ray.actor.ActorHandle)]
    for e in engines:
        if not isinstance(e, ray.actor.ActorHandle):
            getattr(e, method)(*args)
    if remote:  # ray.get would start a Ray instance even for an empty list
        ray.get([getattr(e, method).remote(*args) for e in remote], timeout=timeout)


def _wait_started(engines: list, timeout: float = 1800.0) -> None:
    """Block until every new engine actor answers: start-up (imports, model build, an SGLang
    server's launch) is not a hang, so hang timeouts only apply from here on."""
    import ray

    for engine in engines:
        if isinstance(engine, ray.actor.ActorHandle):
            call_engine(engine, "get_weight_version", timeout=timeout)


def _liveness(engine, timeout: float = 60.0) -> str:
    """"alive" when the engine (its actor) answers at all within timeout (unlike health(),
    also mid-sync), "frozen" when it does not answer in time, "dead" when the call fails."""
    import ray

    try:
        call_engine(engine, "get_weight_version", timeout=timeout)
        return "alive"
    except ray.exceptions.GetTimeoutError:
        return "frozen"
    except Exception:  # noqa: BLE001 - a dead actor answers with an error of any kind
        return "dead"


def _kill(engine) -> None:
    """End an engine actor (in-process engines have nothing to kill; ray.kill on them would
    start a Ray instance)."""
    import ray

    if isinstance(engine, ray.actor.ActorHandle):
        try:
            ray.kill(engine)
        except Exception:  # noqa: BLE001 - already gone
            pass
