"""Checkpoints: saved under TP=2, reloaded under PP=2 with identical log-probs, and the
resumed run's next step equals the uninterrupted one. Atomic publishing and keep-last are
the controller's (tests/controller/test_metrics_checkpoint.py)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from tests.dist import run_distributed

torch.set_num_threads(1)


def _worker(rank, world_size, root):
    from dapo_megatron.policy.parallel import destroy_parallel
    from tests.policy.test_train import make_trainer, tiny_batch, tiny_hf_model

    out = {}
    data_position = {"epoch": 1, "index": 37, "order": [3, 1, 2]}
    # Uninterrupted run under TP=2: step 1, checkpoint, step 2.
    trainer = make_trainer(tiny_hf_model(seed=0), tp=2, budget=64, lr=1e-3)
    trainer.train_step(tiny_batch(1))
    out["lp_after_1"] = trainer.compute_logprobs(tiny_batch(2)).tolist()
    ckpt = os.path.join(root, "controller_tmp")
    trainer.save(ckpt, {"data": data_position})
    # A synchronous save leaves no process behind (megatron's async-writer Manager server
    # would; policy/checkpoint.py, _in_process_write_results).
    out["children_after_save"] = sorted(p.name for p in multiprocessing.active_children())
    uninterrupted = trainer.train_step(tiny_batch(2))
    out["lp_after_2"] = trainer.compute_logprobs(tiny_batch(3)).tolist()
    destroy_parallel()

    # Resume under PP=2 from different initial weights: everything must come from disk.
    trainer = make_trainer(tiny_hf_model(seed=9), pp=2, budget=64, lr=1e-3)
    out["lp_before_load"] = trainer.compute_logprobs(tiny_batch(2)).tolist()
    out["extra"] = trainer.load(ckpt)
    out["step"] = trainer.step
    out["scheduler_steps"] = trainer.scheduler.num_steps
    out["lp_loaded"] = trainer.compute_logprobs(tiny_batch(2)).tolist()
    resumed = trainer.train_step(tiny_batch(2))
    out["lp_resumed_2"] = trainer.compute_logprobs(tiny_batch(3)).tolist()
    for key in ("actor/loss", "actor/grad_norm", "actor/lr", "actor/approx_kl"):
        out[key] = (uninterrupted[key], resumed[key])
    destroy_parallel()

    # Weights only (a converted checkpoint's use): the optimizer state stays fresh.
    trainer = make_trainer(tiny_hf_model(seed=9), tp=2, budget=64, lr=1e-3)
    trainer.load(ckpt, load_optimizer=False)
    out["lp_weights_only"] = trainer.compute_logprobs(tiny_batch(2)).tolist()
    out["weights_only_step"] = trainer.step
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    out0, out1 = run_distributed(_worker, 2, root)
    assert out0 == out1
    return out0


def _t(x):
    return torch.tensor(x)


@pytest.mark.dist
def test_checkpoint_saved_under_tp2_reloads_under_pp2_with_identical_logprobs(results):
    assert (_t(results["lp_before_load"]) - _t(results["lp_after_1"])).abs().max() > 1e-2
    torch.testing.assert_close(_t(results["lp_loaded"]), _t(results["lp_after_1"]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(_t(results["lp_weights_only"]), _t(results["lp_after_1"]),
                               atol=1e-5, rtol=0)
    assert results["extra"] == {"data": {"epoch": 1, "index": 37, "order": [3, 1, 2]}}


@pytest.mark.dist
def test_a_save_leaves_no_process_running(results):
    assert results["children_after_save"] == []


@pytest.mark.dist
def test_resume_continues_step_counter_schedule_and_optimizer_state(results):
    assert results["step"] == 1 and results["weights_only_step"] == 0
    assert results["scheduler_steps"] == 2  # two updates (mini-batches) in step 1
    for key in ("actor/loss", "actor/grad_norm", "actor/lr", "actor/approx_kl"):
        a, b = results[key]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), key
    # The next step equals the uninterrupted run: Adam's moments came back too (a fresh
    # optimizer's first update differs by far more than this tolerance).
    torch.testing.assert_close(_t(results["lp_resumed_2"]), _t(results["lp_after_2"]),
                               atol=1e-5, rtol=0)


def _converted_worker(rank, world_size, hf_dir, megatron_dir, seqs):
    import json

    from dapo_megatron.config import DapoConfig
    from dapo_megatron.policy.microbatch import PolicyBatch
    from dapo_megatron.policy.parallel import destroy_parallel
    from dapo_megatron.policy.train import PolicyTrainer

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    batch = PolicyBatch.from_sequences(seqs, [[0] + [1] * (len(s) - 1) for s in seqs],
                                       [1.0] * len(seqs))
    out = {}
    for name, tp, pp, source in (("hf_dir_tp2", 2, 1, "hf"), ("converted_pp2", 1, 2, "load")):
        cfg = DapoConfig()
        cfg.parallel.tp, cfg.parallel.pp = tp, pp
        cfg.trainer.max_tokens_per_microbatch = 40
        if source == "hf":
            cfg.model.hf_dir = hf_dir
        else:
            cfg.model.load = megatron_dir
        trainer = PolicyTrainer.from_config(cfg, hf_config, rank=rank, world_size=world_size)
        out[name] = trainer.compute_logprobs(batch).tolist()
        destroy_parallel()
    return out


@pytest.mark.dist
def test_hf_weights_and_converted_checkpoint_start_from_the_hf_model(tmp_path):
    """from_config's initial weights (HF safetensors under TP=2; tools/convert_hf.py's
    checkpoint under PP=2) score tokens like the HF model itself (float64 reference)."""
    from dapo_megatron.convert_hf import hf_to_megatron
    from tests.convert.tiny import VOCAB, make_hf_model

    hf_dir, megatron_dir = str(tmp_path / "hf"), str(tmp_path / "megatron")
    model = make_hf_model("llama", hf_dir, seed=3)
    hf_to_megatron(hf_dir, megatron_dir)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (12, 5, 9)]
    reference = []
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)[:-1].gather(-1, torch.tensor(s[1:])[:, None])
            reference.append([0.0] + logp[:, 0].tolist())
    out0, out1 = run_distributed(_converted_worker, 2, hf_dir, megatron_dir, seqs)
    assert out0 == out1
    for name in ("hf_dir_tp2", "converted_pp2"):
        got = torch.tensor(out0[name])
        for i, ref in enumerate(reference):
            torch.testing.assert_close(got[i, :len(ref)].double(),
                                       torch.tensor(ref, dtype=torch.float64),
                                       atol=1e-4, rtol=0)
            assert torch.all(got[i, len(ref):] == 0)
