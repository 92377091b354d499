"""The DAPO train step on 2 gloo ranks: layout and micro-batching invariance, the global
token normaliser against a direct full-batch gradient, non-finite skipping, lr override."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

torch.set_num_threads(1)

VOCAB = 101


# ----- helpers shared with test_checkpoint.py / test_logprobs.py ---------------------------

def tiny_hf_model(arch: str = "llama", seed: int = 0):
    """A tiny HF-style config and random HF-named weights (no transformers import)."""
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.convert import model_args_from_hf
    from dapo_megatron.convert.rules import hf_shapes

    moe = arch in ("qwen3_moe", "mixtral")
    cfg = ModelConfig(architecture=arch, vocab_size=VOCAB, hidden_size=32, num_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=256, tie_word_embeddings=False,
                      num_experts=4 if moe else 0, moe_intermediate_size=32).hf_config_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(hf_shapes(model_args_from_hf(cfg)).items()):
        base = 1.0 if name.endswith("norm.weight") else 0.0
        state[name] = base + 0.1 * torch.randn(shape, generator=g)
    return cfg, state


def tiny_batch(seed: int = 0, n: int = 16, min_len: int = 6, max_len: int = 24):
    """Prompt + response sequences with a 4x spread of lengths and random advantages."""
    from dapo_megatron.policy.microbatch import PolicyBatch

    g = torch.Generator().manual_seed(seed)
    seqs, masks = [], []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        seqs.append(torch.randint(0, VOCAB, (length,), generator=g).tolist())
        masks.append([0] * prompt + [1] * (length - prompt))
    return PolicyBatch.from_sequences(seqs, masks, torch.randn(n, generator=g).tolist())


def make_trainer(hf, *, tp=1, pp=1, ep=1, budget=4096, mini_batches=2, lr=1e-2, seed=0,
                 rollout=None, **algo):
    from dapo_megatron.config import AlgoConfig, OptimizerConfig, ParallelConfig, TrainerConfig
    from dapo_megatron.policy.train import PolicyTrainer

    cfg, state = hf
    return PolicyTrainer(
        cfg, parallel=ParallelConfig(tp=tp, pp=pp, ep=ep),
        optim=OptimizerConfig(lr=lr, warmup_steps=1, weight_decay=0.1),
        algo=AlgoConfig(**algo),
        trainer=TrainerConfig(train_batch_size=mini_batches, mini_batch_size=1,
                              max_tokens_per_microbatch=budget, max_steps=10, seed=seed),
        rollout=rollout, hf_state_dict=state)


def with_old_logprobs(trainer, batch, seed=1):
    """The batch with old log-probs = current ones perturbed, so ratios != 1 and clip."""
    g = torch.Generator().manual_seed(seed)
    lp = trainer.compute_logprobs(batch)
    noise = 0.3 * torch.randn(lp.shape, generator=g) * batch.response_mask
    batch.old_logprobs = lp + noise
    return batch


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Canonical name -> full (TP-gathered) tensor of this pipeline stage's parameters."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron.convert.load import iter_local_params, tp_rank_and_size
    from dapo_megatron.policy.model import unwrap

    out = {}
    for chunk in trainer.model:
        model = unwrap(chunk)
        for _, canon, param in iter_local_params(model):
            t = param.detach().clone()
            _, size = tp_rank_and_size(canon)
            if getattr(param, "tensor_model_parallel", False) and size > 1:
                group = (ps.get_expert_tensor_parallel_group() if ".mlp.experts." in canon
                         else ps.get_tensor_model_parallel_group())
                parts = [torch.empty_like(t) for _ in range(size)]
                dist.all_gather(parts, t.contiguous(), group=group)
                dim = param.partition_dim
                if canon.endswith("linear_fc1.weight") and model.config.gated_linear_unit:
                    halves = [torch.chunk(p, 2, dim=0) for p in parts]
                    t = torch.cat([torch.cat([h[0] for h in halves], dim),
                                   torch.cat([h[1] for h in halves], dim)])
                else:
                    t = torch.cat(parts, dim)
            out[canon] = t
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def budget_for(batch, dp: int, count: int, mini_batches: int = 2) -> int:
    """The smallest token budget giving exactly ``count`` micro-batches per DP rank in
    every mini-batch of ``batch`` (packed rows: the trainer's default)."""
    from dapo_megatron.policy.microbatch import plan_microbatches, split_mini_batches

    parts = [batch.seq_lens[rows] for rows in split_mini_batches(batch.size, mini_batches)]
    for budget in range(int(batch.seq_lens.max()), 100_000):
        if all(plan_microbatches(p, dp, budget, packed=True).num_microbatches == count
               for p in parts):
            return budget
    raise AssertionError(f"no budget gives {count} micro-batches")


# ----- the direct reference of the normaliser ----------------------------------------------

def _direct_grad_norm(trainer, batch) -> float:
    """Gradient norm of the token-mean DAPO loss of the whole ``batch`` in one forward and
    backward without the schedule, micro-batching or normaliser logic (needs DP = 1)."""
    from megatron.core.distributed import finalize_model_grads

    from dapo_megatron.algo import policy_loss
    from dapo_megatron.policy.logprobs import token_logprobs_and_entropy
    from dapo_megatron.policy.model import causal_attention_mask

    model = trainer.model[0]
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    n, width = batch.input_ids.shape
    positions = torch.arange(width).expand(n, width)
    real = positions < batch.seq_lens[:, None]
    logits = model(batch.input_ids, positions, causal_attention_mask(real, width))
    lp, _ = token_logprobs_and_entropy(logits, batch.input_ids, vocab_size=VOCAB)
    loss, _ = policy_loss(lp, batch.old_logprobs, batch.advantages, batch.response_mask)
    loss.backward()
    finalize_model_grads(trainer.model)
    trainer.optimizer.prepare_grads()
    norm = float(trainer.optimizer.get_grad_norm())
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    return norm


def _train_worker(rank, world_size):
    from dapo_megatron.policy.parallel import destroy_parallel

    hf = tiny_hf_model()
    out = {}
    initial = make_trainer(hf, tp=1, lr=1e-3)
    batch = with_old_logprobs(initial, tiny_batch())  # one fixed batch for every run
    initial_weights = full_weights(initial)
    destroy_parallel()
    runs = {}
    for name, tp, count in [("tp1_mb1", 1, 1), ("tp1_mb4", 1, 4), ("tp2_mb1", 2, 1),
                            ("tp2_mb4", 2, 4)]:
        trainer = make_trainer(hf, tp=tp, budget=budget_for(batch, world_size // tp, count),
                               lr=1e-3)  # small steps: Adam amplifies rounding where g ~ 0
        metrics = trainer.train_step(batch)
        runs[name] = (metrics, full_weights(trainer))
        destroy_parallel()
    # GRPO's seq-mean aggregation: the global sequence count normalises the same way.
    for name, tp, count in [("seqmean_tp1_mb1", 1, 1), ("seqmean_tp2_mb4", 2, 4)]:
        trainer = make_trainer(hf, tp=tp, budget=budget_for(batch, world_size // tp, count),
                               lr=1e-3, loss_agg="seq-mean-token-mean")
        metrics = trainer.train_step(batch)
        runs[name] = (metrics, full_weights(trainer))
        destroy_parallel()
    out["seqmean_weight_diff"] = max_diff(runs.pop("seqmean_tp1_mb1")[1],
                                          runs.pop("seqmean_tp2_mb4")[1])
    ref_metrics, ref_weights = runs["tp1_mb1"]
    out["moved"] = max_diff(ref_weights, initial_weights)
    for name, (metrics, weights) in runs.items():
        out[f"{name}_weight_diff"] = max_diff(weights, ref_weights)
        for key in ("actor/microbatches", "actor/loss", "actor/grad_norm",
                    "actor/clip_frac_low", "actor/entropy", "actor/updates"):
            out[f"{name}_{key}"] = metrics[key]

    # The normaliser end to end: one update over the whole batch on DP=2 ranks with 4
    # micro-batches each has the gradient (norm) of the unsplit token-mean loss.
    trainer = make_trainer(hf, tp=2)
    out["direct_norm"] = _direct_grad_norm(trainer, batch)
    destroy_parallel()
    trainer = make_trainer(hf, tp=1, budget=budget_for(batch, 2, 4, mini_batches=1))
    single = trainer.train_step(batch, single_update=True)
    out["single_norm"], out["single_mb"] = single["actor/grad_norm"], single["actor/microbatches"]
    destroy_parallel()
    out.update(_skip_and_lr_override(hf))
    out.update(_moe_expert_parallel())
    return out


def _moe_expert_parallel():
    """MoE: one train step under EP=1 (DP=2) and EP=2; the same loss, gradient norm and
    log-probs afterwards (experts live on different ranks under EP=2)."""
    from dapo_megatron.policy.parallel import destroy_parallel

    hf, out, batch = tiny_hf_model("qwen3_moe"), {}, None
    for ep in (1, 2):
        trainer = make_trainer(hf, ep=ep, budget=64, lr=1e-3)
        batch = batch or with_old_logprobs(trainer, tiny_batch())
        metrics = trainer.train_step(batch)
        out[f"moe_ep{ep}"] = (metrics["actor/loss"], metrics["actor/grad_norm"],
                              trainer.compute_logprobs(tiny_batch(3)).tolist())
        destroy_parallel()
    return out


def _skip_and_lr_override(hf):
    """A NaN advantage on a response token: every update is skipped, nothing changes; then
    a temporary lr of 0 leaves the weights and the schedule where they were."""
    from dapo_megatron.policy.parallel import destroy_parallel

    trainer = make_trainer(hf, tp=2, budget=64)
    before = full_weights(trainer)
    b = with_old_logprobs(trainer, tiny_batch())
    b.advantages[3] = b.advantages[12] = float("nan")  # one row in each mini-batch
    bad = trainer.train_step(b)
    after_bad = full_weights(trainer)
    steps_after_bad = trainer.scheduler.num_steps
    with trainer.temporary_lr(0.0):
        zero = trainer.train_step(with_old_logprobs(trainer, tiny_batch(2)))
    result = dict(skipped=bad["actor/skipped_steps"], updates=bad["actor/updates"],
                  bad_diff=max_diff(after_bad, before), steps_after_bad=steps_after_bad,
                  zero_lr=zero["actor/lr"], zero_skipped=zero["actor/skipped_steps"],
                  zero_diff=max_diff(full_weights(trainer), before),
                  steps_after_zero=trainer.scheduler.num_steps,
                  lr_after=trainer.optimizer.param_groups[0]["lr"])
    destroy_parallel()
    return result


@pytest.fixture(scope="module")
def train_results():
    out0, out1 = run_distributed(_train_worker, 2)
    assert out0 == out1  # metrics are reduced identically on every rank
    return out0


@pytest.mark.dist
def test_train_step_is_invariant_to_tp_dp_and_microbatching(train_results):
    out = train_results
    # The runs really differ in micro-batch count per DP rank (2 updates each).
    for name, count in [("tp1_mb1", 1), ("tp1_mb4", 4), ("tp2_mb1", 1), ("tp2_mb4", 4)]:
        assert out[f"{name}_actor/microbatches"] == count
        assert out[f"{name}_actor/updates"] == 2
    assert out["moved"] > 5e-4  # the updates did change the weights
    # Same updated weights under TP=1 (DP=2) vs TP=2 (DP=1), and 1 vs 4 micro-batches.
    for name in ("tp1_mb4", "tp2_mb1", "tp2_mb4"):
        assert out[f"{name}_weight_diff"] < 1e-5, name
        for key in ("actor/loss", "actor/grad_norm", "actor/clip_frac_low", "actor/entropy"):
            ref = out[f"tp1_mb1_{key}"]
            assert abs(out[f"{name}_{key}"] - ref) <= 1e-5 * max(1.0, abs(ref)), (name, key)
    assert out["seqmean_weight_diff"] < 1e-5  # seq-mean-token-mean (GRPO) likewise


@pytest.mark.dist
def test_global_token_normaliser_matches_the_unsplit_loss_gradient(train_results):
    # Adam is blind to a uniform gradient scale (e.g. a missed 1/dp), so the normaliser is
    # checked on the gradient norm: DP=2 x 4 micro-batches vs one direct backward.
    out = train_results
    assert out["single_mb"] == 4
    assert out["direct_norm"] > 0.1
    assert abs(out["single_norm"] - out["direct_norm"]) <= 1e-5 * out["direct_norm"]


@pytest.mark.dist
def test_moe_train_step_under_expert_parallelism_matches_ep1(train_results):
    (loss1, norm1, lp1), (loss2, norm2, lp2) = train_results["moe_ep1"], train_results["moe_ep2"]
    assert abs(loss1 - loss2) <= 1e-5 and abs(norm1 - norm2) <= 1e-5 * norm1
    torch.testing.assert_close(torch.tensor(lp2), torch.tensor(lp1), atol=1e-5, rtol=0)


@pytest.mark.dist
def test_nonfinite_gradient_skips_update_and_temporary_lr_keeps_schedule(train_results):
    out = train_results
    assert out["skipped"] == out["updates"] == 2
    assert out["bad_diff"] == 0.0 and out["steps_after_bad"] == 0
    assert out["zero_lr"] == 0.0 and out["zero_skipped"] == 0
    assert out["zero_diff"] == 0.0  # lr 0: AdamW's step and decay are both scaled by lr
    assert out["steps_after_zero"] == 0 and out["lr_after"] == 0.0  # warmup step 0 lr
