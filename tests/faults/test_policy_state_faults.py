"""Findings 1 and 3 on the real Megatron policy (one gloo rank):

- the LR schedule follows the config on resume: raising trainer.max_steps under cosine
  decay trains the added steps at the new horizon's lr (not at lr 0), a changed
  optimizer.lr is used and both are logged; no update of a decaying schedule runs at lr 0.
  Reference: megatron's cosine formula worked by hand, lr_k = min + (max-min)(1+cos(pi k/D))/2.
- a NaN in the optimizer's state is refused at save, and a checkpoint holding one
  (written with the check bypassed) is refused at load, naming the tensor.
"""

from __future__ import annotations

import logging
import math
import os

import pytest

from tests.dist import run_distributed


def _cosine(k, total_updates, lr):
    horizon = total_updates + 1  # the decay reaches min_lr one update after the last
    return 0.5 * lr * (1 + math.cos(math.pi * k / horizon))


def _worker(rank, world_size, root):
    import torch

    from dapo_megatron.config import AlgoConfig, OptimizerConfig, ParallelConfig, TrainerConfig
    from dapo_megatron.policy import checkpoint as policy_ckpt
    from dapo_megatron.policy.finite import NonFiniteStateError
    from dapo_megatron.policy.optimizer import current_lr
    from dapo_megatron.policy.parallel import destroy_parallel
    from dapo_megatron.policy.train import PolicyTrainer
    from tests.policy.test_train import tiny_batch, tiny_hf_model, with_old_logprobs

    hf_cfg, hf_state = tiny_hf_model(seed=0)

    def make(max_steps, lr):
        return PolicyTrainer(
            hf_cfg, parallel=ParallelConfig(), algo=AlgoConfig(),
            optim=OptimizerConfig(lr=lr, warmup_steps=0, lr_decay="cosine", weight_decay=0.0),
            trainer=TrainerConfig(train_batch_size=2, mini_batch_size=1, max_tokens_per_microbatch=4096,
                                  max_steps=max_steps, seed=0),
            hf_state_dict=hf_state)

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("dapo_megatron").addHandler(handler)
    out = {}
    trainer = make(2, 1e-2)  # 2 steps x 2 mini-batches = 4 updates
    out["lrs"] = []
    for step in (1, 2):
        trainer.train_step(with_old_logprobs(trainer, tiny_batch(step)))
        out["lrs"].append(current_lr(trainer.optimizer))
    ckpt = os.path.join(root, "step2")
    trainer.save(ckpt)
    destroy_parallel()

    trainer = make(4, 2e-2)  # the user raises max_steps (and the lr) to continue
    trainer.load(ckpt)
    out["resumed_lrs"] = []
    for step in (3, 4):
        trainer.train_step(with_old_logprobs(trainer, tiny_batch(step)))
        out["resumed_lrs"].append(current_lr(trainer.optimizer))
    out["log"] = "\n".join(records)

    opt = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])[0].optimizer
    param = opt.param_groups[0]["params"][0]
    opt.state[param]["exp_avg"].view(-1)[0] = float("nan")
    try:
        trainer.save(os.path.join(root, "nan_refused"))
    except NonFiniteStateError as e:
        out["save_error"] = str(e)
    checked = policy_ckpt.check_finite
    policy_ckpt.check_finite = lambda *a, **k: None  # write the poisoned state anyway
    trainer.save(os.path.join(root, "nan_written"))
    policy_ckpt.check_finite = checked
    destroy_parallel()

    trainer = make(4, 2e-2)
    try:
        trainer.load(os.path.join(root, "nan_written"))
    except NonFiniteStateError as e:
        out["load_error"] = str(e)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def state_results(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return run_distributed(_worker, 1, str(tmp_path_factory.mktemp("policy_state")))[0]


@pytest.mark.dist
def test_lr_schedule_follows_the_config_on_resume(state_results):
    out = state_results
    # Uninterrupted 2-step run: updates 2 and 4 of 4; the last is not at lr 0.
    assert out["lrs"] == pytest.approx([_cosine(2, 4, 1e-2), _cosine(4, 4, 1e-2)], rel=1e-6)
    assert out["lrs"][-1] > 0
    # Resumed with max_steps=4 and lr=2e-2: updates 6 and 8 of the new 8-update schedule.
    assert out["resumed_lrs"] == pytest.approx([_cosine(6, 8, 2e-2), _cosine(8, 8, 2e-2)], rel=1e-6)
    assert min(out["resumed_lrs"]) > 0
    assert "lr schedule follows the config, not the checkpoint: max_lr 0.01 -> 0.02, lr_decay_steps 5 -> 9" \
        in out["log"]


@pytest.mark.dist
def test_non_finite_optimizer_state_is_refused_at_save_and_load(state_results):
    out = state_results
    assert out["save_error"].startswith("saving step 4: optimizer 0 group 0 param 0 state 'exp_avg' "
                                        "holds NaN or inf")
    assert "loading " in out["load_error"] and "'exp_avg' holds NaN or inf" in out["load_error"]
