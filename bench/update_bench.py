"""The policy update against a plain transformers update, at the tiny default's shape.

One rollout step's training, as `examples/tiny_cpu.yaml` runs it: 256 sequences (prompts of
8-14 tokens, responses of 18-34, as the embedded task's), 2 optimizer updates of 128, on
the shipped warm start, one thread, one rank.

- megatron: `PolicyTrainer.train_step` (policy/train.py): packed rows, the DAPO loss with
  entropy, Megatron's optimizer and gradient clipping; pi_old given, so no old-log-prob pass.
- transformers: the same model loaded by transformers, each update a forward of the 128
  sequences right-padded to the longest, the same token-level clipped loss over response
  tokens, backward, gradient clipping, `torch.optim.AdamW` step. This is what a trainer
  built on transformers (TRL's GRPOTrainer) does per update, minus its bookkeeping.

Both run alternately, best of `--repeats`; the last line is

    update: megatron X s, transformers Y s, ratio R

(R = X / Y, seconds for the whole step of 2 updates). The peer benchmark's reasoning
(README, "Against TRL") uses it: the update is most of a step's cost at this size.

    python bench/update_bench.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _batch(vocab: int, n: int, seed: int = 0):
    rng = random.Random(seed)
    seqs, masks = [], []
    for _ in range(n):
        p, r = rng.randint(8, 14), rng.randint(18, 34)
        seqs.append([rng.randrange(3, vocab) for _ in range(p + r)])
        masks.append([False] * p + [True] * r)
    advantages = [rng.choice([-1.0, 1.0]) for _ in range(n)]
    return seqs, masks, advantages


def _hf_update(model, opt, seqs, masks, advantages, old, eps_low, eps_high, clip):
    """One transformers update: padded forward, token-level clipped loss, backward, step."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)], attn[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1, torch.tensor(m)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:]
    ratio = torch.exp(lp - old[:, 1:width])
    adv = torch.tensor(advantages)[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    loss = -(surrogate * m).sum() / m.sum()
    with torch.no_grad():  # the entropy the trainer logs
        (-(logp_all.exp() * logp_all).sum(-1) * m).sum() / m.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "examples/tiny_cpu.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from dapo_megatron.config import load_config
    from dapo_megatron.policy.microbatch import PolicyBatch
    from dapo_megatron.policy.train import PolicyTrainer
    from dapo_megatron.ports import free_port

    cfg = load_config(args.config, [])
    with open(os.path.join(ROOT, cfg.model.hf_dir, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    trainer = PolicyTrainer.from_config(cfg, hf_config, rank=0, world_size=1,
                                        master_addr="127.0.0.1", master_port=free_port())
    n = cfg.trainer.train_batch_size * cfg.algo.group_size
    per_update = cfg.trainer.mini_batch_size * cfg.algo.group_size
    seqs, masks, advantages = _batch(hf_config["vocab_size"], n)
    old = trainer.compute_logprobs(PolicyBatch.from_sequences(seqs, masks, advantages))
    olds = [old[i, :len(s)].tolist() for i, s in enumerate(seqs)]
    batch = PolicyBatch.from_sequences(seqs, masks, advantages, old_logprobs=olds)

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, cfg.model.hf_dir), dtype=torch.float32)
    hf.train()
    o = cfg.optimizer
    opt = torch.optim.AdamW(hf.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                            eps=o.adam_eps, weight_decay=o.weight_decay)

    def megatron():
        trainer.train_step(batch)

    def transformers():
        for start in range(0, n, per_update):
            rows = slice(start, start + per_update)
            _hf_update(hf, opt, seqs[rows], masks[rows], advantages[rows], old[rows],
                       cfg.algo.eps_low, cfg.algo.eps_high, o.clip_grad)

    best = {"megatron": float("inf"), "transformers": float("inf")}
    runners = {"megatron": megatron, "transformers": transformers}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            if repeat:
                best[name] = min(best[name], time.perf_counter() - start)
    tokens = sum(len(s) for s in seqs)
    print(f"{n} sequences, {tokens} tokens, {n // per_update} updates of {per_update}; "
          f"best of {args.repeats}, {args.threads} thread(s)")
    x, y = best["megatron"], best["transformers"]
    print(f"update: megatron {x:.3f} s, transformers {y:.3f} s, ratio {x / y:.2f}")


if __name__ == "__main__":
    main()
