"""The embedded tasks (arithmetic, chains), the chains warm start's data and the tokenizer."""

import importlib.util
import os
import random

import pytest

from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.controller.task import load_task
from dapo_megatron.data.synthetic import ArithmeticProblem, ChainProblem, arithmetic_splits, chain_splits
from dapo_megatron.data.tokenizer import CharTokenizer
from dapo_megatron.reward import compute_score


def test_problem_text_and_worked_solution():
    p = ArithmeticProblem(17, 4, 8)
    assert p.prompt == "17+4*8="
    assert p.answer == "49"
    assert p.solution == "4*8=32\n17+32=49\nAnswer: 49"
    # The rule reward reads the solution's Answer line as correct, a slip as wrong.
    assert compute_score(p.solution, p.answer).score == 1.0
    assert compute_score(p.solution.replace("49", "48"), p.answer).score == -1.0


def test_splits_are_disjoint_deterministic_and_fixed_by_range():
    train, ev = arithmetic_splits(20, 9, 300, 10_000)
    assert len(ev) == 300 and len(train) == 20 * 81 - 300
    assert not {(p.a, p.b, p.c) for p in train} & {(p.a, p.b, p.c) for p in ev}
    train2, ev2 = arithmetic_splits(20, 9, 300, 100)
    assert ev2 == ev and train2 == train[:100]  # eval split does not move with train size
    assert all(1 <= p.a <= 20 and 1 <= p.b <= 9 and 1 <= p.c <= 9 for p in train + ev)


def test_char_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    text = "4*8=32\n17+32=49\nAnswer: 49"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text  # specials never decode
    prompt = tok.encode_prompt([{"role": "user", "content": "1+2*3="}])
    assert prompt[0] == tok.bos_id and tok.decode(prompt) == "1+2*3="
    assert tok.decode(tok.encode("é")) == "?"  # unknown characters never fail to encode
    assert max(ids) < tok.vocab_size


# ----- the chains task (data.synthetic_task=chains) -------------------------------------

def test_chain_problem_hand_worked():
    p = ChainProblem(7, (("+", 5), ("-", 3), ("+", 9)))
    assert p.prompt == "7+5-3+9="
    assert p.totals == [12, 9, 18]
    assert p.solution == "7+5=12\n12-3=9\n9+9=18\nAnswer: 18"
    assert compute_score(p.solution, p.answer).score == 1.0
    assert compute_score(p.solution.replace("18", "17"), p.answer).score == -1.0


def test_chain_splits_disjoint_deterministic_and_lengths_vary_with_n():
    train, ev = chain_splits(1, 7, 200, 3000)
    assert len(ev) == 200 and len(train) == 3000
    prompts = [p.prompt for p in train + ev]
    assert len(set(prompts)) == len(prompts)  # distinct, and train never holds an eval prompt
    train2, ev2 = chain_splits(1, 7, 200, 100)
    assert ev2 == ev and train2 == train[:100]  # eval split does not move with train size
    for p in train + ev:
        assert 1 <= len(p.steps) <= 7 and 1 <= p.start <= 9
        assert all(1 <= d <= 9 for _, d in p.steps) and min(p.totals) >= 0
        # + and - are left-associative, so Python's own evaluation is an independent reference.
        assert int(p.answer) == eval(p.prompt[:-1])
        assert len(p.solution.split("\n")) == len(p.steps) + 1  # one line per step
    by_n = {}
    for p in train:
        by_n.setdefault(len(p.steps), []).append(len(p.solution))
    assert set(by_n) == set(range(1, 8))
    mean = {n: sum(v) / len(v) for n, v in by_n.items()}
    assert mean[7] > 3 * mean[1]  # several-fold longer worked solutions for long chains
    assert max(len(p.solution) for p in train) <= 66


def test_chain_splits_reject_bad_ranges():
    with pytest.raises(ValueError, match="synthetic_min_steps"):
        chain_splits(3, 2, 10, 10)
    with pytest.raises(ValueError, match="distinct chains"):
        chain_splits(1, 1, 200, 10_000)  # only ~125 one-step chains exist


def test_load_task_selects_chains_and_config_refuses_bad_range():
    cfg = load_config(None, ["data.synthetic_task=chains", "data.synthetic_eval_size=20",
                             "data.synthetic_train_size=50", "rollout.gen_batch_size=16",
                             "trainer.train_batch_size=8", "trainer.mini_batch_size=8"])
    task = load_task(cfg)
    assert task.embedded and len(task.train) == 50 and len(task.eval) == 20
    ex = task.eval[0]
    assert ex.data_source == "chains-heldout"
    assert compute_score(ex.metadata["solution"], ex.ground_truth).correct
    assert load_task(load_config(None, ["data.synthetic_eval_size=20"])).train[0].data_source == "arithmetic"
    with pytest.raises(ConfigError, match="data.synthetic_min_steps"):
        load_config(None, ["data.synthetic_min_steps=4", "data.synthetic_max_steps=3"])


