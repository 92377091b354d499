"""The train step's own preparation on 2 gloo ranks (policy/train.py ``_prepare``,
policy/reference.py): pi_old recomputed on the ranks, the mismatch and the correction
against deliberately perturbed engine log-probs, the frozen reference under TP=2, DP=2 and PP=2,
and the loss variants' global normalisers under DP and micro-batching."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.policy.test_train import budget_for, full_weights, make_trainer, max_diff, tiny_batch, tiny_hf_model

torch.set_num_threads(1)


def perturb(lp, mask, seed=0):
    """Engine log-probs that disagree with the policy: small noise everywhere, +-1.5 on about
    one response token in five."""
    g = torch.Generator().manual_seed(seed)
    big = (torch.rand(lp.shape, generator=g) < 0.2).float()
    sign = torch.where(torch.rand(lp.shape, generator=g) < 0.5, -1.0, 1.0)
    noise = 0.02 * torch.randn(lp.shape, generator=g) + 1.5 * big * sign
    return lp + noise * mask


def _with_engine_logprobs(hf, tp, pp, seed):
    """``tiny_batch()`` with engine log-probs perturbed (``perturb``) from the initial policy's
    under (tp, pp), and those initial log-probs."""
    from dapo_megatron.policy.parallel import destroy_parallel

    batch = tiny_batch()
    initial = make_trainer(hf, tp=tp, pp=pp).compute_logprobs(batch)
    destroy_parallel()
    batch.engine_logprobs = perturb(initial, batch.response_mask, seed=seed)
    return batch, initial


def _worker(rank, world_size):
    from dapo_megatron.algo import correction_weights, mismatch_metrics
    from dapo_megatron.policy.parallel import destroy_parallel

    hf, out = tiny_hf_model(), {}
    for name, tp, pp in (("tp2", 2, 1), ("dp2", 1, 1), ("pp2", 1, 2)):
        batch = tiny_batch()
        trainer = make_trainer(hf, tp=tp, pp=pp, lr=1e-2, kl_coef=0.05,
                               rollout_correction="token-mask")
        initial = trainer.compute_logprobs(batch)
        batch.engine_logprobs = perturb(initial, batch.response_mask)
        with trainer.reference.onloaded() as model:
            out[f"{name}_ref_before"] = trainer.compute_logprobs(batch, model=model)
        prepared, metrics, deferred = trainer._prepare(batch)
        out[f"{name}_deferred"] = deferred
        weights = correction_weights(initial, batch.engine_logprobs, batch.response_mask,
                                     "token-mask", high=2.0)
        out[f"{name}_adv_diff"] = float((prepared.advantages - batch.advantages[:, None] * weights)
                                        .abs().max())
        out[f"{name}_masked"] = float(((weights == 0) & batch.response_mask).sum())
        out[f"{name}_mismatch"] = {k: metrics[f"mismatch/{k}"] for k in mismatch_metrics(
            initial, batch.engine_logprobs, batch.response_mask)}
        out[f"{name}_mismatch_ref"] = mismatch_metrics(initial, batch.engine_logprobs,
                                                       batch.response_mask)
        out[f"{name}_old_is_policy"] = bool(torch.equal(prepared.old_logprobs, initial))
        # Packed rows ([tokens, 1, h]) under TP=2: the frozen, unwrapped reference and the
        # DDP-wrapped policy already differ in the last bits at layer 0's QKV output (same
        # weights, same input; measured 9.5e-7 on log-probs); padded rows were bit-equal.
        out[f"{name}_ref_is_initial"] = bool(
            (prepared.ref_logprobs - initial).abs().max() <= 2e-6)
        first = trainer.train_step(batch)
        second = trainer.train_step(batch)
        out[f"{name}_kl"] = (first["actor/kl_loss"], second["actor/kl_loss"])
        out[f"{name}_correction"] = (first["correction/masked_frac"], first["correction/weight_mean"])
        out[f"{name}_moved"] = float((trainer.compute_logprobs(batch) - initial).abs().max())
        with trainer.reference.onloaded() as model:
            out[f"{name}_ref_after"] = trainer.compute_logprobs(batch, model=model)
        destroy_parallel()

    # rollout.old_logprobs=engine (no correction): no old-log-prob pass; the mismatch comes
    # from the first update's forward, on its rows, and the update is the one a batch with
    # pi_old = the engine's log-probs given makes.
    from dapo_megatron.config import RolloutConfig
    from dapo_megatron.policy.microbatch import split_mini_batches

    for name, tp, pp in (("dp2", 1, 1), ("pp2", 1, 2)):
        batch, initial = _with_engine_logprobs(hf, tp, pp, seed=2)
        engine = batch.engine_logprobs
        trainer = make_trainer(hf, tp=tp, pp=pp, rollout=RolloutConfig(old_logprobs="engine"))
        metrics = trainer.train_step(batch)
        first = split_mini_batches(batch.size, 2)[0]
        ref = mismatch_metrics(initial[first], engine[first], batch.response_mask[first])
        out[f"{name}_engine_mismatch"] = ({k: metrics[f"mismatch/{k}"] for k in ref}, ref)
        out[f"{name}_engine_pass"] = "time/old_logprobs" in metrics
        skipped = full_weights(trainer)
        destroy_parallel()
        given = tiny_batch()
        given.engine_logprobs, given.old_logprobs = engine, engine.clone()
        trainer = make_trainer(hf, tp=tp, pp=pp, rollout=RolloutConfig(old_logprobs="engine"))
        trainer.train_step(given)
        out[f"{name}_engine_weight_diff"] = _max_over_ranks(max_diff(skipped, full_weights(trainer)))
        destroy_parallel()

    # rollout.old_logprobs=policy (the default), no correction: the first update runs on the
    # weights the pass would, so it takes its own log-probs as pi_old and the pass scores
    # only the second update's rows; with one update there is no pass. The update equals the
    # one a batch with the whole pass precomputed makes, and mismatch/* covers every row.
    for name, tp, pp in (("dp2", 1, 1), ("pp2", 1, 2)):
        batch, initial = _with_engine_logprobs(hf, tp, pp, seed=3)
        engine = batch.engine_logprobs
        trainer = make_trainer(hf, tp=tp, pp=pp)
        scored = []
        pass_fn = trainer.compute_logprobs
        trainer.compute_logprobs = lambda b, **kw: scored.append(b.size) or pass_fn(b, **kw)
        metrics = trainer.train_step(batch)
        ref = mismatch_metrics(initial, engine, batch.response_mask)
        out[f"{name}_own_mismatch"] = ({k: metrics[f"mismatch/{k}"] for k in ref}, ref)
        out[f"{name}_own_scored"] = (list(scored), split_mini_batches(batch.size, 2)[1])
        out[f"{name}_own_clip"] = metrics["actor/clip_frac_low"] + metrics["actor/clip_frac_high"]
        scored.clear()
        trainer.train_step(tiny_batch(seed=5), single_update=True)
        out[f"{name}_own_single_scored"] = list(scored)
        own = full_weights(trainer)
        destroy_parallel()
        given = tiny_batch()
        given.engine_logprobs, given.old_logprobs = engine, initial.clone()
        trainer = make_trainer(hf, tp=tp, pp=pp)
        trainer.train_step(given)
        trainer.train_step(tiny_batch(seed=5), single_update=True)
        out[f"{name}_own_weight_diff"] = _max_over_ranks(max_diff(own, full_weights(trainer)))
        destroy_parallel()

    # The variants whose normaliser is global (GSPO's sequence mean, Dr. GRPO's constant)
    # with a correction on: DP=2 x 4 micro-batches updates the weights as DP=1 x 1 (TP=2) does.
    for loss in ("gspo", "drgrpo"):
        weights = {}
        for name, tp, count in (("tp2_mb1", 2, 1), ("dp2_mb4", 1, 4)):
            batch = tiny_batch()
            probe = make_trainer(hf, tp=2)
            batch.engine_logprobs = perturb(probe.compute_logprobs(batch), batch.response_mask, seed=1)
            destroy_parallel()
            trainer = make_trainer(hf, tp=tp, budget=budget_for(batch, 2 // tp, count), lr=1e-3,
                                   loss=loss, rollout_correction="seq-tis",
                                   gspo_eps_low=0.2, gspo_eps_high=0.28)
            metrics = trainer.train_step(batch)
            out[f"{loss}_{name}_mb"] = metrics["actor/microbatches"]
            out[f"{loss}_{name}_loss"] = metrics["actor/loss"]
            weights[name] = full_weights(trainer)
            destroy_parallel()
        out[f"{loss}_weight_diff"] = max_diff(weights["tp2_mb1"], weights["dp2_mb4"])
    return out


def _max_over_ranks(value: float) -> float:
    """A rank's figure over its own parameters (under PP, its stage's) -> the largest of all
    ranks', so that every rank returns the same fact about the whole model."""
    import torch.distributed as dist

    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


