"""Dynamic sampling in the controller, with a scripted reward distribution.

The engines are replaced by a scripted pool whose responses are just the answers we want
scored; the reward is the real scorer. The test follows the rounds, the kept counts, the
early abort, and checks that no all-correct or all-wrong group reaches the loss. The last
tests run the real `EnginePool` and `RolloutManager` over scripted engines: the step's
generated count equals what the engines produced, and a replaced engine leaves the
train batch unchanged.
"""

import pytest
import torch

from dapo_megatron.algo import BatchAssembler
from dapo_megatron.config import load_config
from dapo_megatron.controller.batch import build_rollout_batch
from dapo_megatron.controller.engines import EnginePool
from dapo_megatron.controller.rollout_phase import collect_train_groups
from dapo_megatron.data.datasets import PromptExample
from dapo_megatron.data.sampler import PromptSampler
from dapo_megatron.data.tokenizer import CharTokenizer
from dapo_megatron.reward import compute_score
from dapo_megatron.rollout.manager import GenerationCount
from dapo_megatron.rollout.protocol import Sample
from tests.rollout.scripted import ScriptedEngine


class InlineScorer:
    def score(self, texts, refs):
        return [compute_score(t, r) for t, r in zip(texts, refs)]


class ScriptedEngines:
    """Prompt p's group has `script[p]` correct answers out of G (the rest wrong)."""

    def __init__(self, tokenizer, script, chunk=4):
        self.tok, self.script, self.chunk = tokenizer, script, chunk
        self.generated_chunks = 0
        self.aborts = 0
        self.restarts = 0
        self.produced = GenerationCount()

    def generate_streaming(self, prompts, params, tag):
        for start in range(0, len(prompts), self.chunk):
            idx = list(range(start, min(start + self.chunk, len(prompts))))
            out = []
            for i in idx:
                text = self.tok.decode(prompts[i][1:])  # "<a>+<b>*<c>="
                key = int(text.split("+")[0])
                n_correct = self.script[key]
                a, rest = text.rstrip("=").split("+")
                b, c = rest.split("*")
                answer = int(a) + int(b) * int(c)
                group = []
                for j in range(params.n):
                    given = answer if j < n_correct else answer + 1
                    ids = self.tok.encode(f"Answer: {given}") + [self.tok.eos_id]
                    group.append(Sample(ids, [-0.1] * len(ids), "stop", i, f"{tag}-{i}", j))
                out.append(group)
            self.generated_chunks += 1
            self.produced.add_samples(out)
            yield idx, out

    def abort_all(self):
        self.aborts += 1


def _examples(n):
    # Prompt key a = i + 1 identifies the scripted number of correct answers.
    return [
        PromptExample(messages=[{"role": "user", "content": f"{i + 1}+2*3="}], ground_truth=str(i + 1 + 6), index=i)
        for i in range(n)
    ]


def _cfg(**over):
    items = ["algo.group_size=4", "trainer.train_batch_size=5", "trainer.mini_batch_size=5",
             "rollout.gen_batch_size=8", "algo.max_gen_batches=5", "algo.max_response_length=16",
             "algo.overlong_buffer=4", "rollout.max_prompt_length=16", "model.max_position_embeddings=64",
             "trainer.max_tokens_per_microbatch=64"]
    return load_config(None, items + [f"{k}={v}" for k, v in over.items()])


def test_rounds_kept_counts_and_no_flat_group_reaches_loss():
    cfg = _cfg()
    tok = CharTokenizer()
    # 16 prompts; G=4. Correct counts cycle through 0..4: only 1..3 carry signal (3 of 5).
    script = {i + 1: i % 5 for i in range(16)}
    engines = ScriptedEngines(tok, script)
    sampler = PromptSampler(_examples(16), seed=0, shuffle=False)
    assembler = BatchAssembler(5, 5, "drop")
    result = collect_train_groups(cfg=cfg, step=1, sampler=sampler, tokenizer=tok, engines=engines,
                                  scorer=InlineScorer(), assembler=assembler)
    # Round 1 (prompts 1..8: counts 0,1,2,3,4,0,1,2) keeps 1,2,3,1,2 = 5 groups; the 5th kept
    # group arrives in the second chunk, which fills the batch: abort, no second round.
    assert result.stats.rounds == 1
    assert result.stats.kept == 5 and result.stats.generated == 8 and result.stats.dropped == 3
    assert engines.aborts == 1
    assert len(result.groups) == 5
    for g in result.groups:
        assert 0 < sum(g.correct) < len(g.correct)
    batch = build_rollout_batch(result.groups, cfg.algo)
    adv = batch.advantages.view(5, 4)
    assert torch.all(adv.abs().sum(dim=1) > 0)  # every group carries a gradient signal
    # Correct responses have positive advantage, wrong ones negative.
    assert torch.all((adv > 0) == batch.correct.view(5, 4))


