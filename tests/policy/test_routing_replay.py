"""MoE routing replay on 2 gloo ranks: a tiny Qwen3-MoE whose embedded engine records the
experts it used, and the Megatron policy at EP=2 and PP=2 replaying them.

The experts the trainer actually ran are read off megatron's own TopKRouter outputs (its
routing_map, through a forward hook), not from the replay code under test; the engine's
come from its HF routers (rollout/routing.py, checked against a full HF recompute in
tests/rollout/test_routing.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import run_distributed

torch.set_num_threads(1)

VOCAB = 97
PROMPTS = [[3, 14, 15, 92], [6, 5], [35, 89, 79, 32, 38], [46, 26, 43]]


def moe_config() -> dict:
    from dapo_megatron.config import ModelConfig

    return ModelConfig(architecture="qwen3_moe", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       max_position_embeddings=256, tie_word_embeddings=False, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32,
                       init_std=0.1).hf_config_dict()


def engine_batch(engine, seed: int = 7, prompts=PROMPTS):
    """Samples of the engine (routes included) as the PolicyBatch the trainer receives."""
    from dapo_megatron.policy.microbatch import PolicyBatch
    from dapo_megatron.rollout.protocol import SamplingParams

    params = SamplingParams(n=2, max_new_tokens=10, seed=seed, return_routed_experts=True)
    seqs, masks, engine_lp, routes = [], [], [], []
    for prompt, group in zip(prompts, engine.generate(prompts, params)):
        for s in group:
            seqs.append(prompt + s.token_ids)
            masks.append([0] * len(prompt) + [1] * len(s.token_ids))
            engine_lp.append([0.0] * len(prompt) + s.logprobs)
            routes.append(s.routed_experts)
    adv = torch.linspace(-1, 1, len(seqs)).tolist()
    return PolicyBatch.from_sequences(seqs, masks, adv, engine_logprobs=engine_lp,
                                      routed_experts=routes)


def perturb_routers(named_params, scale: float, seed: int, suffixes=("mlp.gate.weight",
                                                                     "mlp.router.weight")):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith(suffixes):
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g).to(p.dtype))


def save_moe(hf_dir: str, seed: int = 0) -> None:
    """A random tiny Qwen3-MoE written as an HF checkpoint (the hub's per-expert names)."""
    from dapo_megatron.rollout.embedded import build_hf_model

    torch.manual_seed(seed)
    build_hf_model(moe_config()).save_pretrained(hf_dir)


def load_moe(hf_dir: str):
    """(engine over the checkpoint, its HF-named weights for the policy)."""
    from transformers import AutoModelForCausalLM

    from dapo_megatron.rollout.embedded import EmbeddedEngine
    from tests.convert.tiny import read_hf_dir

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return EmbeddedEngine(model=model), read_hf_dir(hf_dir)


class UsedExperts:
    """The experts megatron's routers ran with, per micro-batch call: hooks on TopKRouter."""

    def __init__(self, trainer):
        from megatron.core.transformer.moe.router import TopKRouter

        from dapo_megatron.policy.model import unwrap

        self.calls = []
        self.layers = []
        for chunk in trainer.model:
            for module in unwrap(chunk).modules():
                if isinstance(module, TopKRouter):
                    self.layers.append(module.layer_number - 1)
                    module.register_forward_hook(self._hook(module.layer_number - 1))

    def _hook(self, layer):
        def hook(module, inputs, output):
            self.calls.append((layer, output[1].detach().clone()))
        return hook

    def compare(self, trainer, batch, routes, run):
        """Run ``run()`` (one forward-only pass over ``batch``) and compare the experts used
        at every real, known position with ``routes`` [batch, seq, layers, k]: returns
        (decisions compared, decisions that differ) over all positions, then over the
        response positions only."""
        self.calls.clear()
        run()
        micro, _ = trainer._micro_batches(batch)
        assert len(self.calls) == len(micro) * len(self.layers)
        counts = [0, 0, 0, 0]
        for m, mb in enumerate(micro):
            n, width = mb.forward_shape
            for layer, used_map in self.calls[m * len(self.layers):(m + 1) * len(self.layers)]:
                used = used_map.view(width, n, -1).transpose(0, 1)  # [n, width, experts]
                for r, row in enumerate(mb.rows):
                    length = int(batch.seq_lens[row])
                    # A packed row holds sequence r at its start (packing.PackedLayout).
                    at = (0, mb.packed.starts[r]) if mb.packed is not None else (r, 0)
                    want = routes[row, :length, layer].long()
                    known = (want >= 0).all(-1)
                    expected = torch.zeros(length, used.shape[-1], dtype=torch.bool)
                    expected.scatter_(1, want.clamp(min=0), True)
                    bad = (expected != used[at[0], at[1]:at[1] + length]).any(-1) & known
                    response = batch.response_mask[row, :length].bool()
                    counts[0] += int(known.sum())
                    counts[1] += int(bad.sum())
                    counts[2] += int((known & response).sum())
                    counts[3] += int((bad & response).sum())
        return counts


def _trainer(hf, state, layout, mode, packing=True, **overrides):
    from dapo_megatron.config import AlgoConfig, OptimizerConfig, ParallelConfig, TrainerConfig
    from dapo_megatron.policy.train import PolicyTrainer

    tp, pp, ep = layout
    return PolicyTrainer(
        hf, parallel=ParallelConfig(tp=tp, pp=pp, ep=ep),
        optim=OptimizerConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0),
        algo=AlgoConfig(routing_replay=mode),
        trainer=TrainerConfig(train_batch_size=2, mini_batch_size=1, max_tokens_per_microbatch=40,
                              max_steps=4, seed=0, sequence_packing=packing),
        hf_state_dict=state, **overrides)