@pytest.fixture(scope="module")
def results():
    out0, out1 = run_distributed(_worker, 2)
    for key in out0:
        if isinstance(out0[key], torch.Tensor):
            assert torch.equal(out0[key], out1[key]), key
        else:
            assert out0[key] == out1[key], key
    return out0


@pytest.mark.dist
def test_prepare_computes_pi_old_mismatch_and_correction_on_the_ranks(results):
    for name in ("tp2", "dp2", "pp2"):
        assert results[f"{name}_old_is_policy"] and results[f"{name}_ref_is_initial"]
        assert results[f"{name}_masked"] > 5  # the perturbation pushed tokens out of the band
        assert results[f"{name}_adv_diff"] == 0.0
        assert results[f"{name}_mismatch"] == results[f"{name}_mismatch_ref"]
        masked_frac, weight_mean = results[f"{name}_correction"]
        assert 0 < masked_frac < 1 and weight_mean == pytest.approx(1 - masked_frac)


@pytest.mark.dist
def test_engine_pi_old_skips_the_old_logprob_pass(results):
    for name in ("dp2", "pp2"):
        assert not results[f"{name}_deferred"]  # a correction needs the policy's pass
        got, ref = results[f"{name}_engine_mismatch"]
        assert not results[f"{name}_engine_pass"]
        assert got["token_outside_frac"] == ref["token_outside_frac"] > 0
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        assert results[f"{name}_engine_weight_diff"] == 0.0