def test_round_limit_returns_short_batch():
    cfg = _cfg(**{"algo.max_gen_batches": 2})
    tok = CharTokenizer()
    script = {i + 1: (2 if i == 3 else 4) for i in range(16)}  # one useful prompt per 16
    engines = ScriptedEngines(tok, script)
    sampler = PromptSampler(_examples(16), seed=0, shuffle=False)
    result = collect_train_groups(cfg=cfg, step=1, sampler=sampler, tokenizer=tok, engines=engines,
                                  scorer=InlineScorer(), assembler=BatchAssembler(5, 2, "drop"))
    assert result.stats.rounds == 2 and result.stats.partial
    assert result.stats.generated == 16 and len(result.groups) == 1


def test_overlong_shaping_and_filtering_in_batch():
    cfg = _cfg(**{"algo.overlong_filter": True})
    tok = CharTokenizer()
    engines = ScriptedEngines(tok, {i + 1: 2 for i in range(16)})
    sampler = PromptSampler(_examples(16), seed=0, shuffle=False)
    result = collect_train_groups(cfg=cfg, step=1, sampler=sampler, tokenizer=tok, engines=engines,
                                  scorer=InlineScorer(), assembler=BatchAssembler(5, 5, "drop"))
    g = result.groups[0]
    # Make sample 0 truncated at L_max=16 and sample 1 inside the soft band (13 tokens > 12).
    g.samples[0] = Sample(list(range(3, 19)), [0.0] * 16, "length", 0, "x", 0)
    g.samples[1] = Sample(list(range(3, 16)), [0.0] * 13, "stop", 0, "x", 1)
    batch = build_rollout_batch(result.groups, cfg.algo)
    expected = torch.tensor(g.scores, dtype=torch.float64)
    expected[0] += -1.0  # |y| = L_max: ((16-4)-16)/4 = -1
    expected[1] += (12 - 13) / 4
    assert torch.allclose(batch.rewards[:4].double(), expected, atol=1e-6)
    assert batch.loss_weights[:4].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert bool(batch.truncated[0]) and not bool(batch.truncated[1])


# ------------------------------------------ the real pool and manager over scripted engines

# Correct answers out of G=4 for prompt key k, by (k - 1) % 8; the last two of every eight
# answer only after a long preamble (LONG tokens), so they are still generating when the
# batch fills.
PATTERN = [1, 2, 3, 1, 2, 0, 1, 3]
LONG = 600


def _answer_script(tok):
    def script(prompt, rid, j):
        a, rest = tok.decode(prompt[1:]).rstrip("=").split("+")
        b, c = rest.split("*")
        slot = (int(a) - 1) % 8
        answer = int(a) + int(b) * int(c)
        text = f"Answer: {answer if j < PATTERN[slot] else answer + 1}"
        if slot >= 6:
            text = "." * LONG + "\n" + text
        return tok.encode(text) + [tok.eos_id]
    return script


@pytest.fixture
def scripted_pool(monkeypatch):
    """make(num_engines, die_on_call=None) -> (EnginePool over ScriptedEngines, engines made)."""
    pools = []

    def make(num_engines, die_on_call=None):
        tok, made = CharTokenizer(), []

        def start(self, index):
            die = die_on_call if not made else None  # only the first engine dies
            made.append(ScriptedEngine(_answer_script(tok), step_s=0.002, die_on_call=die))
            return made[-1]

        monkeypatch.setattr(EnginePool, "_start_engine", start)
        pool = EnginePool(_cfg(**{"rollout.num_engines": num_engines}), hf_config={})
        pools.append(pool)
        return pool, made

    yield make
    for pool in pools:
        pool.shutdown()


