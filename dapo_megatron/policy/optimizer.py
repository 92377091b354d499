"""Megatron optimizer (AdamW, distributed) and learning-rate schedule for the policy.

``build_optimizer`` turns the run's ``OptimizerConfig`` (dapo_megatron.config) into
megatron-core's ``get_megatron_optimizer`` (Adam with decoupled weight decay = AdamW;
the distributed optimizer shards its state over data-parallel ranks) and an
``OptimizerParamScheduler`` (linear warmup, then constant / cosine / linear decay).

``optimizer_step`` is one update with the safety the RL loop needs: the gradient norm is
computed first and a non-finite norm skips the update (gradients are dropped and the
schedule does not advance) instead of writing NaN into the weights; megatron's own
``step()`` only checks for inf/NaN under fp16 loss scaling.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = ["StepResult", "build_optimizer", "current_lr", "load_schedule_state", "optimizer_step",
           "set_constant_lr"]


@dataclass(frozen=True)
class StepResult:
    """Outcome of one ``optimizer_step``."""

    skipped: bool
    grad_norm: float
    lr: float


def build_optimizer(model_chunks, optim_cfg, *, total_updates: int, warmup_updates: int,
                    use_distributed_optimizer: bool = True, params_dtype=torch.float32):
    """Megatron AdamW over ``model_chunks`` (DDP-wrapped) and its lr/wd schedule.

    Args:
        model_chunks: this rank's model chunks wrapped in megatron DistributedDataParallel.
        optim_cfg: ``dapo_megatron.config.OptimizerConfig`` (lr, min_lr, lr_decay,
            weight_decay, adam betas/eps, clip_grad).
        total_updates: optimizer updates over the run. The decay reaches min_lr one update
            after the last, so no update runs at lr 0 unless min_lr is 0 and the run is
            extended past its horizon without a new one (resume takes the new horizon).
        warmup_updates: updates of linear warmup (0: none).
        use_distributed_optimizer: shard optimizer state over DP ranks (must match the DDP
            config the chunks were wrapped with).
        params_dtype: the model's parameter dtype (bf16 keeps fp32 main params).

    Returns:
        ``(optimizer, scheduler)``: megatron's MegatronOptimizer and OptimizerParamScheduler.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if params_dtype == torch.float16:
        raise ValueError("fp16 params need loss scaling, which this trainer does not run; use "
                         "bf16 (GPU) or fp32 (CPU)")
    if warmup_updates < 0 or total_updates < 1:
        raise ValueError(f"need total_updates >= 1 and warmup_updates >= 0, got "
                         f"{total_updates} and {warmup_updates}")
    config = OptimizerConfig(
        optimizer="adam",
        decoupled_weight_decay=True,  # AdamW
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, list(model_chunks))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=warmup_updates,
        # Update k runs at the schedule's k-th value (optimizer_step advances first), and
        # megatron's decay hits min_lr at num_steps == lr_decay_steps: a horizon of
        # total_updates would run the last update at min_lr (0 by default). One past it
        # keeps every update above min_lr. megatron also requires decay_steps > warmup_steps.
        lr_decay_steps=max(total_updates + 1, warmup_updates + 1),
        lr_decay_style=optim_cfg.lr_decay,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=max(total_updates, 1),
        wd_incr_style="constant",
        # On resume the config's schedule (lr, horizon from the current max_steps, warmup,
        # decay) replaces the checkpoint's; only the update count comes from the checkpoint
        # (optimizer_param_scheduler.py, _check_and_set: override returns the class value).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


_SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                  "start_wd", "end_wd")


def load_schedule_state(scheduler, state: dict) -> dict:
    """Restore the schedule's position (update count) from a checkpoint while keeping the
    config's schedule; logs each setting that differs from the checkpoint's and returns
    them as ``{key: (checkpoint value, config value)}``."""
    mine = scheduler.state_dict()
    changed = {k: (state[k], mine[k]) for k in _SCHEDULE_KEYS if k in state and state[k] != mine[k]}
    if changed:
        logger.warning("lr schedule follows the config, not the checkpoint: %s",
                       ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    # The optimizer's param groups carry their own max_lr/min_lr, which the optimizer state
    # just loaded from the checkpoint, and the scheduler reads those first
    # (optimizer_param_scheduler.py, get_lr: param_group.get('max_lr', self.max_lr)).
    for group in scheduler.optimizer.param_groups:
        for key in ("max_lr", "min_lr"):
            if key in group and key in state and state[key]:
                group[key] = group[key] * mine[key] / state[key]  # keeps a per-group multiplier
            elif key in group:
                group[key] = mine[key]
    scheduler.load_state_dict(state)
    return changed


def current_lr(optimizer) -> float:
    """The learning rate of the first parameter group (all groups share the schedule)."""
    for group in optimizer.param_groups:
        return float(group["lr"])
    return 0.0


class _NoSchedule:
    """Stands in for the scheduler while an lr override is active."""

    def step(self, increment: int) -> None:
        del increment


def _sub_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def set_constant_lr(optimizer, lr: float) -> None:
    """Set every parameter group's lr (the schedule is not consulted or advanced)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


@torch.no_grad()
def optimizer_step(optimizer, scheduler, *, lr_override: float | None = None) -> StepResult:
    """Clip and apply the reduced gradients, or skip the update if their norm is not finite.

    Call after the forward/backward pass and megatron's ``finalize_model_grads`` (the
    schedules do that). The schedule advances one update *before* stepping, so update k
    (1-based) runs at the warmup's k-th learning rate rather than at lr 0; a skipped
    update rolls it back. ``lr_override`` runs this update at that lr and leaves the
    schedule alone. Gradients are zeroed afterwards either way.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if lr_override is None:
        scheduler.step(increment=1)
    else:
        set_constant_lr(optimizer, lr_override)
        scheduler = _NoSchedule()
    lr = current_lr(optimizer)
    # Copies model grads into the optimizer's main grads (the distributed optimizer's
    # shards); for bf16/fp32 there is no loss scale, so no inf check happens here.
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        scheduler.step(increment=-1)
        optimizer.zero_grad()
        logger.warning("skipping the optimizer update: gradient norm is %s (non-finite); "
                       "the weights and the lr schedule are unchanged", grad_norm)
        return StepResult(skipped=True, grad_norm=grad_norm, lr=lr)
    for sub in _sub_optimizers(optimizer):
        params = sub.get_parameters()
        if sub.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=sub.config.clip_grad,
                                         total_norm=grad_norm)
    success = optimizer.step_with_ready_grads()
    optimizer.zero_grad()
    if not success:
        scheduler.step(increment=-1)
        logger.warning("megatron reported an unsuccessful optimizer update; lr schedule held")
    return StepResult(skipped=not success, grad_norm=grad_norm, lr=lr)
