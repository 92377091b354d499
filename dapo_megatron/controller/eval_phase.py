"""avg@k and pass@k evaluation with the paper's sampling (temperature 1.0, top_p 0.7).

A phase of the loop (Trainer.evaluate); `dapo-megatron eval` drives it through
dapo_megatron/eval.py.

avg@k is the mean over prompts of the fraction of k samples that are correct (the paper's
AIME "avg@32"); pass@k is the fraction of prompts with at least one correct sample.
"""

from __future__ import annotations

import json
import logging
import time

from dapo_megatron.controller.examine import log_examples
from dapo_megatron.controller.rollout_phase import sampling_params, score_groups

logger = logging.getLogger(__name__)


def evaluate(cfg, examples, tokenizer, engines, scorer, *, k: int | None = None,
             seed: int = 0, out_path: str | None = None) -> dict[str, float]:
    """Sample k responses per eval prompt on `engines` and score them."""
    k = k or cfg.eval.k
    if cfg.eval.max_prompts:
        examples = examples[: cfg.eval.max_prompts]
    if not examples:
        return {}
    t0 = time.perf_counter()
    prompt_ids = [tokenizer.encode_prompt(ex.messages) for ex in examples]
    params = sampling_params(cfg, n=k, seed=seed, stop_ids=tokenizer.stop_ids, eval_mode=True)
    correct = [None] * len(examples)
    lengths, truncated = [], 0
    rows = []
    shown = {}  # data source -> its first prompt's group (chunks arrive in any order)
    progress = _Progress(len(examples), k)
    for chunk, samples in engines.generate_streaming(prompt_ids, params, tag=f"eval{seed}"):
        groups, _, _ = score_groups([examples[i] for i in chunk], [prompt_ids[i] for i in chunk],
                                    samples, tokenizer, scorer)
        for i, g in zip(chunk, groups):
            correct[i] = g.correct
            lengths.extend(len(s.token_ids) for s in g.samples)
            truncated += sum(g.truncated)
            first = shown.get(g.example.data_source)
            if first is None or g.example.index < first.example.index:
                shown[g.example.data_source] = g
            if out_path:
                rows.append({"index": g.example.index, "ground_truth": g.example.ground_truth,
                             "correct": g.correct, "responses": g.texts})
        progress.update([correct[i] for i in chunk])
    if any(c is None for c in correct):
        raise RuntimeError("evaluation lost prompts: an engine returned fewer groups than asked")
    if cfg.logging.num_examine:
        log_examples(sorted(shown.values(), key=lambda g: g.example.index), 1, tag="eval")
    avg = sum(sum(c) / len(c) for c in correct) / len(correct)
    pass_k = sum(any(c) for c in correct) / len(correct)
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return {
        "eval/avg@k": avg,
        "eval/pass@k": pass_k,
        "eval/k": float(k),
        "eval/num_prompts": float(len(examples)),
        "eval/length_mean": sum(lengths) / max(1, len(lengths)),
        "eval/length_max": float(max(lengths, default=0)),
        "eval/truncated_frac": truncated / max(1, len(lengths)),
        "time/eval": time.perf_counter() - t0,
    }


class _Progress:
    """One log line at most every `every_s` seconds, and one at the end: prompts done,
    avg@k so far, elapsed time and an estimate of the time left."""

    def __init__(self, total: int, k: int, every_s: float = 10.0) -> None:
        self.total, self.k, self.every_s = total, k, every_s
        self.done, self.correct = 0, 0
        self.t0 = self.last = time.perf_counter()
        logger.info("eval: %d prompts x %d samples", total, k)

    def update(self, chunk_correct: list[list[bool]]) -> None:
        self.done += len(chunk_correct)
        self.correct += sum(sum(c) for c in chunk_correct)
        now = time.perf_counter()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        logger.info("eval: %d/%d prompts | avg@%d so far %.3f | %.0f s, ~%.0f s left", self.done,
                    self.total, self.k, self.correct / max(1, self.done * self.k), elapsed, left)
