"""One Megatron training rank inside a Ray actor.

The actor sets up torch.distributed and Megatron's parallel state from the rank, world
size and master address the controller hands it, builds the policy, and translates the
controller's `RolloutBatch` into the policy's `PolicyBatch` ([batch, seq] tensors).
"""

from __future__ import annotations

import os

import ray
import torch

from dapo_megatron import malloc
from dapo_megatron.controller.batch import RolloutBatch


def to_policy_batch(batch: RolloutBatch, *, with_engine_logprobs: bool = True, pad_id: int = 0):
    """[batch, seq] tensors: the response mask covers response tokens of unmasked samples,
    and the engine's per-token log-probs sit at the positions of the tokens they score."""
    from dapo_megatron.policy.microbatch import PolicyBatch

    masks, engines = [], []
    for i, (ids, p) in enumerate(zip(batch.input_ids, batch.prompt_lengths)):
        keep = bool(batch.loss_weights[i] > 0)
        masks.append([False] * p + [keep] * (len(ids) - p))
        engines.append([0.0] * p + list(batch.engine_logprobs[i]))
    return PolicyBatch.from_sequences(
        batch.input_ids, masks, batch.advantages.tolist(),
        engine_logprobs=engines if with_engine_logprobs else None, pad_id=pad_id,
        routed_experts=batch.routed_experts,
    )


class PolicyWorker:
    """Ray actor body: a `PolicyTrainer` on one rank."""

    def __init__(self, cfg, hf_config: dict, rank: int, world_size: int, master_addr: str, master_port: int,
                 store_hosted: bool = False):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        malloc.steady_state()  # push_weights lowers the mmap threshold only while it runs
        from dapo_megatron.policy.train import PolicyTrainer

        self.cfg = cfg
        self.rank = rank
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.trainer = PolicyTrainer.from_config(
            cfg, hf_config, rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
            store_hosted=store_hosted,
        )
        self._update_group = None  # disaggregated sync: kept from push to push (_weight_group)
        self._update_groups_opened = 0

    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="watch")
    def alive(self) -> bool:
        """The watchdog's ping. PolicyGroup runs it in a concurrency group of its own, so a
        rank busy in a long call still answers it (dapo_megatron.watchdog)."""
        return True

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One policy update on the rollout batch; the ranks compute pi_old, the mismatch,
        the correction and the reference log-probs themselves (PolicyTrainer._prepare)."""
        return self.trainer.train_step(to_policy_batch(batch))

    def push_weights(self, engines: list, version: int) -> dict[str, float]:
        """Send this rank's share of the weights straight to ``engines`` (Ray handles).

        A collective over the policy ranks (the export's TP all-gathers); ranks that source
        no tensor only take part in those. Runs inside the engines' weight-update session,
        which the driver opens and closes. Returns bytes and seconds this rank sent.
        """
        import time

        from dapo_megatron.convert.export import sources_anything
        from dapo_megatron.rollout.weight_sync import push_bucket_colocated

        r = self.cfg.rollout
        start, sent = time.perf_counter(), 0
        group, error = None, None
        try:
            if r.placement == "disaggregated" and sources_anything(self.trainer.model):
                group = self._weight_group(engines)
        except Exception as err:  # noqa: BLE001 - reported after the collective export below
            error = err
        # A failed push (a dead or hung engine) stops this rank's pushing but not its part in
        # the export's TP all-gathers: the other ranks must not be left waiting in one.
        # Each bucket's memory goes back to the OS when it is freed (malloc.py).
        with malloc.returned_to_os():
            for bucket in self.trainer.export_weights(r.weight_bucket_mb * 2**20):
                if error is None:
                    try:
                        if group is not None:
                            group.push(bucket)
                        else:
                            push_bucket_colocated(engines, bucket, r.engine, r.engine_tp, r.hang_timeout_s,
                                                  tie_word_embeddings=self.tie_word_embeddings)
                        sent += sum(t.numel() * t.element_size() for _, t in bucket)
                    except Exception as err:  # noqa: BLE001
                        error = err
                del bucket
        if error is not None:
            self._drop_weight_group()  # a failed push may leave the group mid-broadcast
            raise error
        return {"bytes": float(sent), "seconds": time.perf_counter() - start}

    def _weight_group(self, engines: list):
        """The weight-update group with exactly these engines: the one of the last push, or a
        new one (opening a group is a rendezvous, 0.2-1 s on CPU: once, not every step).
        A replaced engine is another actor, so the group is rebuilt with it."""
        from dapo_megatron.rollout.weight_sync import WeightUpdateGroup

        if self._update_group is not None and self._update_group.engines == list(engines):
            return self._update_group
        self._drop_weight_group()
        self._update_groups_opened += 1
        r = self.cfg.rollout
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        self._update_group = WeightUpdateGroup(
            engines, backend, f"weights-rank{self.rank}-{self._update_groups_opened}", r.hang_timeout_s,
            ranks_per_engine=r.engine_tp if r.engine == "sglang" else 1)
        return self._update_group

    def _drop_weight_group(self) -> None:
        if self._update_group is not None:
            group, self._update_group = self._update_group, None
            group.close()

    def onload(self) -> None:
        self.trainer.onload()

    def offload(self) -> None:
        self.trainer.offload()

    def save(self, path: str, extra_state: dict) -> None:
        self.trainer.save(path, extra_state)

    def load(self, path: str) -> dict:
        return self.trainer.load(path)
