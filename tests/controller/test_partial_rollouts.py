"""Partial rollouts and the staleness bound in the controller's rollout phase.

The real `EnginePool` and `RolloutManager` over scripted engines (tests/rollout/scripted.py):
a step that fills its batch while long responses are still generating carries them
(tokens, log-probs, versions); the next step, under new weights, continues them first and
trains on responses whose tokens equal the script's, each token with the log-prob and
version it was drawn under. Groups older than the bound are dropped and counted.
"""

import pytest
import torch

from dapo_megatron.algo import BatchAssembler
from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.controller import rollout_state
from dapo_megatron.controller.engines import EnginePool
from dapo_megatron.controller.rollout_phase import collect_train_groups, staleness_bound
from dapo_megatron.data.sampler import PromptSampler
from dapo_megatron.data.tokenizer import CharTokenizer
from dapo_megatron.rollout.partial import CarriedGroup
from dapo_megatron.rollout.protocol import Sample
from tests.controller.test_rollout_phase import InlineScorer, _answer_script, _cfg, _examples
from tests.rollout.scripted import ScriptedEngine, scripted_logprob


@pytest.fixture
def pool(monkeypatch):
    made, pools = [], []

    def start(self, index):
        made.append(ScriptedEngine(_answer_script(CharTokenizer()), step_s=0.002))
        return made[-1]

    monkeypatch.setattr(EnginePool, "_start_engine", start)

    def make(**over):
        p = EnginePool(_cfg(**{"rollout.num_engines": 2, **over}), hf_config={})
        pools.append(p)
        return p, made

    yield make
    for p in pools:
        p.shutdown()


def _set_version(pool, engines, version):
    """What a weight sync does to the versions (the scripted engines have no weights)."""
    for e in engines:
        e.weight_version = version
    pool.weight_version = version


def test_aborted_responses_are_carried_and_continued_under_new_weights(pool, tmp_path):
    over = {"rollout.partial_rollouts": True}
    p, engines = pool(**over)
    cfg, tok = _cfg(**over), CharTokenizer()
    script = _answer_script(tok)
    sampler = PromptSampler(_examples(32), seed=0, shuffle=False)
    assembler = BatchAssembler(5, 5, "drop")
    _set_version(p, engines, 0)
    first = collect_train_groups(cfg=cfg, step=1, sampler=sampler, tokenizer=tok, engines=p,
                                 scorer=InlineScorer(), assembler=assembler)
    # As in test_generated_count_equals_what_the_engines_produced: the batch fills in chunk
    # 2, its second group (prompt 5) is complete but unscored, chunk 3 (prompts 6 and 7,
    # 600-token preambles) is aborted part-way. All three are carried.
    assert [c.payload.index for c in first.carried] == [5, 6, 7]
    assert first.carried[0].complete
    partials = first.carried[1:]
    cut = {(c.payload.index, s.sample_index): len(s.token_ids) for c in partials for s in c.samples}
    assert all(0 < n < 600 for n in cut.values()) and all(not c.complete for c in partials)
    assert first.metrics()["partial/carried_responses"] == 8

    _set_version(p, engines, 1)  # step 1 trained and pushed version 1
    second = collect_train_groups(cfg=cfg, step=2, sampler=sampler, tokenizer=tok, engines=p,
                                  scorer=InlineScorer(), assembler=assembler, carried=first.carried)
    # Prompt 5 has no signal (0 of 4 correct) and is dropped by dynamic sampling; the two
    # continued groups come first, then fresh prompts 8, 9, 10 (5 fresh were drawn: 8 - 3).
    assert [g.example.index for g in second.groups] == [6, 7, 8, 9, 10]
    assert second.generated.continued == 8 and second.finished_partials == 8
    for g in second.groups[:2]:
        for s in g.samples:
            k = cut[g.example.index, s.sample_index]
            # The tokens the uninterrupted response would have (the script of the stream of
            # its first round), each token's log-prob and version from the call that drew it.
            assert s.token_ids == script(g.prompt_ids, s.request_id, s.sample_index)
            assert s.request_id == f"s1r0-{g.example.index}"
            assert s.token_versions == [0] * k + [1] * (len(s.token_ids) - k)
            assert s.logprobs == [scripted_logprob(t, s.sample_index, 0 if t < k else 1)
                                  for t in range(len(s.token_ids))]
    for g in second.groups[2:]:
        assert all(s.token_versions is None and s.weight_version == 1 for s in g.samples)
    m = second.metrics()
    assert m["staleness/max"] == 1.0 and 0 < m["staleness/mean"] < 1
    assert m["partial/continued_responses"] == 8 and m["partial/finished_responses"] == 8
    # The count: a continued response is counted once, its new tokens are.
    assert sum(e.continued for e in engines) == 8

    # What a checkpoint keeps of them comes back equal (plain JSON, floats exact).
    path = str(tmp_path)
    rollout_state.write(path, second.carried, second)
    carried, prefetched, surplus = rollout_state.read(path)
    assert carried == second.carried and prefetched == second and surplus == []
    assert [s.logprobs for g in prefetched.groups for s in g.samples] == \
        [s.logprobs for g in second.groups for s in g.samples]


