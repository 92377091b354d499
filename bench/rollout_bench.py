"""Rollout benchmark: embedded engine vs transformers generate, and weight-sync speed.

Same model (random weights, HF Llama layout), same prompts, same sampling settings
(temperature, top_p, n samples per prompt), both on CPU, in one process. Reports generated
tokens per second for each and their ratio, then seconds per GB of
EmbeddedEngine.update_weights over bucketed tensors.

Two kinds of workload:
- ``--stop-tokens S`` (default 64): the last S token ids of the vocabulary end a response
  (a random model draws one with probability about S / vocab per token), so response
  lengths vary as in a real rollout. ``generate`` keeps a finished row in its batch until
  the longest one ends; the engine drops it (or refills its slot from the queue). Only
  tokens up to and including each row's stop token count, on both sides. The two sides
  draw from the same distribution with different random streams (each side the same ones
  at every repeat), so their token counts differ a little: the ratio is of tokens per
  second.
- ``--stop-tokens 0``: no stop token, every response is exactly ``--new-tokens`` long. Both
  sides run the same decode steps on a full batch, so this compares the per-step cost alone.

``--slots K`` bounds the sequences in flight (KV memory) on both sides: the engine runs with
``max_batch_size=K`` and refills a finished row's slot from the queue at once; ``generate``
runs the prompts in calls of K rows, one after the other, each until its longest row ends.
The default (0) puts every row in one batch on both sides.

    python bench/rollout_bench.py [--hidden 256 --layers 4 --vocab 4096 --prompts 8 --n 4
                                   --prompt-len 32 --new-tokens 64 --stop-tokens 64
                                   --slots 0 --threads 1 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.prompt_len + args.new_tokens + 8,
        tie_word_embeddings=False,
    )


def bench_generate(args) -> dict:
    from dapo_megatron.rollout.embedded import EmbeddedEngine
    from dapo_megatron.rollout.protocol import SamplingParams

    rows = args.prompts * args.n
    slots = args.slots or rows  # sequences in flight at once, on both sides
    torch.manual_seed(0)
    engine = EmbeddedEngine(_model_config(args), max_batch_size=slots)
    model = engine.model
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab, (args.prompts, args.prompt_len), generator=gen)
    stop_ids = list(range(args.vocab - args.stop_tokens, args.vocab))
    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens,
        stop_token_ids=stop_ids,
    )

    def run_engine() -> int:
        out = engine.generate(prompts.tolist(), params)
        return sum(len(s.token_ids) for g in out for s in g)

    def run_hf() -> int:
        torch.manual_seed(2)  # the same draws at every repeat, as the engine's seeded streams
        per_call = slots // args.n  # prompts per generate call: its batch holds `slots` rows
        return sum(hf_call(prompts[i:i + per_call]) for i in range(0, args.prompts, per_call))

    def hf_call(prompts: torch.Tensor) -> int:
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
            num_return_sequences=args.n,
            max_new_tokens=args.new_tokens,
            min_new_tokens=None if stop_ids else args.new_tokens,
            eos_token_id=stop_ids or None,
            pad_token_id=0,
        )
        return _response_tokens(out[:, args.prompt_len:], stop_ids)

    # Interleaved repeats, best of each: on a shared machine load drifts during a run and
    # would otherwise favour whichever side ran in the quiet moment.
    runners = {"embedded": run_engine, "hf_generate": run_hf}
    best = {name: float("inf") for name in runners}
    tokens = dict.fromkeys(runners, 0)
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            produced = fn()
            seconds = time.perf_counter() - start
            if not stop_ids:
                assert produced == rows * args.new_tokens, (name, produced)
            if seconds < best[name]:
                best[name], tokens[name] = seconds, produced
    results = {name: {"seconds": s, "tokens": tokens[name], "tokens_per_s": tokens[name] / s}
               for name, s in best.items()}
    results["speedup_embedded_over_hf"] = (
        results["embedded"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"]
    )
    return results


def _response_tokens(responses: torch.Tensor, stop_ids: list[int]) -> int:
    """Tokens of ``generate``'s responses ``[rows, T]`` up to and including each row's first
    stop token (what the row generated; the rest is padding for the batch's longest row)."""
    if not stop_ids:
        return responses.numel()
    stops = torch.isin(responses, torch.tensor(stop_ids))
    first = torch.where(stops.any(-1), stops.int().argmax(-1) + 1, responses.shape[1])
    return int(first.sum())


def bench_sync(args) -> dict:
    from dapo_megatron.rollout.buckets import bucket_nbytes, rebucket
    from dapo_megatron.rollout.embedded import EmbeddedEngine

    torch.manual_seed(0)
    cfg = _model_config(args)
    cfg.hidden_size, cfg.intermediate_size = args.sync_hidden, args.sync_hidden * 4
    cfg.num_attention_heads = cfg.num_key_value_heads = args.sync_hidden // 64
    engine = EmbeddedEngine(cfg)
    source = [[(k, v.clone()) for k, v in engine.model.state_dict().items()]]
    buckets = list(rebucket(source, args.bucket_mb * 2**20))
    nbytes = sum(bucket_nbytes(b) for b in buckets)
    best = float("inf")
    for version in range(1, args.repeats + 2):
        start = time.perf_counter()
        engine.update_weights(iter(buckets), version)
        best = min(best, time.perf_counter() - start)
    return {
        "gigabytes": nbytes / 1e9,
        "buckets": len(buckets),
        "bucket_mb": args.bucket_mb,
        "seconds": best,
        "seconds_per_gb": best / (nbytes / 1e9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--stop-tokens", type=int, default=64,
                        help="how many token ids (the vocabulary's last) end a response; 0: none")
    parser.add_argument("--slots", type=int, default=0,
                        help="most sequences in flight at once (the engine's max_batch_size; "
                             "generate runs the prompts in calls of that many rows); 0: all")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sync-hidden", type=int, default=1024)
    parser.add_argument("--bucket-mb", type=int, default=64)
    args = parser.parse_args()
    if not 0 <= args.stop_tokens < args.vocab:
        parser.error(f"--stop-tokens must be in [0, {args.vocab}) (the vocabulary's size)")
    if args.slots and (args.slots % args.n or args.slots > args.prompts * args.n):
        parser.error(f"--slots must be a multiple of --n ({args.n}) and at most --prompts x --n "
                     f"({args.prompts * args.n}): generate runs whole prompts per call")
    torch.set_num_threads(args.threads)
    report = {"config": vars(args), "generate": bench_generate(args), "sync": bench_sync(args)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
