"""The DAPO loop. One step, in the order of DESIGN.md:

    generate + reward + filter  ->  engines release memory  ->  policy onloads
    ->  advantages, train (old log-probs, mismatch, correction, reference on the ranks)
    ->  policy offloads (if configured)  ->  engines resume weights  ->  weight sync
    ->  engines resume KV cache  ->  metrics, checkpoint, periodic eval

The memory phases are what lets colocated SGLang and Megatron share GPUs; each call is a
no-op where there is nothing to move (CPU, the embedded engine), but is always made.
With `rollout.max_staleness` > 0 the next step's rollout is collected while this step
trains (controller/async_rollout.py); the engines then keep their memory.

`Trainer` owns the Ray actors (policy ranks, rollout engines), the reward scorer, the
prompt sampler and the metrics; the phases themselves live in their modules.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import signal
import threading
import time

import numpy as np
import torch

from dapo_megatron.algo import BatchAssembler
from dapo_megatron.config import DapoConfig, check_run_paths, dump_config
from dapo_megatron.controller import checkpoint as ckpt_io
from dapo_megatron.controller import rollout_state
from dapo_megatron.controller.async_rollout import BackgroundRollout
from dapo_megatron.controller.batch import batch_metrics, build_rollout_batch
from dapo_megatron.controller.engines import EnginePool
from dapo_megatron.controller.eval_phase import evaluate
from dapo_megatron.controller.examine import log_examples
from dapo_megatron.controller.metrics import MetricsLogger, plot_metrics, run_summary, warn_if_no_learning_signal
from dapo_megatron.controller.policy_group import PolicyGroup
from dapo_megatron.controller.rollout_phase import collect_train_groups
from dapo_megatron.controller.run_dir import claim_run_dir
from dapo_megatron.controller.startup import check_cluster_device, check_local_device, record_model_shape
from dapo_megatron.controller.task import load_task
from dapo_megatron.convert.hf_io import carry_hf_files
from dapo_megatron.data.sampler import PromptSampler
from dapo_megatron.resolve import Resolved, resolve
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
        self.metrics: MetricsLogger | None = None
        self.scorer = self.engines = self.policy = None
        # Everything that can refuse the launch runs before any actor starts; config.yaml
        # is written only once the launch is accepted (in run, after the resume checks).
        self.lock = None if for_eval else claim_run_dir(cfg)
        try:
            self._start(cfg, for_eval)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, cfg: DapoConfig, for_eval: bool) -> None:
        if not for_eval:
            check_run_paths(cfg)
            ckpt_io.check_free_space(cfg.checkpoint_dir)
        _seed_everything(cfg.trainer.seed)
        self.task = load_task(cfg)
        # The shape (and prompt + response against its positions) is checked by resolve().
        self.resolved = resolve(cfg, vocab_size=self.task.tokenizer.vocab_size)
        self.hf_config = self.resolved.hf_config
        if not for_eval:
            record_model_shape(cfg, self.resolved)  # config.yaml says what runs
        check_local_device(cfg)
        _init_ray(cfg, self.resolved)
        check_cluster_device(cfg)
        # Start-up overlaps: the reward workers, the policy ranks and the engines all start
        # at once; only offload orders them (SGLang sizes its memory from what is free when
        # it starts, so the policy must have offloaded by then).
        r = cfg.reward
        self.scorer = RewardPool(num_workers=r.num_workers, timeout_s=r.timeout_s,
                                 correct_score=r.correct_score, incorrect_score=r.incorrect_score)
        self.policy = PolicyGroup(cfg, self.hf_config, wait=cfg.trainer.offload)
        if cfg.trainer.offload:
            self.policy.offload()
        self.engines = EnginePool(cfg, self.hf_config, weight_source=self.policy,
                                  slots=self.resolved.engines, policy_pg=self.policy.pg)
        self.policy.wait_ready()
        self.sampler = PromptSampler(self.task.train, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
        a = cfg.algo
        self.assembler = BatchAssembler(
            cfg.trainer.train_batch_size, a.max_gen_batches or None, a.surplus,
            filter_groups=a.dynamic_sampling, adaptive=cfg.rollout.adaptive_gen_batch,
        )
        self.step = 0
        self._saved_step = 0  # the step of the newest checkpoint (resumed or written)
        self.generated_samples = 0  # responses the engines generated for training (the budget's count)
        self.generated_tokens = 0
        self.carried = []  # partial rollouts: groups the next collection continues
        self._prefetched = None  # async: the next step's rollout, collected during this one
        self._background = None

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict]:
        cfg = self.cfg
        self._install_signal_handlers()  # after ray.init, which replaces SIGTERM's handler
        resumed = self.restore(None) if cfg.checkpoint.resume else False
        dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))  # the launch is accepted
        self.metrics = MetricsLogger(
            cfg.run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, config=cfg.to_dict(),
            resume_step=self.step if resumed else None,
            max_steps=cfg.trainer.max_steps,
        )
        if not resumed:
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
        logger.info(run_summary(self.metrics.records, cfg.run_dir, cfg.checkpoint_dir,
                                ckpt_io.newest_published(cfg.checkpoint_dir)))
        return self.metrics.records

    def _install_signal_handlers(self) -> None:
        """SIGUSR1 (Slurm's warning before the time limit), SIGTERM and SIGINT end the run
        cleanly at the next step boundary, with a checkpoint; a second SIGINT stops at once.
        The actors do not see these signals even when the whole process group gets them
        (`_init_ray` starts Ray with them blocked), so they are alive for that checkpoint."""
        self._stop_signal = None
        first_at = [0.0]

        def handler(signum, _frame):
            # One Ctrl-C can arrive twice (each thread that Ray started sees it); a second
            # one a moment later is the user's.
            if signum == signal.SIGINT and self._stop_signal is not None and time.monotonic() - first_at[0] > 1.0:
                raise KeyboardInterrupt
            if self._stop_signal is None:
                first_at[0] = time.monotonic()
                logger.warning("received %s: finishing step %d, then checkpointing and exiting "
                               "(Ctrl-C again to stop without a checkpoint)", signal.Signals(signum).name,
                               self.step)
            self._stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
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

    def _collect(self, step: int, train_version: int | None = None):
        """The rollout of `step` (continuing self.carried); leaves its carried groups."""
        rollout = collect_train_groups(
            cfg=self.cfg, step=step, sampler=self.sampler, tokenizer=self.task.tokenizer,
            engines=self.engines, scorer=self.scorer, assembler=self.assembler,
            carried=self.carried, train_version=train_version,
        )
        self.carried = rollout.carried
        return rollout

    def _join_background(self) -> None:
        """Wait for the next step's rollout (the waiting is trainer idle time)."""
        if self._background is None:
            return
        self._prefetched, waited, ran = self._background.join()
        self._background = None
        self._trainer_idle += waited
        self._engine_busy += ran

    def train_step(self) -> dict[str, float]:
        """One DAPO step; returns its metrics."""
        cfg, t0 = self.cfg, time.perf_counter()
        crashes_before = self.scorer.crashes
        overlap = cfg.rollout.max_staleness > 0
        if self._prefetched is not None:
            rollout, self._prefetched = self._prefetched, None
            self._trainer_idle = self._engine_busy = 0.0
        else:
            rollout = self._collect(self.step)
            self._trainer_idle = self._engine_busy = time.perf_counter() - t0
        # The budget counts every response the engines generated, not the groups scored.
        self.generated_samples += rollout.generated.responses
        self.generated_tokens += rollout.generated.tokens
        budget = cfg.trainer.sample_budget
        if overlap and self.step < cfg.trainer.max_steps and not (budget and self.generated_samples >= budget):
            # Trained on at the version this step's update pushes (if it updates at all).
            version = self.step if rollout.groups else self.engines.weight_version
            self._background = BackgroundRollout(lambda s=self.step + 1: self._collect(s, version))
        log_examples(rollout.groups, cfg.logging.num_examine, tag=f"step {self.step}")
        metrics = {
            **rollout.stats.as_metrics(), **rollout.metrics(),
            "reward/timeouts": float(rollout.reward_timeouts),
            "reward/worker_crashes": float(self.scorer.crashes - crashes_before),
            "rollout/generated_samples_total": float(self.generated_samples),
            "rollout/generated_tokens_total": float(self.generated_tokens),
            "rollout/engine_restarts": float(self.engines.restarts),
            "time/generate": rollout.seconds_generate, "time/reward": rollout.seconds_reward,
            "throughput/generate_tokens_per_s": rollout.generated.tokens / max(rollout.seconds_generate, 1e-9),
        }
        if rollout.groups:
            metrics.update(self._train_on(rollout.groups))
        else:
            logger.warning("step %d: no group with a learning signal after %d rounds; skipping the update",
                           self.step, rollout.stats.rounds)
        self._join_background()
        if cfg.eval.every and self.step % cfg.eval.every == 0:
            metrics.update(self.evaluate())
        metrics["time/step"] = time.perf_counter() - t0
        # Idle: the trainer waiting for rollouts; the engines outside their collections
        # (eval and weight pushes count as idle: they are not this step's generation).
        metrics["time/trainer_idle"] = self._trainer_idle
        metrics["time/engine_idle"] = max(0.0, metrics["time/step"] - self._engine_busy)
        return metrics

    def _train_on(self, groups) -> dict[str, float]:
        """Advantages, the policy update and the weight sync for kept groups, inside the
        colocated memory phases."""
        cfg = self.cfg
        batch = build_rollout_batch(groups, cfg.algo)
        warn_if_no_learning_signal(self.step, batch)
        t1 = time.perf_counter()
        overlap = cfg.rollout.max_staleness > 0
        if not overlap:  # overlapped: the engines generate the next rollout meanwhile
            self.engines.release_memory()
        self.policy.onload()
        t2 = time.perf_counter()
        train_metrics = self.policy.train(batch)  # actor/*, mismatch/*, correction/*, time/*
        t3 = time.perf_counter()
        if cfg.trainer.offload:
            self.policy.offload()
        if overlap:
            # Every rollout is generated under one version: the push waits for the next one.
            self._join_background()
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
        return evaluate(self.cfg, self.task.eval, self.task.tokenizer, self.engines, self.scorer,
                        k=k, seed=self.cfg.trainer.seed, out_path=out_path)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        state = {
            "step": self.step,
            "generated_samples": self.generated_samples,
            "generated_tokens": self.generated_tokens,
            "sampler": self.sampler.state_dict(),
            "keep_history": self.assembler.keep_history(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        path = ckpt_io.save(self.cfg, self.step, lambda d: self._write_checkpoint(d, state))
        self._saved_step = self.step
        logger.info("step %d: checkpoint written to %s", self.step, path)

    def _write_checkpoint(self, path: str, state: dict) -> None:
        """The policy's checkpoint plus what turns it back into a complete HF model with
        tools/convert_hf.py --to-hf: the HF config that ran, the tokenizer, the generation
        config."""
        self.policy.save(path, state)
        # Carried partials and the prefetched rollout (partial rollouts, async training).
        # Not in `state`: the policy's common state is loaded weights-only (no dataclasses).
        rollout_state.write(path, self.carried, self._prefetched, self.assembler.carried_groups())
        carry_hf_files(path, self.hf_config,
                       [self.cfg.model.hf_dir, getattr(self.task.tokenizer, "path", None)])

    def restore(self, path: str | None) -> bool:
        """Load `path` (a checkpoint, or a directory of them: its newest that verifies; None:
        the run's checkpoint.dir); True if one was loaded. Newer checkpoints that do not verify
        or fail to load are skipped, each with its reason logged."""
        root = path or self.cfg.checkpoint_dir
        if path is not None and not ckpt_io.is_checkpoint_root(path):
            reason = ckpt_io.verify(path) if os.path.exists(os.path.join(path, ckpt_io.MANIFEST)) else None
            if reason is not None:
                raise ckpt_io.NoUsableCheckpoint(f"checkpoint {path} does not verify: {reason}")
            self._apply(path, self.policy.load(path))  # one given directory
            return True
        if path is None:
            ckpt_io.remove_partial_saves(root)
        skipped = []
        for candidate, reason in ckpt_io.verified_newest_first(root):
            if reason is None:
                try:
                    state = self.policy.load(candidate)
                except Exception as e:  # noqa: BLE001 - fall back to the previous checkpoint
                    lines = str(e).strip().splitlines() or [""]
                    reason = f"loading failed: {type(e).__name__}: {lines[-1][:300]}"
            if reason is None:
                if skipped:
                    logger.warning("resuming from %s: the %d newer checkpoint(s) above could not be used",
                                   candidate, len(skipped))
                # The controller's state (data position, RNG) is applied only now: a mismatch
                # with this config (e.g. a changed dataset) refuses the launch, no fallback.
                self._apply(candidate, state)
                return True
            logger.warning("skipping checkpoint %s: %s", candidate, reason)
            skipped.append(candidate)
        if skipped:
            raise ckpt_io.NoUsableCheckpoint(
                f"none of the {len(skipped)} checkpoints in {root} can be used (reasons above); move them "
                "aside to start over, or set checkpoint.resume=false with checkpoint.overwrite=true")
        return False

    def _apply(self, path: str, state: dict) -> None:
        """Restore the controller's part of a checkpoint the policy has loaded."""
        self.step = self._saved_step = int(state["step"])
        self.generated_samples = int(state.get("generated_samples", 0))
        self.generated_tokens = int(state.get("generated_tokens", 0))
        self.sampler.load_state_dict(state["sampler"])
        self.carried, self._prefetched, surplus = rollout_state.read(path)
        self.assembler.restore_carried(surplus)
        if "keep_history" in state:  # older checkpoints: adaptive rounds start afresh
            self.assembler.restore_keep_history(state["keep_history"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.sync_weights()
        logger.info("resumed from %s at step %d", path, self.step)

    def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        for part in (self.scorer, self.engines, self.policy):
            if part is not None:
                part.close() if part is self.scorer else part.shutdown()
        if self.lock is not None:
            self.lock.release()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RayStartError(RuntimeError):
    """Ray did not come up after the retries; the message says what to try."""


RAY_START_ATTEMPTS = 5  # Ray gives its raylet a fixed 30 s (node.py); a loaded machine needs more tries
RAY_START_BACKOFF_S = 10.0


def _init_ray(cfg: DapoConfig, resolved: Resolved | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) Ray, retrying a failed start-up: on a busy machine
    the raylet can miss its start-up deadline, which is no reason to end the run."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        kwargs = dict(address=address, log_to_driver=True)
    else:
        # A local cluster: enough logical CPUs for every policy rank, engine and the driver,
        # whatever this machine has (actors mostly wait on one another).
        engines = (resolved or resolve(cfg)).engines
        needed = cfg.parallel.world_size + int(sum(slot.resources.get("CPU", 0) for slot in engines))
        # Ray's raylet adds worker_niceness to its own (the driver's) niceness for every worker.
        kwargs = dict(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False,
                      log_to_driver=True, configure_logging=False,
                      _system_config={"worker_niceness": cfg.trainer.worker_niceness})
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            with _stop_signals_blocked():
                ray.init(**kwargs)
            if not address:
                # atexit runs it before Ray's own handler (registered when ray was imported);
                # unregistering first keeps one registration however often Ray is started.
                atexit.unregister(stop_local_ray)
                atexit.register(stop_local_ray)
            return
        except Exception as e:  # noqa: BLE001 - ray.init raises many kinds; all are retried
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            if attempt == RAY_START_ATTEMPTS:
                raise RayStartError(
                    f"Ray did not start after {attempt} attempts ({reason}). The machine may be "
                    "overloaded: rerun later, or start a cluster with `ray start --head` and set "
                    "RAY_ADDRESS") from e
            wait = RAY_START_BACKOFF_S * attempt
            logger.warning("Ray start-up failed (attempt %d/%d: %s); retrying in %.0f s",
                           attempt, RAY_START_ATTEMPTS, reason, wait)
            time.sleep(wait)


def stop_local_ray() -> None:
    """ray.shutdown() for the cluster _init_ray started, without Ray's SIGTERM grace.

    Ray's shutdown sends each of its processes (raylet, GCS, dashboard, log monitor,
    autoscaler monitor) SIGTERM and waits up to 1 s before SIGKILL
    (ray/_private/node.py, ``_kill_process_impl``). Ours start with SIGTERM blocked
    (`_stop_signals_blocked`), so every grace ran out: 5 s at the end of every run. Here the
    driver disconnects first, as in ray.shutdown, and then the processes get SIGKILL at once,
    which is where Ray's path ended anyway. If this Ray lacks the private node handle used
    here, plain ray.shutdown() runs instead."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        raylet = ray_constants.PROCESS_TYPE_RAYLET
    except (ImportError, AttributeError):  # another Ray version: its own shutdown below
        node = None
    if node is None or not node.is_head() or not hasattr(node, "kill_all_processes"):
        ray.shutdown()
        return
    import psutil

    # The raylet's children (its dashboard and runtime-env agents, any worker left) would
    # outlive a SIGKILLed raylet: they end with it here.
    children = []
    for info in node.all_processes.get(raylet, []):
        try:
            children += psutil.Process(info.process.pid).children(recursive=True)
        except psutil.Error:
            pass
    worker._global_node = None  # ray.shutdown() now only disconnects this driver
    try:
        ray.shutdown()
    finally:
        node.destroy_external_storage()
        node.kill_all_processes(check_alive=False, allow_graceful=False)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass


@contextlib.contextmanager
def _stop_signals_blocked():
    """Start Ray's processes with SIGTERM and SIGINT blocked (a signal mask survives fork and
    exec, and Ray's processes do not unblock them; services.py already blocks SIGINT in its
    preexec_fn). Slurm's scancel, a preemption or Ctrl-C signal the whole process group: the
    GCS, the raylet and every actor (policy ranks, engines) stay up, and the driver, which
    alone handles the signal, checkpoints at the step boundary and then shuts them down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