def _group(index, version, n=4):
    from dapo_megatron.data.datasets import PromptExample

    ex = PromptExample(messages=[{"role": "user", "content": f"{index + 1}+2*3="}],
                       ground_truth=str(index + 7), index=index)
    samples = [Sample([5, 6], [-0.1, -0.1], "abort", 0, f"old-{index}", j, version) for j in range(n)]
    return CarriedGroup(ex, CharTokenizer().encode_prompt(ex.messages), samples, 0, f"old-{index}")


def test_groups_older_than_the_bound_are_dropped_and_counted(pool):
    over = {"rollout.partial_rollouts": True, "rollout.max_staleness": 2,
            "rollout.placement": "disaggregated"}
    p, engines = pool(**over)
    cfg, tok = _cfg(**over), CharTokenizer()
    assert staleness_bound(cfg.rollout) == 2
    _set_version(p, engines, 5)
    carried = [_group(20, 2), _group(21, 3), _group(22, 4)]  # 3, 2 and 1 versions old at v5
    result = collect_train_groups(cfg=cfg, step=6, sampler=PromptSampler(_examples(32), seed=0, shuffle=False),
                                  tokenizer=tok, engines=p, scorer=InlineScorer(),
                                  assembler=BatchAssembler(5, 5, "drop"), carried=carried)
    assert result.stale_dropped_groups == 1 and result.stale_dropped_responses == 4
    used = {g.example.index for g in result.groups} | {c.payload.index for c in result.carried}
    assert 20 not in used and {21, 22} & used  # the stale one was never continued
    assert result.metrics()["staleness/dropped_groups"] == 1

    # What an engine returns at an old version (a rollout trained on much later) is
    # dropped too: engines at v0, the policy at v3, bound 2: every group is too old.
    _set_version(p, engines, 0)
    late = collect_train_groups(cfg=cfg, step=4, sampler=PromptSampler(_examples(32), seed=0, shuffle=False),
                                tokenizer=tok, engines=p, scorer=InlineScorer(),
                                assembler=BatchAssembler(5, 2, "drop"), train_version=3)
    assert late.groups == [] and late.stats.rounds == 2
    assert late.stale_dropped_groups == 16 and late.stale_dropped_responses == 64


def test_the_synchronous_loop_drops_nothing(pool):
    p, engines = pool()
    cfg, tok = _cfg(), CharTokenizer()
    assert staleness_bound(cfg.rollout) == 0
    _set_version(p, engines, 0)
    # An engine behind the policy is not judged when neither feature is on (today's loop).
    result = collect_train_groups(cfg=cfg, step=3, sampler=PromptSampler(_examples(32), seed=0, shuffle=False),
                                  tokenizer=tok, engines=p, scorer=InlineScorer(),
                                  assembler=BatchAssembler(5, 5, "drop"), train_version=2)
    assert len(result.groups) == 5 and result.stale_dropped_groups == 0 and result.carried == []


def test_config_refuses_what_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        load_config(None, ["rollout.max_staleness=1"])  # colocated
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        load_config(None, ["rollout.max_staleness=-1"])
    # SGLang continues partial responses too (sglang_api.plan_samples).
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 32768}))
    assert load_config(None, ["rollout.partial_rollouts=true", "rollout.engine=sglang",
                              f"model.hf_dir={tmp_path}"]).rollout.partial_rollouts
    with pytest.raises(ConfigError, match="rollout.calls_per_engine"):
        load_config(None, ["rollout.calls_per_engine=-2"])
    cfg = load_config(None, ["rollout.max_staleness=1", "rollout.placement=disaggregated", "rollout.num_engines=1"])
    assert cfg.rollout.max_staleness == 1


def test_surplus_groups_survive_a_checkpoint_that_loads_weights_only(tmp_path):
    """algo.surplus=carry keeps groups for the next batch. They used to ride in the policy's
    common checkpoint state, which megatron loads with torch.load(weights_only=True): a
    non-empty list could not be resumed. They now go to rollout_state.json."""
    import io

    import megatron.core  # noqa: F401 - registers megatron's safe globals, as a resume does

    from dapo_megatron.algo import Group
    from dapo_megatron.controller.rollout_phase import ScoredGroup

    carried = _group(3, 0)
    carried.samples[1].routed_experts = torch.tensor([[[3, 1]], [[0, 2]]], dtype=torch.uint8)  # r3's routes
    scored = ScoredGroup(carried.payload, carried.prompt_ids, carried.samples, ["a", "b", "c", "d"],
                         [True, False, False, True], [1.0, -1.0, -1.0, 1.0], [None, "wrong", "wrong", None])
    surplus = [Group(payload=scored, rewards=torch.tensor([0.75, -1.0, -1.25, 1.0]),
                     correct=torch.tensor([True, False, False, True]))]
    buf = io.BytesIO()
    torch.save({"carried_groups": surplus}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(buf)  # what the old checkpoint layout met on resume
    rollout_state.write(str(tmp_path), [], None, surplus)
    _, _, got = rollout_state.read(str(tmp_path))
    assert len(got) == 1 and got[0].payload.texts == scored.texts
    assert got[0].payload.samples[1].routed_experts.dtype == torch.uint8
    assert torch.equal(got[0].payload.samples[1].routed_experts, scored.samples[1].routed_experts)
    assert torch.equal(got[0].rewards, surplus[0].rewards) and torch.equal(got[0].correct, surplus[0].correct)