@pytest.mark.dist
def test_first_update_is_its_own_pi_old_and_the_pass_scores_the_rest(results):
    for name in ("dp2", "pp2"):
        scored, second = results[f"{name}_own_scored"]
        assert scored == [second.stop - second.start]  # one pass, the second update's rows
        assert results[f"{name}_own_single_scored"] == []  # one update: no pass
        got, ref = results[f"{name}_own_mismatch"]
        assert got["token_outside_frac"] == ref["token_outside_frac"] > 0
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        assert results[f"{name}_own_clip"] > 0  # lr 1e-2: the second update clips
        # Measured: 0.0 on an Intel machine (the same forward); 4.4e-7 on an AMD EPYC with
        # AVX2, where MKL's kernel for the pass's shape rounds differently from the update's.
        assert results[f"{name}_own_weight_diff"] < 1e-6


@pytest.mark.dist
def test_reference_is_the_frozen_initial_policy_in_every_layout(results):
    for name in ("dp2", "pp2"):
        torch.testing.assert_close(results[f"{name}_ref_before"], results["tp2_ref_before"],
                                   atol=1e-5, rtol=0)
    for name in ("tp2", "dp2", "pp2"):
        assert results[f"{name}_moved"] > 1e-3  # the policy moved ...
        assert torch.equal(results[f"{name}_ref_after"], results[f"{name}_ref_before"])  # ... not the reference
        first, second = results[f"{name}_kl"]
        assert 0 < first < second  # KL to the reference grows as the policy moves away


@pytest.mark.dist
@pytest.mark.parametrize("loss", ["gspo", "drgrpo"])
def test_global_normalisers_of_the_variants_are_split_invariant(results, loss):
    assert results[f"{loss}_tp2_mb1_mb"] == 1 and results[f"{loss}_dp2_mb4_mb"] == 4
    assert results[f"{loss}_tp2_mb1_loss"] == pytest.approx(results[f"{loss}_dp2_mb4_loss"], abs=1e-5)
    assert results[f"{loss}_weight_diff"] < 1e-5
