"""Routed experts from the rollout engines: the embedded engine's record against a full
recompute of the HF model (its own router logits), and SGLang 0.5.23's wire format."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.protocol import SamplingParams, compact_expert_ids
from tests.rollout.reference import tiny_config

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 8, 9, 10], [11]]


def _reference_routes(model, prompt, tokens, top_k):
    """Top-k experts per layer of one full forward over prompt + tokens[:-1], from the
    router logits transformers itself returns (output_router_logits), [positions, layers, k]."""
    ids = torch.tensor([list(prompt) + list(tokens[:-1])])
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    per_layer = [torch.topk(torch.softmax(logits.float(), -1), top_k, dim=-1).indices
                 for logits in out.router_logits]  # each [positions, k]
    return torch.stack(per_layer, dim=1)


def test_embedded_engine_records_the_experts_of_every_prompt_and_generated_position():
    torch.manual_seed(0)
    engine = EmbeddedEngine(tiny_config("qwen3_moe", init_range=0.5), max_batch_size=4)
    stops = list(range(0, 96, 7))  # some rows stop early, others run to the budget
    params = SamplingParams(n=3, max_new_tokens=9, stop_token_ids=stops, seed=5,
                            return_routed_experts=True)
    out = engine.generate(PROMPTS, params)
    lengths, checked = set(), 0
    for prompt, group in zip(PROMPTS, out):
        for s in group:
            routes = s.routed_experts
            assert routes.dtype == torch.uint8
            assert tuple(routes.shape) == (len(prompt) + len(s.token_ids) - 1, 2, 2)
            ref = _reference_routes(engine.model, prompt, s.token_ids, 2)
            # The set of experts matters, not their order.
            assert torch.equal(routes.long().sort(-1).values, ref.sort(-1).values)
            lengths.add(len(s.token_ids))
            checked += 1
    assert checked == 9 and len(lengths) > 1
    # Not degenerate: several experts are used at every layer.
    every = torch.cat([s.routed_experts for g in out for s in g]).long()
    assert all(len(every[:, layer].unique()) == 4 for layer in range(2))


def test_routes_are_not_recorded_unless_asked_or_without_experts():
    torch.manual_seed(0)
    moe = EmbeddedEngine(tiny_config("qwen3_moe"))
    params = SamplingParams(n=2, max_new_tokens=3, seed=1)
    assert all(s.routed_experts is None for g in moe.generate(PROMPTS, params) for s in g)
    dense = EmbeddedEngine(tiny_config("llama"))
    asked = SamplingParams(n=2, max_new_tokens=3, seed=1, return_routed_experts=True)
    assert all(s.routed_experts is None for g in dense.generate(PROMPTS, asked) for s in g)


def test_compact_expert_ids_picks_the_smallest_dtype():
    assert compact_expert_ids(torch.tensor([0, 255])).dtype == torch.uint8
    assert compact_expert_ids(torch.tensor([0, 256])).dtype == torch.int16
    with pytest.raises(ValueError, match="expert ids"):
        compact_expert_ids(torch.tensor([-1]))


def test_moe_engine_takes_hub_named_experts_in_a_sync(tmp_path):
    """The weight export sends the hub's per-expert names; transformers 5 keeps experts fused."""
    from tests.convert.tiny import read_hf_dir

    torch.manual_seed(0)
    target = EmbeddedEngine(tiny_config("qwen3_moe"))
    torch.manual_seed(1)
    source = EmbeddedEngine(tiny_config("qwen3_moe"))
    source.model.save_pretrained(tmp_path)  # transformers writes the hub's names
    hub = read_hf_dir(str(tmp_path))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in hub
    target.update_weights([list(hub.items())], version=1)
    theirs = source.model.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in target.model.state_dict().items())
    # Every expert must arrive: a sync without one expert's down_proj is refused.
    target.begin_weight_update(2)
    target.load_weight_bucket([(k, t) for k, t in hub.items()
                               if k != "model.layers.1.mlp.experts.2.down_proj.weight"])
    with pytest.raises(KeyError, match="experts.2.down_proj"):
        target.end_weight_update()
    # The engine's own (fused) buckets still load.
    target.update_weights(source.state_dict_buckets(), version=3)


def test_hub_state_dict_is_what_transformers_saves(tmp_path):
    """The from-scratch policy initialises from an HF model's weights under the hub's names."""
    from dapo_megatron.rollout.buckets import hub_state_dict
    from tests.convert.tiny import read_hf_dir

    torch.manual_seed(0)
    model = EmbeddedEngine(tiny_config("qwen3_moe")).model
    model.save_pretrained(tmp_path)
    saved, ours = read_hf_dir(str(tmp_path)), hub_state_dict(model)
    assert sorted(ours) == sorted(saved)
    assert all(torch.equal(ours[k], saved[k]) for k in saved)