def _gap(lp, batch):
    mask = batch.response_mask.bool()
    gap = (lp - batch.engine_logprobs).abs()[mask]
    return float(gap.max()), float(gap.mean())


def _replay_worker(rank, world_size, layout, hf_dir, packing=True):
    """r3 against the engine at one layout: unperturbed (log-probs to 1e-5), then with the
    engine's routers perturbed (none vs r3)."""
    from dapo_megatron.policy.parallel import destroy_parallel

    hf = moe_config()
    engine, state = load_moe(hf_dir)
    clean = engine_batch(engine)
    perturb_routers(engine.model.named_parameters(), 0.5, seed=3)
    noisy = engine_batch(engine, seed=8)

    out = {}
    trainer = _trainer(hf, state, layout, "r3", packing)
    used = UsedExperts(trainer)
    lp = {}
    out["clean_r3"] = used.compare(trainer, clean, clean.routed_experts,
                                   lambda: lp.update(r3=trainer.compute_logprobs(clean)))
    out["clean_gap"] = _gap(lp["r3"], clean)
    for mode in ("none", "r3"):
        trainer.algo = dataclasses.replace(trainer.algo, routing_replay=mode)
        holder = {}
        out[f"noisy_{mode}"] = used.compare(
            trainer, noisy, noisy.routed_experts,
            lambda: holder.update(prep=trainer._prepare(noisy)))
        prepared, metrics, _ = holder["prep"]
        out[f"noisy_{mode}_metrics"] = metrics
        out[f"noisy_{mode}_gap"] = _gap(prepared.old_logprobs, noisy)
    # A train step replays in its forward-backward too (the metrics come from _prepare).
    out["step"] = trainer.train_step(noisy)
    destroy_parallel()
    return out


@pytest.mark.dist
# No TP layout: megatron-core refuses MoE under TP without sequence parallelism in training
# mode (transformer/moe/moe_layer.py, MoELayer.forward) and SP needs a GPU here.
@pytest.mark.parametrize("layout,packing", [((1, 1, 2), True), ((1, 2, 1), True), ((1, 1, 2), False)],
                         ids=["ep2", "pp2", "ep2-padded"])