def _warm_start_tool():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_warm_start.py")
    spec = importlib.util.spec_from_file_location("make_warm_start", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_careless_chain_solution_slips_one_step_and_carries_it():
    tool = _warm_start_tool()
    p = ChainProblem(7, (("+", 5), ("-", 3), ("+", 9), ("+", 4)))
    rng = random.Random(0)
    for _ in range(50):
        text = tool.slipped_chain_solution(p.solution, rng)
        *lines, answer = text.split("\n")
        assert len(lines) == len(p.steps)
        wrong = []
        prev = p.start
        for i, ((op, d), line) in enumerate(zip(p.steps, lines)):
            lhs, total = line.split("=")
            assert lhs == f"{prev}{op}{d}"  # each line starts from the previous line's total
            if int(total) != (prev + d if op == "+" else prev - d):
                wrong.append(i)
            prev = int(total)
        assert len(wrong) == 1 and answer == f"Answer: {prev}"
        assert compute_score(text, p.answer).score == -1.0


def test_rambling_chain_solution_is_longer_and_keeps_the_answer():
    tool = _warm_start_tool()
    p = ChainProblem(7, (("+", 5), ("-", 3), ("+", 9)))
    text = tool.rambling_solution(p.solution, random.Random(1), recheck=1.0)
    lines = text.split("\n")
    checks = [ln for ln in lines if ln.startswith("check ")]
    assert len(checks) >= 3 and all(ln[len("check "):] in p.solution.split("\n") for ln in checks)
    assert [ln for ln in lines if not ln.startswith("check ")] == p.solution.split("\n")
    assert compute_score(text, p.answer).score == 1.0
    assert tool.rambling_solution(p.solution, random.Random(1), recheck=0.0) == p.solution


def test_looping_ramble_bursts_are_geometric_and_unbounded():
    """--loop: each burst of check lines goes on by one more line with probability `loop`, so
    its length is geometric with mean 1 / (1 - loop) and has no upper bound."""
    tool = _warm_start_tool()
    p = ChainProblem(7, (("+", 5),))
    rng = random.Random(3)
    counts = []
    for _ in range(4000):
        text = tool.rambling_solution(p.solution, rng, recheck=1.0, loop=0.8)
        lines = text.split("\n")
        assert [ln for ln in lines if not ln.startswith("check ")] == p.solution.split("\n")
        counts.append(sum(ln == "check 7+5=12" for ln in lines))
    mean = sum(counts) / len(counts)
    assert abs(mean - 5.0) < 0.25  # 1 / (1 - 0.8); the sample mean's std is ~0.07
    assert max(counts) > 20  # P(> 20) = 0.8**20 ~ 1.2% per burst: no cap at two lines
    assert abs(sum(c == 1 for c in counts) / len(counts) - 0.2) < 0.03


def test_rambling_solutions_slip_at_their_own_rate():
    """--ramble-noise: rambling solutions slip at that rate, the others at --noise, so long
    answers are the careless ones; without it the draws are the shipped warm starts' own."""
    from dapo_megatron.controller.task import load_task

    tool = _warm_start_tool()
    task = load_task(load_config(None, ["data.synthetic_task=chains", "data.synthetic_eval_size=20",
                                        "data.synthetic_train_size=2000"]))
    tok = task.tokenizer
    truth = {tuple(tok.encode_prompt(ex.messages)): ex for ex in task.train}
    rng = random.Random(0)
    tally = {True: [0, 0], False: [0, 0]}  # rambles -> [wrong, all]
    for _ in range(20):
        ids, mask = tool._batch(task, rng, 100, noise=0.1, ramble=0.5, recheck=1.0, loop=0.5,
                                ramble_noise=0.7, max_len=64)
        assert ids.shape[1] <= 64
        for row, m in zip(ids.tolist(), mask.tolist()):
            start = m.index(1.0)
            ex = truth[tuple(row[:start])]
            text = tok.decode([t for t, k in zip(row[start:], m[start:]) if k and t != tok.eos_id])
            if "Answer:" not in text:
                continue  # cut at max_len
            rambles = "check " in text
            tally[rambles][0] += compute_score(text, ex.ground_truth).score < 0
            tally[rambles][1] += 1
    wrong_ramble = tally[True][0] / tally[True][1]
    wrong_clean = tally[False][0] / tally[False][1]
    assert abs(wrong_ramble - 0.7) < 0.06 and abs(wrong_clean - 0.1) < 0.04
