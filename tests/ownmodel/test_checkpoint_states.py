"""Checkpoints save in every state a run can be in, and a failed save leaves nothing behind.

For every supported family, in bf16 and fp32, with and without the distributed optimizer,
before the first optimizer step (DAPO's every-group-dropped start) and after a step: save,
reload into a trainer built from other weights, take the same next step as the trainer that
never stopped. Equal log-probs after that step need the weights, Adam's moments and the
schedule back exactly (a fresh optimizer's first update differs by far more).

Before this was fixed, a save before the first step failed with the distributed optimizer
(distrib_optimizer.py: ``assert len(steps) == 1``) and a bf16 Qwen2 failed at every save
(``The size of tensor a (64) must match the size of tensor b (32)``).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_distributed

torch.set_num_threads(1)

# family -> [(params dtype, distributed optimizer, optimizer step before the save)]: each
# family gets both dtypes, both optimizers and both states.
CASES = {fam: [("bf16", True, False), ("fp32", False, False), ("bf16", False, True), ("fp32", True, True)]
         for fam in ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")}


def _trainer(arch, dtype, dist_opt, seed):
    from dapo_megatron.config import AlgoConfig, OptimizerConfig, ParallelConfig, TrainerConfig
    from dapo_megatron.policy.train import PolicyTrainer
    from tests.policy.test_train import tiny_hf_model

    cfg, state = tiny_hf_model(arch, seed=seed)
    return PolicyTrainer(
        cfg, parallel=ParallelConfig(use_distributed_optimizer=dist_opt),
        optim=OptimizerConfig(lr=1e-3, warmup_steps=1), algo=AlgoConfig(),
        trainer=TrainerConfig(train_batch_size=2, mini_batch_size=1, max_tokens_per_microbatch=4096,
                              max_steps=10),
        hf_state_dict=state, params_dtype=dtype)


def _states_worker(rank, world, root):
    from dapo_megatron.policy.parallel import destroy_parallel
    from tests.policy.test_train import tiny_batch

    out = {}
    for arch, cases in CASES.items():
        for dtype, dist_opt, stepped in cases:
            key = f"{arch}/{dtype}/{'distopt' if dist_opt else 'plain'}/{'stepped' if stepped else 'fresh'}"
            trainer = _trainer(arch, dtype, dist_opt, seed=0)
            if stepped:
                trainer.train_step(tiny_batch(1))
            path = os.path.join(root, key.replace("/", "-"))
            trainer.save(path, {"k": key})
            trainer.train_step(tiny_batch(2))
            reference = trainer.compute_logprobs(tiny_batch(3)).float()
            destroy_parallel()
            resumed = _trainer(arch, dtype, dist_opt, seed=7)
            before = resumed.compute_logprobs(tiny_batch(3)).float()
            extra = resumed.load(path)
            resumed.train_step(tiny_batch(2))
            got = resumed.compute_logprobs(tiny_batch(3)).float()
            out[key] = {"diff": float((got - reference).abs().max()),
                        "other_weights": float((before - reference).abs().max()),
                        "extra": extra, "step": resumed.step}
            destroy_parallel()
    return out


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    return run_distributed(_states_worker, 1, str(tmp_path_factory.mktemp("states")))[0]


@pytest.mark.dist
@pytest.mark.parametrize("key", [f"{a}/{d}/{'distopt' if o else 'plain'}/{'stepped' if s else 'fresh'}"
                                 for a, cases in CASES.items() for d, o, s in cases])
def test_checkpoint_saves_and_resumes_exactly(states, key):
    r = states[key]
    assert r["other_weights"] > 1e-2  # the resumed trainer did start elsewhere
    assert r["diff"] == 0.0, r
    assert r["extra"] == {"k": key}
    assert r["step"] == (2 if key.endswith("stepped") else 1)  # the saved step came back, +1


def _failed_save_worker(rank, world, root):
    import types

    from dapo_megatron.controller import checkpoint as ckpt_io
    from dapo_megatron.policy.checkpoint import write_checkpoint
    from dapo_megatron.policy.parallel import destroy_parallel

    trainer = _trainer("qwen2", "bf16", True, seed=0)
    cfg = types.SimpleNamespace(checkpoint_dir=os.path.join(root, "run"),
                                checkpoint=types.SimpleNamespace(keep_last=2, dir=""))
    unpicklable = {"callback": lambda: None}  # fails inside dist_checkpointing.save
    out = {}
    # The trainer's path: controller/checkpoint.py publishes what PolicyTrainer.save wrote.
    ckpt_io.save(cfg, 1, lambda d: trainer.save(d, {"ok": True}))
    try:
        ckpt_io.save(cfg, 2, lambda d: trainer.save(d, unpicklable))
        out["controller_raised"] = False
    except Exception:  # noqa: BLE001 - CheckpointSaveError around pickle's error
        out["controller_raised"] = True
    out["controller_dirs"] = sorted(os.listdir(cfg.checkpoint_dir))
    out["controller_newest"] = os.path.basename(ckpt_io.newest_published(cfg.checkpoint_dir))
    # The policy's writer on its own removes the directory it created.
    target = os.path.join(root, "direct")
    try:
        write_checkpoint(target, 2, trainer.model, trainer.optimizer, trainer.scheduler,
                         extra_state=unpicklable)
        out["policy_raised"] = False
    except Exception:  # noqa: BLE001
        out["policy_raised"] = True
    out["policy_left"] = os.path.exists(target)
    destroy_parallel()
    return out


@pytest.mark.dist
def test_failed_save_leaves_the_previous_checkpoint_newest_and_no_tmp(tmp_path):
    out = run_distributed(_failed_save_worker, 1, str(tmp_path))[0]
    assert out["controller_raised"] and out["policy_raised"]
    assert out["controller_dirs"] == ["step_000001"], out
    assert out["controller_newest"] == "step_000001"
    assert not out["policy_left"]
