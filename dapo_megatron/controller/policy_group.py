"""The Megatron policy as a group of Ray actors, one per training rank.

Every rank receives the same calls (Megatron ranks run collectives together); results
that exist once (metrics) are taken from rank 0, which the policy guarantees holds them
(metrics are all-reduced). Log-probs never leave the ranks, and weights never come back:
each rank pushes what it sources to the engines itself.
"""

from __future__ import annotations

import logging

import ray

from dapo_megatron.controller.batch import RolloutBatch
from dapo_megatron.ports import listening_store
from dapo_megatron.watchdog import ActorHung, get_watching

logger = logging.getLogger(__name__)


class PolicyHung(RuntimeError):
    """A policy rank stopped answering during a call (frozen, not busy)."""


class PolicyGroup:
    def __init__(self, cfg, hf_config: dict, wait: bool = True) -> None:
        """wait=False returns once the actors are placed, while they still build the model
        (the engines start meanwhile); call wait_ready() before any other call."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dapo_megatron.controller.policy_worker import PolicyWorker

        self.cfg = cfg
        world = cfg.parallel.world_size
        use_gpu = _use_gpu(cfg)
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        # One bundle per rank; PACK puts consecutive ranks (a TP group) on one node.
        self.pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        # Held here for the run: the driver hosts the ranks' rendezvous store.
        self._store, master_addr, master_port = rendezvous(world)
        # Every call runs in the default group, one at a time on one thread, as Megatron
        # needs; the watchdog's ping gets a thread of its own ("watch").
        actor_cls = ray.remote(concurrency_groups={"watch": 1})(PolicyWorker)
        self.workers = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(cfg, hf_config, rank, world, master_addr, master_port, self._store is not None)
            for rank in range(world)
        ]
        self._ready = [w.ready.remote() for w in self.workers]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every rank has built its model (start-up is not a hang: no watchdog)."""
        if self._ready is None:
            return
        ray.get(self._ready)
        self._ready = None
        cfg = self.cfg
        logger.info("policy: %d Megatron ranks up (tp=%d pp=%d ep=%d dp=%d)", len(self.workers), cfg.parallel.tp,
                    cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.data_parallel_size)

    def _all(self, method: str, *args):
        """method(*args) on every rank; a rank frozen in it (see trainer.hang_timeout_s)
        ends the run with PolicyHung instead of waiting forever."""
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        try:
            return get_watching(refs, self.workers, ping="alive", hang_timeout_s=self.cfg.trainer.hang_timeout_s,
                                what=f"policy {method}()", names=[f"policy rank {r}" for r in range(len(refs))])
        except ActorHung as hung:
            raise PolicyHung(
                f"{hung}. The run stops here: a frozen rank cannot take part in a checkpoint, "
                "so the newest checkpoint on disk is the one to resume from; rerun the same command "
                "to resume") from None

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """One policy update. The ranks compute pi_old, the train/inference mismatch, the
        rollout correction and the reference log-probs; only metrics come back."""
        return self._all("train_step", ray.put(batch))[0]

    def push_weights(self, engines: list, version: int) -> dict[str, float]:
        """Every rank sends the weights it sources straight to the engines (no copy passes
        through the driver); returns the bytes sent and the slowest rank's seconds."""
        per_rank = self._all("push_weights", list(engines), version)
        return {"bytes": sum(m["bytes"] for m in per_rank), "seconds": max(m["seconds"] for m in per_rank)}

    def onload(self) -> None:
        """Bring the training state back to the GPUs (no-op on CPU)."""
        self._all("onload")

    def offload(self) -> None:
        """Move the training state to host memory (no-op on CPU)."""
        self._all("offload")

    def save(self, path: str, extra_state: dict) -> None:
        self._all("save", path, extra_state)

    def load(self, path: str) -> dict:
        return self._all("load", path)[0]

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            ray.util.remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass


def _use_gpu(cfg) -> bool:
    if cfg.trainer.device == "cpu":
        return False
    if cfg.trainer.device == "cuda":
        return True
    return bool(ray.cluster_resources().get("GPU", 0))


def rendezvous(world: int) -> tuple[object | None, str, int]:
    """Where the ranks' torch.distributed rendezvous store listens: (the store, which this
    process hosts for the run, address, port).

    The driver opens the store on every interface, on a port the kernel picks as it opens it,
    so no other process can take the port between its choice and its use, as it could take
    the port a ``free_port()`` answer named before rank 0 bound it (two runs starting side
    by side did: EADDRINUSE). Every rank joins as a client, from any node: the driver runs on
    a node of the Ray cluster (slurm/ starts it on the head node) at the address Ray reports.
    One rank needs none (``init_parallel`` uses an in-process store)."""
    if world == 1:
        return None, "127.0.0.1", 0
    store = listening_store(world)
    return store, ray.util.get_node_ip_address(), store.port
