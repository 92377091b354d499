"""The embedded tasks: worked solutions, one step per line, ending in an `Answer:` line.

`arithmetic` (the default, `data.synthetic_task`): `a+b*c`.

It is what the embedded default trains on: small enough for a CPU model to learn in
minutes, hard enough (carries, two-digit sums) that a warm-started model answers some prompts
always, some never and most sometimes, which is what DAPO's dynamic sampling feeds on.

    prompt   "17+4*8="
    solution "4*8=32\\n17+32=49\\nAnswer: 49"

`chains`: a left-to-right chain of n additions and subtractions of digits, n drawn
uniformly from `data.synthetic_min_steps..synthetic_max_steps`, one line per step, so the
worked solution's length grows with n (17 characters at n=1, up to 66 at n=7): the task on
which length-dependent mechanisms (token-level loss, overlong shaping) have something to act.

    prompt   "7+5-3+9="
    solution "7+5=12\n12-3=9\n9+9=18\nAnswer: 18"

The held-out split is a fixed set of problems drawn with its own seed, disjoint from the
training triples, so avg@k numbers are comparable across runs and seeds.
"""

from __future__ import annotations

import dataclasses
import random

EVAL_SEED = 20250314  # fixed: the held-out split must not move with the run's seed


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    a: int
    b: int
    c: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}*{self.c}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b * self.c)

    @property
    def solution(self) -> str:
        product = self.b * self.c
        return f"{self.b}*{self.c}={product}\n{self.a}+{product}={self.a + product}\nAnswer: {self.answer}"


def _all_triples(max_addend: int, max_factor: int) -> list[tuple[int, int, int]]:
    factors = range(1, max_factor + 1)
    return [(a, b, c) for a in range(1, max_addend + 1) for b in factors for c in factors]


def arithmetic_splits(
    max_addend: int, max_factor: int, eval_size: int, train_size: int
) -> tuple[list[ArithmeticProblem], list[ArithmeticProblem]]:
    """(train, eval) problem lists, a in 1..max_addend and b, c in 1..max_factor; disjoint
    and deterministic.

    The eval split depends only on the ranges and eval_size; train takes `train_size` of the
    remaining triples (all of them if fewer remain) in a fixed order (the sampler shuffles).
    """
    triples = _all_triples(max_addend, max_factor)
    if eval_size >= len(triples):
        raise ValueError(
            f"data.synthetic_eval_size={eval_size} leaves no training problems (only "
            f"{len(triples)} triples with max_addend={max_addend}, max_factor={max_factor})"
        )
    rng = random.Random(EVAL_SEED)
    rng.shuffle(triples)
    eval_split = [ArithmeticProblem(*t) for t in triples[:eval_size]]
    train_split = [ArithmeticProblem(*t) for t in triples[eval_size : eval_size + train_size]]
    return train_split, eval_split


@dataclasses.dataclass(frozen=True)
class ChainProblem:
    start: int
    steps: tuple[tuple[str, int], ...]  # ("+", 5), ("-", 3): applied left to right

    @property
    def prompt(self) -> str:
        return str(self.start) + "".join(f"{op}{d}" for op, d in self.steps) + "="

    @property
    def totals(self) -> list[int]:
        """The running total after each step."""
        out, total = [], self.start
        for op, d in self.steps:
            total = total + d if op == "+" else total - d
            out.append(total)
        return out

    @property
    def answer(self) -> str:
        return str(self.totals[-1])

    @property
    def solution(self) -> str:
        lines, prev = [], self.start
        for (op, d), total in zip(self.steps, self.totals):
            lines.append(f"{prev}{op}{d}={total}")
            prev = total
        return "\n".join(lines + [f"Answer: {self.answer}"])


def _random_chain(rng: random.Random, min_steps: int, max_steps: int) -> ChainProblem:
    """Start and operands are digits 1..9; a subtraction is drawn only where it keeps the
    running total >= 0, so every line is plain non-negative arithmetic."""
    total = start = rng.randint(1, 9)
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        d = rng.randint(1, 9)
        op = "-" if d <= total and rng.random() < 0.5 else "+"
        total = total + d if op == "+" else total - d
        steps.append((op, d))
    return ChainProblem(start, tuple(steps))


def chain_splits(
    min_steps: int, max_steps: int, eval_size: int, train_size: int
) -> tuple[list[ChainProblem], list[ChainProblem]]:
    """(train, eval) chain problems with min_steps..max_steps steps; distinct prompts,
    disjoint and deterministic. The eval split depends only on the range and eval_size
    (its own seed); train draws from a second fixed stream, skipping any prompt seen."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"data.synthetic_min_steps={min_steps}, data.synthetic_max_steps={max_steps}: "
                         "need 1 <= min_steps <= max_steps")
    seen: set[str] = set()

    def draw(seed: int, count: int) -> list[ChainProblem]:
        rng, out = random.Random(seed), []
        for _ in range(50 * count + 1000):  # bounded: a narrow range has few distinct chains
            if len(out) == count:
                return out
            p = _random_chain(rng, min_steps, max_steps)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
        raise ValueError(f"data.synthetic_eval_size/train_size: only {len(seen)} distinct chains with "
                         f"{min_steps}..{max_steps} steps were found; lower the sizes or widen the range")

    eval_split = draw(EVAL_SEED, eval_size)
    train_split = draw(EVAL_SEED + 1, train_size)
    return train_split, eval_split
