"""The embedded task: `a+b*c` arithmetic with a worked solution and an `Answer:` line.

It is what the embedded default trains on: small enough for a CPU model to learn in
minutes, hard enough (carries, two-digit sums) that a warm-started model answers some prompts
always, some never and most sometimes, which is what DAPO's dynamic sampling feeds on.

    prompt   "17+4*8="
    solution "4*8=32\\n17+32=49\\nAnswer: 49"

The held-out split is a fixed set of triples drawn with its own seed, disjoint from the
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
