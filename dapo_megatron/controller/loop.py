"""The DAPO loop. One step, in the order of DESIGN.md:

    generate + reward + filter  ->  engines release memory  ->  policy onloads
    ->  advantages, train (old log-probs, mismatch, correction, reference on the ranks)
    ->  policy offloads (if configured)  ->  engines resume weights  ->  weight sync
    ->  engines resume KV cache  ->  metrics, checkpoint, periodic eval

The memory phases are what lets colocated SGLang and Megatron share GPUs; each call is a
no-op where there is nothing to move (CPU, the embedded engine), but is always made.

`Trainer` owns the Ray actors (policy ranks, rollout engines), the reward scorer, the
prompt sampler and the metrics; the phases themselves live in their modules.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time

import numpy as np
import torch

from dapo_megatron.algo import BatchAssembler
from dapo_megatron.config import DapoConfig, dump_config
from dapo_megatron.controller import checkpoint as ckpt_io
from dapo_megatron.controller.batch import batch_metrics, build_rollout_batch
from dapo_megatron.controller.engines import EnginePool
from dapo_megatron.controller.metrics import MetricsLogger, plot_metrics
from dapo_megatron.controller.policy_group import PolicyGroup
from dapo_megatron.controller.rollout_phase import collect_train_groups
from dapo_megatron.controller.task import load_task
from dapo_megatron.data.sampler import PromptSampler
from dapo_megatron.reward import RewardPool

logger = logging.getLogger("dapo_megatron")


def train(cfg: DapoConfig) -> list[dict]:
    """`dapo-megatron train`: run (or resume) a DAPO run; returns the metric records."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()