def _steps(pool, steps=2):
    cfg, tok = _cfg(), CharTokenizer()
    sampler = PromptSampler(_examples(32), seed=0, shuffle=False)
    assembler = BatchAssembler(5, 5, "drop")
    return [collect_train_groups(cfg=cfg, step=s, sampler=sampler, tokenizer=tok, engines=pool,
                                 scorer=InlineScorer(), assembler=assembler) for s in range(1, steps + 1)]


def test_generated_count_equals_what_the_engines_produced(scripted_pool):
    pool, engines = scripted_pool(num_engines=2)
    results = _steps(pool)
    for r in results:
        # 8 prompts in chunks of 2. The batch fills at the first group of chunk 2, so its
        # second group is generated but never scored; chunk 3 (long answers) is aborted.
        assert r.stats.rounds == 1 and r.stats.generated == 5 and r.stats.kept == 5
        assert r.used_responses == 20 and r.generated.responses > 24
        assert r.generated.aborted > 0
    total = sum((r.generated for r in results), GenerationCount())
    assert total.responses == sum(e.responses for e in engines)
    assert total.tokens == sum(e.tokens for e in engines)
    assert total.aborted == sum(e.aborted for e in engines)
    # What the old count (groups scored x G) missed.
    assert total.responses > sum(r.stats.generated for r in results) * 4


def test_replaced_engine_leaves_the_train_batch_unchanged(scripted_pool):
    # Issue 23, finding 12. One engine, chunks of 4: the engine dies in chunk 0. Re-queued at
    # the end, chunk 0 came after chunk 1 and the batch was prompts 4, 6, 7, 0, 1.
    reference = _steps(scripted_pool(num_engines=1)[0], steps=1)[0]
    pool, engines = scripted_pool(num_engines=1, die_on_call=1)
    got = _steps(pool, steps=1)[0]
    assert pool.restarts == 1 and len(engines) == 2
    assert [g.example.index for g in reference.groups] == [0, 1, 2, 3, 4]
    assert [g.example.index for g in got.groups] == [0, 1, 2, 3, 4]
    assert [[s.token_ids for s in g.samples] for g in got.groups] == \
        [[s.token_ids for s in g.samples] for g in reference.groups]


class CountingEngines(ScriptedEngines):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.round_prompts = []

    def generate_streaming(self, prompts, params, tag):
        self.round_prompts.append(len(prompts))
        yield from super().generate_streaming(prompts, params, tag)


@pytest.mark.parametrize("adaptive", [False, True])
def test_adaptive_rounds_draw_what_the_keep_rate_says_the_batch_needs(adaptive):
    cfg = _cfg(**{"rollout.gen_batch_size": 16, "rollout.adaptive_gen_batch": adaptive})
    tok = CharTokenizer()
    engines = CountingEngines(tok, {i + 1: i % 5 for i in range(48)})  # 3 of every 5 mixed
    sampler = PromptSampler(_examples(48), seed=0, shuffle=False)
    assembler = BatchAssembler(5, 5, "drop", adaptive=cfg.rollout.adaptive_gen_batch)
    for step in (1, 2):
        result = collect_train_groups(cfg=cfg, step=step, sampler=sampler, tokenizer=tok, engines=engines,
                                      scorer=InlineScorer(), assembler=assembler)
        assert len(result.groups) == 5
    # Step 1 draws the configured 16 either way; its batch fills after 8 examined groups
    # (counts 0,1,2,3 | 4,0,1,2), a keep rate of 5/8. Adaptive, step 2 draws
    # 5 / (5/8) * 1.1 = 8.8 -> 9 prompts: the next 9 of the data, not 16.
    assert engines.round_prompts == ([16, 9] if adaptive else [16, 16])
    assert sampler.cursor == (16 + 9 if adaptive else 32)  # the prompts not drawn stay unused
