"""The embedded task and its character tokenizer."""

from dapo_megatron.data.synthetic import ArithmeticProblem, arithmetic_splits
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