class Trainer:
    def __init__(self, cfg: DapoConfig, *, for_eval: bool = False) -> None:
        self.cfg = cfg
        os.makedirs(cfg.run_dir, exist_ok=True)
        if not for_eval:
            dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        _seed_everything(cfg.trainer.seed)
        self.task = load_task(cfg)
        self.hf_config = _hf_config(cfg, self.task.tokenizer.vocab_size)
        _init_ray(cfg)
        self.policy = PolicyGroup(cfg, self.hf_config)
        self.engines = EnginePool(cfg, self.hf_config, weight_source=self.policy)
        r = cfg.reward
        self.scorer = RewardPool(num_workers=r.num_workers, timeout_s=r.timeout_s,
                                 correct_score=r.correct_score, incorrect_score=r.incorrect_score)
        self.sampler = PromptSampler(self.task.train, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
        a = cfg.algo
        self.assembler = BatchAssembler(
            cfg.trainer.train_batch_size, a.max_gen_batches or None, a.surplus,
            filter_groups=a.dynamic_sampling,
        )
        self.step = 0
        self._saved_step = 0  # the step of the newest checkpoint (resumed or written)
        self.generated_samples = 0
        self.metrics: MetricsLogger | None = None

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict]:
        cfg = self.cfg
        self._install_signal_handlers()  # after ray.init, which replaces SIGTERM's handler
        resumed = self.restore(None) if cfg.checkpoint.resume else False
        self.metrics = MetricsLogger(
            cfg.run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, config=cfg.to_dict(), resume_step=self.step,
            max_steps=cfg.trainer.max_steps,
        )
        if not resumed:
            if self.task.embedded and cfg.trainer.warm_start_steps > 0:
                self.policy.warm_start(self.task, cfg.trainer)
            self.sync_weights()
            if cfg.eval.every:
                self.metrics.log(0, self.evaluate())
        if self.step >= cfg.trainer.max_steps:
            logger.info("the run is complete at step %d (trainer.max_steps=%d); raise trainer.max_steps "
                        "to continue it", self.step, cfg.trainer.max_steps)
        else:
            logger.info("training steps %d..%d", self.step + 1, cfg.trainer.max_steps)
        every = cfg.checkpoint.save_every
        while self.step < cfg.trainer.max_steps and not self._budget_spent():
            self.step += 1
            self.metrics.log(self.step, self.train_step())
            if every and self.step % every == 0:
                self.save()
            if self._stop_signal is not None:
                logger.warning("received %s: checkpointing at step %d and exiting (rerun to resume)",
                               signal.Signals(self._stop_signal).name, self.step)
                break
        if (every or self._stop_signal is not None) and self._saved_step != self.step:
            self.save()
        plot_metrics(self.metrics.records, os.path.join(cfg.run_dir, "metrics.png"))
        return self.metrics.records

    def _install_signal_handlers(self) -> None:
        """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM end the run cleanly at
        the next step boundary, with a checkpoint."""
        self._stop_signal = None

        def handler(signum, _frame):
            self._stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _budget_spent(self) -> bool:
        budget = self.cfg.trainer.sample_budget
        if budget and self.generated_samples >= budget:
            logger.info("sample budget spent: %d responses generated (trainer.sample_budget=%d)",
                        self.generated_samples, budget)
            return True
        return False

    def train_step(self) -> dict[str, float]:
        """One DAPO step; returns its metrics."""
        cfg, t0 = self.cfg, time.perf_counter()
        rollout = collect_train_groups(
            cfg=cfg, step=self.step, sampler=self.sampler, tokenizer=self.task.tokenizer,
            engines=self.engines, scorer=self.scorer, assembler=self.assembler,
        )
        self.generated_samples += rollout.stats.generated * cfg.algo.group_size
        metrics = {
            **rollout.stats.as_metrics(),
            "reward/timeouts": float(rollout.reward_timeouts),
            "rollout/generated_samples_total": float(self.generated_samples),
            "rollout/engine_restarts": float(self.engines.restarts),
            "time/generate": rollout.seconds_generate, "time/reward": rollout.seconds_reward,
            "throughput/generate_tokens_per_s": rollout.generated_tokens / max(rollout.seconds_generate, 1e-9),
        }
        if rollout.groups:
            metrics.update(self._train_on(rollout.groups))
        else:
            logger.warning("step %d: no group with a learning signal after %d rounds; skipping the update",
                           self.step, rollout.stats.rounds)
        if cfg.eval.every and self.step % cfg.eval.every == 0:
            metrics.update(self.evaluate())
        metrics["time/step"] = time.perf_counter() - t0
        return metrics

    def _train_on(self, groups) -> dict[str, float]:
        """Advantages, the policy update and the weight sync for kept groups, inside the
        colocated memory phases."""
        cfg = self.cfg
        batch = build_rollout_batch(groups, cfg.algo)
        t1 = time.perf_counter()
        self.engines.release_memory()
        self.policy.onload()
        t2 = time.perf_counter()
        train_metrics = self.policy.train(batch)  # actor/*, mismatch/*, correction/*, time/*
        t3 = time.perf_counter()
        if cfg.trainer.offload:
            self.policy.offload()
        sync = self.sync_weights()
        t4 = time.perf_counter()
        return {
            **batch_metrics(batch), **train_metrics, **sync,
            "time/memory_phases": t2 - t1, "time/train": t3 - t2, "time/sync": t4 - t3,
            "throughput/train_tokens_per_s": batch.num_response_tokens / max(t3 - t2, 1e-9),
        }

    def sync_weights(self) -> dict[str, float]:
        """The policy pushes its weights into every engine, tagged with the step as version;
        the engines take back their weight memory first and their KV cache after."""
        self.engines.resume_memory(["weights"])
        stats = self.engines.sync_weights(self.step)
        self.engines.resume_memory(["kv_cache"])
        return {"sync/bytes": stats["bytes"], "sync/gb_per_s": stats["bytes"] / 1e9 / max(stats["seconds"], 1e-9)}

    def evaluate(self, k: int | None = None, out_path: str | None = None) -> dict[str, float]:
        from dapo_megatron.eval import evaluate

        return evaluate(self.cfg, self.task.eval, self.task.tokenizer, self.engines, self.scorer,
                        k=k, seed=self.cfg.trainer.seed, out_path=out_path)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        state = {
            "step": self.step,
            "generated_samples": self.generated_samples,
            "sampler": self.sampler.state_dict(),
            "carried_groups": self.assembler.carried_groups(),  # surplus="carry" only
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        path = ckpt_io.save(self.cfg, self.step, lambda d: self.policy.save(d, state))
        self._saved_step = self.step
        logger.info("step %d: checkpoint written to %s", self.step, path)

    def restore(self, path: str | None) -> bool:
        """Load `path` (or the newest checkpoint of the run); True if one was loaded."""
        path = path or ckpt_io.latest(self.cfg)
        if path is None:
            return False
        state = self.policy.load(path)
        self.step = self._saved_step = int(state["step"])
        self.generated_samples = int(state.get("generated_samples", 0))
        self.sampler.load_state_dict(state["sampler"])
        self.assembler.restore_carried(state.get("carried_groups") or [])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.sync_weights()
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.scorer.close()
        self.engines.shutdown()
        self.policy.shutdown()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _hf_config(cfg: DapoConfig, vocab_size: int) -> dict:
    """The policy's HF-style config: the checkpoint's config.json, or the inline shape."""
    if cfg.model.hf_dir:
        import json

        path = os.path.join(cfg.model.hf_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model.hf_dir: no config.json in {cfg.model.hf_dir}")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return cfg.model.hf_config_dict(vocab_size=cfg.model.vocab_size or vocab_size)


def _init_ray(cfg: DapoConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A local cluster: enough logical CPUs for every policy rank, engine and the driver,
    # whatever this machine has (actors mostly wait on one another).
    needed = cfg.parallel.world_size + max(1, cfg.rollout.num_engines) * cfg.rollout.engine_num_cpus
    ray.init(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True, configure_logging=False)