def test_r3_trains_on_the_engines_experts(layout, packing, tmp_path):
    save_moe(str(tmp_path))
    results = run_distributed(_replay_worker, 2, layout, str(tmp_path), packing)
    r0 = results[0]
    same = lambda m: {k: v for k, v in m.items() if k.startswith(("routing/", "mismatch/"))}  # noqa: E731
    for key in ("noisy_none_metrics", "noisy_r3_metrics", "step"):
        assert same(results[1][key]) == same(r0[key]) != {}  # every rank reports the same
    # Every rank checks its own layers (PP) and rows (EP: data parallel); summed, every
    # known decision of the batch was checked once per layer.
    total = lambda key: [sum(r[key][i] for r in results) for i in range(4)]  # noqa: E731
    compared, differ, _, _ = total("clean_r3")
    assert compared > 100 and differ == 0
    # Log-probs match the engine's to the dense-model tolerance (docs/DESIGN.md, 1e-5).
    assert r0["clean_gap"][0] < 1e-5, r0["clean_gap"]
    # The engine's routers perturbed: free routing differs and the metric says so ...
    _, differ_free, compared, differ_response = total("noisy_none")
    m_none, m_r3 = r0["noisy_none_metrics"], r0["noisy_r3_metrics"]
    assert differ_free > 0 and m_none["routing/mismatch_token_frac"] > 0
    # Without replay the experts used are the trainer's own choice: the metric counts them.
    assert m_none["routing/mismatch_decision_frac"] == pytest.approx(differ_response / compared,
                                                                     abs=1e-9)
    # ... the metric is the trainer's own choice in either mode (r3 measures it under replay) ...
    assert m_r3["routing/mismatch_decision_frac"] > 0
    # ... and with r3 the experts used agree exactly, and the log-prob mismatch falls.
    assert total("noisy_r3")[1] == 0
    assert r0["noisy_r3_gap"][0] < r0["noisy_none_gap"][0]
    assert r0["noisy_r3_gap"][1] < r0["noisy_none_gap"][1]
    assert m_r3["mismatch/logprob_abs_diff_max"] < m_none["mismatch/logprob_abs_diff_max"]
    assert r0["step"]["routing/mismatch_token_frac"] == m_r3["routing/mismatch_token_frac"]
    print(f"\nrouting replay {layout}: clean r3 gap {r0['clean_gap']}; perturbed engine: "
          f"none {m_none} gap {r0['noisy_none_gap']}; r3 {m_r3} gap {r0['noisy_r3_gap']}")


def _r2_worker(rank, world_size, hf_dir):
    """r2 at EP=2: the recorded routing is what the old pass's routers used, for every real
    position of every row (gathered over DP), and later passes replay it."""
    from dapo_megatron.policy.model import unwrap
    from dapo_megatron.policy.parallel import destroy_parallel

    engine, state = load_moe(hf_dir)
    batch = engine_batch(engine)
    trainer = _trainer(moe_config(), state, (1, 1, 2), "r2")
    used = UsedExperts(trainer)
    out = {}
    holder = {}
    free = dataclasses.replace(batch, routed_experts=None)
    counts = used.compare(trainer, batch, batch.routed_experts,
                          lambda: holder.update(prep=trainer._prepare(batch)))
    prepared, metrics, _ = holder["prep"]
    routes = prepared.routed_experts
    real = torch.arange(routes.shape[1])[None, :] < batch.seq_lens[:, None]
    out["complete"] = bool((routes[real] >= 0).all()) and bool((routes[~real] == -1).all())
    out["recorded_vs_used"] = used.compare(trainer, free, routes,
                                           lambda: trainer.compute_logprobs(free))
    out["engine_vs_free"] = counts
    out["metrics"] = metrics
    # The trainer's routers change: free routing moves, the r2 routes are still replayed.
    for chunk in trainer.model:
        perturb_routers(unwrap(chunk).named_parameters(), 1.0, seed=5)
    out["after_free"] = used.compare(trainer, free, routes, lambda: trainer.compute_logprobs(free))
    out["after_replay"] = used.compare(trainer, prepared, routes,
                                       lambda: trainer.compute_logprobs(prepared))
    destroy_parallel()
    return out


@pytest.mark.dist
def test_r2_replays_the_old_log_prob_pass_routing(tmp_path):
    save_moe(str(tmp_path))
    results = run_distributed(_r2_worker, 2, str(tmp_path))
    total = lambda key: [sum(r[key][i] for r in results) for i in range(4)]  # noqa: E731
    assert all(r["complete"] for r in results)
    compared, differ, _, _ = total("recorded_vs_used")
    assert compared > 100 and differ == 0
    assert total("after_free")[1] > 0  # the perturbed routers choose otherwise ...
    assert total("after_replay")[1] == 0  # ... but the replay holds the recorded experts
    # The metric: the old pass's own routing against the engine's (unperturbed: few differ).
    _, _, resp, resp_differ = total("engine_vs_free")
    assert results[0]["metrics"]["routing/mismatch_decision_frac"] == pytest.approx(
        resp_differ / resp, abs=1e-9)


