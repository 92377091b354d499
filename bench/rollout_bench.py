"""Rollout benchmark: embedded engine vs transformers generate, and weight-sync speed.

Same model (random weights, HF Llama layout), same prompts, same sampling settings
(temperature, top_p, n samples per prompt, exactly max_new_tokens generated: no stop
token), both on CPU, in one process. Reports generated tokens per second for each and
their ratio, then seconds per GB of EmbeddedEngine.update_weights over bucketed tensors.

    python bench/rollout_bench.py [--hidden 256 --layers 4 --vocab 4096 --prompts 8 --n 4
                                   --prompt-len 32 --new-tokens 64 --threads 1 --repeats 2]
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

    torch.manual_seed(0)
    engine = EmbeddedEngine(_model_config(args), max_batch_size=args.prompts * args.n)
    model = engine.model
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab, (args.prompts, args.prompt_len), generator=gen)
    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens
    )
    total_tokens = args.prompts * args.n * args.new_tokens

    def run_engine() -> int:
        out = engine.generate(prompts.tolist(), params)
        return sum(len(s.token_ids) for g in out for s in g)

    def run_hf() -> int:
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
            num_return_sequences=args.n,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
        return (out.shape[1] - args.prompt_len) * out.shape[0]

    # Interleaved repeats, best of each: on a shared machine load drifts during a run and
    # would otherwise favour whichever side ran in the quiet moment.
    runners = {"embedded": run_engine, "hf_generate": run_hf}
    best = {name: float("inf") for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            produced = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            assert produced == total_tokens, (name, produced, total_tokens)
    results = {name: {"seconds": s, "tokens_per_s": total_tokens / s} for name, s in best.items()}
    results["speedup_embedded_over_hf"] = (
        results["embedded"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"]
    )
    results["tokens"] = total_tokens
    return results


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
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sync-hidden", type=int, default=1024)
    parser.add_argument("--bucket-mb", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"config": vars(args), "generate": bench_generate(args), "sync": bench_sync(args)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
