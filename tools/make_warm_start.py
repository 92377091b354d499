"""Make the embedded default's warm-start checkpoint: supervised training on worked solutions.

RL needs a policy that already answers some prompts: DAPO's groups carry signal only when
0 < #correct < G. This tool trains the embedded config's model (an HF Llama-style model
built from the config's shape) on the embedded task's worked solutions, measures held-out
accuracy sampled at temperature 1 (avg@k) and greedy every `--eval-every` steps, and
writes an HF checkpoint (config.json + model.safetensors) that `model.hf_dir` can point to.
It stops once sampled accuracy reaches `--target` (a warm start well below its greedy
accuracy leaves RL room to teach, as with real base models), or at `--max-steps`.

    python tools/make_warm_start.py examples/tiny_cpu_scratch.yaml --out examples/tiny_warm_start

With `--noise` a share of the solutions carries one arithmetic slip (careless); with
`--ramble` a share re-checks steps (long): examples/tiny_chains.yaml names its commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dapo_megatron.config import load_config  # noqa: E402
from dapo_megatron.controller.task import load_task  # noqa: E402
from dapo_megatron.reward import compute_score  # noqa: E402
from dapo_megatron.rollout.embedded import EmbeddedEngine, build_hf_model  # noqa: E402
from dapo_megatron.rollout.protocol import SamplingParams  # noqa: E402

logger = logging.getLogger("make_warm_start")


def slipped_solution(solution: str, rng: random.Random) -> str:
    """The worked solution with one arithmetic slip (product or sum off by 1..10), carried
    through to the answer line, as a careless solver would write it."""
    lines = solution.split("\n")  # "b*c=p", "a+p=s", "Answer: s"
    (bc, p), (ap, s) = lines[0].split("="), lines[1].split("=")
    delta = rng.choice([d for d in range(-10, 11) if d != 0])
    if rng.random() < 0.5:  # slip in the product, carried into the sum
        a = ap.split("+")[0]
        p = str(max(0, int(p) + delta))
        s = str(int(a) + int(p))
        ap = f"{a}+{p}"
    else:  # slip in the sum
        s = str(max(0, int(s) + delta))
    return f"{bc}={p}\n{ap}={s}\nAnswer: {s}"


def slipped_chain_solution(solution: str, rng: random.Random) -> str:
    """A chain's worked solution (`data.synthetic_task=chains`) with one step's total off by
    1..10 (kept >= 0), every later line computed from the slipped total."""
    *steps, _ = solution.split("\n")
    parsed = []
    for line in steps:  # "12-3=9"
        lhs, _total = line.split("=")
        op = "+" if "+" in lhs else "-"
        prev, d = lhs.split(op)
        parsed.append((int(prev), op, int(d)))
    slip = rng.randrange(len(parsed))
    delta = rng.choice([d for d in range(-10, 11) if d != 0])
    lines, total = [], parsed[0][0]
    for i, (_, op, d) in enumerate(parsed):
        prev = total
        total = prev + d if op == "+" else prev - d
        if i == slip:
            total = max(0, total + delta)
        lines.append(f"{prev}{op}{d}={total}")
    return "\n".join(lines + [f"Answer: {total}"])


def rambling_solution(solution: str, rng: random.Random, recheck: float, loop: float = 0.0) -> str:
    """After each step line, with probability `recheck`, "check <line>" lines: a solver that
    re-verifies steps it already did, which makes a response longer without changing its
    answer. With `loop` = 0 a burst is one or two lines; with `loop` > 0 it goes on by one more
    line with probability `loop` each time (geometric, unbounded: mean 1 / (1 - loop) lines),
    a solver that can talk itself into a loop and run past any length limit."""
    *steps, answer = solution.split("\n")
    lines = []
    for line in steps:
        lines.append(line)
        if rng.random() < recheck:
            if loop:
                count = 1
                while rng.random() < loop:
                    count += 1
            else:
                count = rng.randint(1, 2)
            lines.extend([f"check {line}"] * count)
    return "\n".join(lines + [answer])


def _batch(task, rng, size, noise: float = 0.0, ramble: float = 0.0, recheck: float = 0.5,
           loop: float = 0.0, ramble_noise: float | None = None, max_len: int | None = None):
    """A supervised batch. A solution rambles with probability `ramble`; a rambling one slips
    with probability `ramble_noise` (default `noise`), so that long answers can be the
    careless ones, the long, low-quality responses DAPO's token-level loss is about. Sequences
    are cut at `max_len` tokens (a loop's tail past what the rollout can generate)."""
    tok = task.tokenizer
    slip = slipped_chain_solution if task.train[0].data_source == "chains" else slipped_solution
    seqs, masks = [], []
    for ex in rng.sample(task.train, size):
        prompt = tok.encode_prompt(ex.messages)
        solution = ex.metadata["solution"]
        if ramble_noise is None:  # the draws in this order reproduce the shipped warm starts
            slips = bool(noise) and rng.random() < noise
            rambles = bool(ramble) and rng.random() < ramble
        else:
            rambles = bool(ramble) and rng.random() < ramble
            slips = rng.random() < (ramble_noise if rambles else noise)
        if slips:
            solution = slip(solution, rng)
        if rambles:
            solution = rambling_solution(solution, rng, recheck, loop)
        response = tok.encode(solution) + [tok.eos_id]
        seqs.append((prompt + response)[:max_len])
        masks.append(([0] * len(prompt) + [1] * len(response))[:max_len])
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
    return ids, mask


def accuracy(model, task, k: int, max_new_tokens: int, seed: int = 1) -> tuple[float, float, float]:
    """(avg@k at temperature 1, greedy accuracy, the sampled responses' share cut at
    max_new_tokens) on the held-out split."""
    tok = task.tokenizer
    model.eval()
    engine = EmbeddedEngine(model=model, max_batch_size=512)
    prompts = [tok.encode_prompt(ex.messages) for ex in task.eval]
    stop = (tok.eos_id,)
    sampled = engine.generate(prompts, SamplingParams(n=k, max_new_tokens=max_new_tokens, stop_token_ids=stop, seed=seed))
    greedy = engine.generate(prompts, SamplingParams(n=1, top_k=1, max_new_tokens=max_new_tokens, stop_token_ids=stop))
    model.train()

    def frac(groups):
        hits = [compute_score(tok.decode(s.token_ids), ex.ground_truth).correct
                for ex, group in zip(task.eval, groups) for s in group]
        return sum(hits) / len(hits)

    truncated = [s.finish_reason == "length" for group in sampled for s in group]
    return frac(sampled), frac(greedy), sum(truncated) / len(truncated)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True, help="HF checkpoint directory to write")
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--target", type=float, default=0.3, help="stop at this sampled avg@k")
    parser.add_argument("--target-greedy", type=float, default=None, help="stop at this greedy accuracy")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="fraction of worked solutions with one arithmetic slip: a warm start that "
                             "knows the right path but samples slips, like a base model")
    parser.add_argument("--ramble", type=float, default=0.0,
                        help="fraction of worked solutions that re-check steps (see --recheck): a warm "
                             "start whose long answers sometimes run past algo.max_response_length")
    parser.add_argument("--recheck", type=float, default=0.5,
                        help="in a rambling solution, the chance that a step is followed by check lines")
    parser.add_argument("--loop", type=float, default=0.0,
                        help="with > 0, a burst of check lines goes on by one more line with this "
                             "probability each time (unbounded); 0: one or two lines")
    parser.add_argument("--ramble-noise", type=float, default=None,
                        help="slip probability of a rambling solution (default --noise): above "
                             "--noise, long answers are more often wrong")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default=None, help="continue from this HF checkpoint dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    cfg = load_config(args.config, args.overrides)
    task = load_task(cfg)
    if not task.embedded:
        parser.error("the warm start is for the embedded task (data.train_path must be empty)")
    hf_config = cfg.model.hf_config_dict(vocab_size=cfg.model.vocab_size or task.tokenizer.vocab_size)
    torch.manual_seed(args.seed)
    model = build_hf_model(hf_config)
    if args.init:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(os.path.join(args.init, "model.safetensors")), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise SystemExit(f"--init {args.init}: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Cosine decay to 0 over --max-steps: the late, small steps are what get digits exact.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, args.max_steps) / args.max_steps)))
    rng = random.Random(args.seed)
    # An unbounded loop is cut where the rollout would cut it (only with --loop: the shipped
    # warm starts' commands predate the cut and reproduce without it).
    max_len = cfg.rollout.max_prompt_length + cfg.algo.max_response_length if args.loop else None
    t0 = time.perf_counter()
    history = []
    for step in range(1, args.max_steps + 1):
        ids, mask = _batch(task, rng, args.batch_size, args.noise, args.ramble, args.recheck,
                           args.loop, args.ramble_noise, max_len)
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.max_steps:
            sampled, greedy, truncated = accuracy(model, task, args.k, cfg.algo.max_response_length)
            history.append({"step": step, "nll": loss.item(), "avg@k": sampled, "greedy": greedy,
                            "truncated": truncated, "seconds": time.perf_counter() - t0})
            logger.info("step %d  nll %.3f  held-out avg@%d %.3f  greedy %.3f  truncated %.3f  (%.0f s)",
                        step, loss.item(), args.k, sampled, greedy, truncated, time.perf_counter() - t0)
            _save(model, hf_config, args.out, history)
            if sampled >= args.target or (args.target_greedy is not None and greedy >= args.target_greedy):
                break
    logger.info("wrote %s", args.out)
    return 0


def _save(model, hf_config, out: str, history: list[dict]) -> None:
    from safetensors.torch import save_file

    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied: HF checkpoints store the embedding once
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump(history, f, indent=2)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
