"""The rollout engines of a run: Ray actors behind a `RolloutManager`, made from the config.

`generate_streaming` yields each prompt's group as soon as its chunk completes, so the
controller scores while other chunks still generate, and `abort_all` stops the rest once
the train batch is full. A dead engine is replaced by the manager (through `_start_engine`),
given the current weights, and its chunk retried.
"""

from __future__ import annotations

import logging

from dapo_megatron.rollout.manager import RolloutManager
from dapo_megatron.rollout.protocol import SamplingParams

logger = logging.getLogger(__name__)

# Sequences decoded together by one embedded engine call (its KV-cache batch).
EMBEDDED_BATCH_ROWS = 256


class EnginePool:
    def __init__(self, cfg, hf_config: dict) -> None:
        self.cfg = cfg
        self.hf_config = hf_config
        n = cfg.rollout.num_engines or max(1, cfg.parallel.nodes)
        self.manager = RolloutManager([self._start_engine(i) for i in range(n)], factory=self._start_engine,
                                      max_restarts=cfg.rollout.max_engine_restarts)
        self._round = None

    @property
    def engines(self) -> list:
        return self.manager.engines

    @property
    def restarts(self) -> int:
        return self.manager.restarts

    def _start_engine(self, index: int):
        r = self.cfg.rollout
        if r.engine == "sglang":
            from dapo_megatron.rollout.sglang_engine import create_sglang_actor

            return create_sglang_actor(self.cfg, self.hf_config, engine_index=index)
        from dapo_megatron.rollout.embedded import create_embedded_actor

        return create_embedded_actor(self.hf_config, num_cpus=r.engine_num_cpus,
                                     max_batch_size=EMBEDDED_BATCH_ROWS, num_threads=r.engine_num_cpus)

    def update_weights(self, buckets: list, version: int) -> None:
        self.manager.update_weights(buckets, version)

    def generate_streaming(self, prompts: list[list[int]], params: SamplingParams, tag: str):
        """Yield ([prompt index], [its n samples]) for each group as it completes."""
        per_call = max(1, EMBEDDED_BATCH_ROWS // params.n)
        per_call = min(per_call, max(1, -(-len(prompts) // (2 * len(self.engines)))))
        self._round = self.manager.submit(prompts, params, tag, prompts_per_call=per_call)
        try:
            for group in self._round:
                yield [group.prompt_index], [group.samples]
        finally:
            self._round = None

    def abort_all(self) -> None:
        """Abort the chunks of the current round that are still generating."""
        if self._round is not None:
            self._round.abort(wait=True)

    def shutdown(self) -> None:
        """Let each engine end its own processes first: an SGLang server runs in its own
        session and outlives a killed actor, holding GPU memory (SGLangEngine.shutdown
        ends its whole process group); then kill the actors."""
        import ray

        self.manager.shutdown()
        for engine in self.engines:
            try:
                ray.kill(engine)
            except Exception:  # noqa: BLE001 - already gone
                pass