def _recompute_worker(rank, world_size, hf_dir):
    """r3 at PP=2 (1F1B over several micro-batches): a train step with activation
    recompute, whose backward re-runs the routers, equals the one without."""
    from dapo_megatron.policy.parallel import destroy_parallel

    engine, state = load_moe(hf_dir)
    perturb_routers(engine.model.named_parameters(), 0.5, seed=3)
    batch = engine_batch(engine, seed=8)
    out = {}
    for recompute in (False, True):
        trainer = _trainer(moe_config(), state, (1, 2, 1), "r3", recompute=recompute)
        micro, _ = trainer._micro_batches(batch)
        out["micro"] = len(micro)
        metrics = trainer.train_step(batch)
        out[recompute] = {k: v for k, v in metrics.items()
                          if k.startswith(("actor/pg", "actor/grad_norm", "routing/", "mismatch/"))}
        out[(recompute, "lp")] = trainer.compute_logprobs(batch).tolist()
        destroy_parallel()
    return out


@pytest.mark.dist
def test_r3_with_activation_recompute_replays_in_backward(tmp_path):
    save_moe(str(tmp_path))
    out = run_distributed(_recompute_worker, 2, str(tmp_path))[0]
    assert out["micro"] > 2
    plain, recomputed = out[False], out[True]
    assert plain.keys() == recomputed.keys() and "actor/grad_norm" in plain
    for key in plain:
        assert recomputed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    # The updated weights agree too (log-probs after the step).
    torch.testing.assert_close(torch.tensor(out[(True, "lp")]), torch.tensor(out[(False, "lp")]),
                               atol=1e-5, rtol=0)


def test_routing_mismatch_counts_expert_sets_on_a_hand_worked_example():
    from dapo_megatron.policy.routing_replay import routing_mismatch, routes_tensor

    # One sequence of 3 positions, 2 layers, top-2; position 0 is the prompt (unmasked).
    engine = routes_tensor([torch.tensor([[[0, 1], [2, 3]],
                                          [[0, 1], [2, 3]],
                                          [[0, 1], [3, 1]]], dtype=torch.uint8)[:3]], 4)
    engine[0, 2, 0] = -1  # the engine did not report layer 0 at position 2
    trainer = engine.clone().to(torch.int32)
    trainer[0, 0, 0] = torch.tensor([2, 3])  # masked position: not counted
    trainer[0, 1, 0] = torch.tensor([1, 2])  # differs
    trainer[0, 2, 1] = torch.tensor([1, 3])  # same set, other order: agrees
    trainer[0, 2, 0] = torch.tensor([2, 3])  # engine unknown: not counted
    mask = torch.tensor([[False, True, True, False]])
    got = routing_mismatch(engine, trainer, mask)
    # Decisions: (1, l0) differs, (1, l1) and (2, l1) agree -> 1/3; tokens 1 and 2 -> 1/2.
    assert got == {"routing/mismatch_token_frac": 0.5, "routing/mismatch_decision_frac": 1 / 3}
    assert engine.dtype == torch.int16 and bool((engine[0, 3] == -1).all())  # padding


def test_routing_replay_is_refused_on_a_dense_model():
    from dapo_megatron.config import AlgoConfig, ConfigError, load_config
    from dapo_megatron.policy.train import _routing_replay

    base = ["model.hf_dir=null", "model.vocab_size=64", "model.max_position_embeddings=4096",
            "rollout.max_prompt_length=64", "algo.max_response_length=256",
            "algo.overlong_buffer=16", "trainer.max_tokens_per_microbatch=4096"]
    with pytest.raises(ConfigError, match="algo.routing_replay: r3 .* dense model"):
        load_config(None, base + ["algo.routing_replay=r3"])
    moe = base + ["model.architecture=qwen3_moe", "model.num_experts=4", "algo.routing_replay=r2"]
    assert load_config(None, moe).algo.routing_replay == "r2"
    # The trainer refuses it too (a PolicyTrainer built without the config validation).
    dense = dict(moe_config(), model_type="llama", architectures=["LlamaForCausalLM"])
    dense.pop("num_experts")
    with pytest.raises(ValueError, match="algo.routing_replay=r3 .* dense"):
        _routing_replay(dense, AlgoConfig(routing_replay="r3"), {})
    assert _routing_replay(dense, AlgoConfig(), {}) is None
