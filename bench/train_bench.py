"""CPU benchmark of the policy train step and of the log-prob computation's memory.

1. Train-step throughput (response + prompt tokens per second) on one rank, on a batch
   whose sequence lengths spread 4x (shuffled), with token-budget micro-batching (sorted
   by length, padded within a micro-batch) against naive fixed-size padded micro-batches
   in batch order. Both use the same largest padded micro-batch (rows x longest).
2. Packed rows (the default: sequences end to end, attention within each sequence)
   against padded token-budget micro-batches, on one trainer, alternating, on a batch
   whose lengths range 16x (like real DAPO batches: hundreds to 20k tokens), with the
   examples' budget-to-longest ratio (32768 tokens for 2048 + 20480): tokens/s and padding
   waste of each. Both run under the same token budget: a micro-batch's activations and
   logits grow with the tokens it holds, padding included, so equal budgets are equal
   memory bounds (packed rows carry no padding, but giving them a larger budget would buy
   speed with memory). Packed rows attend through torch's fused causal attention
   (packed_attention.py), padded rows through megatron's local attention and its dense
   mask, as the trainer runs them. A third, control line runs the padded rows with that
   same fused kernel (causal only: exact for real tokens of right-padded rows), to tell
   how much of the gap is packing and how much the attention kernel.
3. Peak memory allocated by ``token_logprobs_and_entropy`` (forward, and forward plus
   backward) over what exists before it (the logits), divided by the logits' size; and the
   same for a straightforward full ``log_softmax`` for comparison. Measured with the torch
   profiler's allocation events (CPU allocator), in time order.
4. Log-probs in sequence chunks (chunked_logits.py: the output layer recomputed per chunk,
   the micro-batch's logits never whole): peak memory of forward + backward from the
   final hidden states, whole vs chunked, over the whole logits' size.

Run:  .venv/bin/python bench/train_bench.py [--seqs 32] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hf_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.convert import model_args_from_hf
    from dapo_megatron.convert.rules import hf_shapes

    cfg = ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=hidden,
                      num_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=4 * hidden, max_position_embeddings=4096,
                      tie_word_embeddings=False).hf_config_dict()
    g = torch.Generator().manual_seed(seed)
    state = {n: (1.0 if n.endswith("norm.weight") else 0.0) + 0.05 * torch.randn(s, generator=g)
             for n, s in hf_shapes(model_args_from_hf(cfg)).items()}
    return cfg, state


def _spread_batch(n: int, short: int, vocab: int, seed: int = 0, spread: int = 4):
    """``n`` sequences with lengths uniform in [short, spread * short], in random order."""
    from dapo_megatron.policy.microbatch import PolicyBatch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(short, spread * short, n).round().long()[
        torch.randperm(n, generator=g)]
    seqs = [torch.randint(0, vocab, (int(L),), generator=g).tolist() for L in lengths]
    masks = [[0] * 8 + [1] * (len(s) - 8) for s in seqs]
    return PolicyBatch.from_sequences(seqs, masks, torch.randn(n, generator=g).tolist())


def _fused_padded_attention(self, query, key, value, attention_mask, attn_mask_type=None,
                            attention_bias=None, packed_seq_params=None):
    """The control's stand-in for megatron's ``DotProductAttention.forward`` on padded rows
    ``[seq, rows, heads, dim]``: torch's fused causal attention, the dense mask unused
    (padding only follows the real tokens it would hide), same scale as the parent."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def _trainer_worker(rank, world_size, args):
    """One trainer; the batching modes alternate repeat by repeat, so all see the same
    machine load (the best time of each is kept, wall-clock and this process's CPU time:
    on a shared machine the CPU time is the steadier of the two)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from dapo_megatron.config import AlgoConfig, OptimizerConfig, ParallelConfig, TrainerConfig
    from dapo_megatron.policy.train import PolicyTrainer

    torch.set_num_threads(args["threads"])
    hf = _hf_model(args["vocab"], args["hidden"], args["layers"])
    spread = args.get("spread", 4)
    longest = spread * args["short"]
    trainer = PolicyTrainer(
        hf[0], parallel=ParallelConfig(), optim=OptimizerConfig(lr=1e-5, warmup_steps=0),
        algo=AlgoConfig(),
        trainer=TrainerConfig(train_batch_size=1, mini_batch_size=1, max_steps=100,
                              max_tokens_per_microbatch=args.get("budget")
                              or args["rows"] * longest),
        hf_state_dict=hf[1])
    batch = _spread_batch(args["seqs"], args["short"], args["vocab"], spread=spread)
    batch.old_logprobs = trainer.compute_logprobs(batch)
    # mode -> (fixed rows or None: token budget, packed rows, padded rows' fused attention)
    modes = args.get("modes") or {"budget": (None, False, False),
                                  "fixed": (args["rows"], False, False)}
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    metrics: dict[str, dict] = {}
    megatron_attention = DotProductAttention.forward
    for repeat in range(args["repeats"] + 1):  # the first round warms up
        for mode, (rows, packed, fused) in modes.items():
            trainer.fixed_micro_batch_size, trainer.sequence_packing = rows, packed
            DotProductAttention.forward = _fused_padded_attention if fused else \
                megatron_attention
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics[mode] = trainer.train_step(batch)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if repeat:
                best[mode] = min(best.get(mode, float("inf")), seconds)
                best_cpu[mode] = min(best_cpu.get(mode, float("inf")), cpu)
    return {mode: {"tokens": metrics[mode]["actor/tokens"],
                   "padded_tokens": metrics[mode]["actor/padded_tokens"],
                   "padding_waste": metrics[mode]["actor/padding_waste"],
                   "microbatches": metrics[mode]["actor/microbatches"],
                   "seconds": best[mode],
                   "tokens_per_s": metrics[mode]["actor/tokens"] / best[mode],
                   "cpu_seconds": best_cpu[mode],
                   "tokens_per_cpu_s": metrics[mode]["actor/tokens"] / best_cpu[mode]}
            for mode in modes}


def throughput(args) -> dict:
    from tests.dist import run_distributed

    out = run_distributed(_trainer_worker, 1, args)[0]
    out["speedup"] = out["budget"]["tokens_per_s"] / out["fixed"]["tokens_per_s"]
    return out


def packed_throughput(args) -> dict:
    """Packed vs padded (both under the token budget) on a 16x spread of lengths."""
    from tests.dist import run_distributed

    budget = round(args["packed_budget_ratio"] * 16 * args["packed_short"])
    args = dict(args, spread=16, short=args["packed_short"], seqs=args["packed_seqs"],
                budget=budget, modes={"packed": (None, True, False),
                                      "padded": (None, False, False),
                                      "padded_fused": (None, False, True)})
    out = run_distributed(_trainer_worker, 1, args)[0]
    out["speedup"] = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    out["speedup_same_kernel"] = (out["packed"]["tokens_per_s"]
                                  / out["padded_fused"]["tokens_per_s"])
    for name, other in (("cpu_speedup", "padded"), ("cpu_speedup_same_kernel", "padded_fused")):
        out[name] = out["packed"]["tokens_per_cpu_s"] / out[other]["tokens_per_cpu_s"]
    return out


def peak_bytes(fn) -> int:
    """Peak bytes allocated (above the start) while ``fn`` runs, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path, encoding="utf-8") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0))):
        live += e["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def logprob_memory(batch: int, seq: int, vocab: int) -> dict:
    from dapo_megatron.policy.logprobs import token_logprobs_and_entropy

    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seq))
    weights = torch.randn(batch, seq)
    logits_bytes = logits.numel() * logits.element_size()

    def ours(backward: bool):
        def run():
            lp, ent = token_logprobs_and_entropy(logits, ids, vocab_size=vocab)
            if backward:
                ((lp * weights).sum() + (ent * weights).sum()).backward()
        return run

    def naive(backward: bool):
        def run():
            logp = torch.log_softmax(logits.float(), dim=-1)
            lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            if backward:
                ((lp * weights[:, 1:]).sum() + (ent * weights).sum()).backward()
        return run

    out = {"logits_bytes": logits_bytes}
    for name, make in (("ours", ours), ("naive_log_softmax", naive)):
        for backward in (False, True):
            logits.grad = None
            ctx = torch.enable_grad() if backward else torch.no_grad()
            with ctx:
                peak = peak_bytes(make(backward))
            key = f"{name}_{'fwd_bwd' if backward else 'fwd'}_peak_over_logits"
            out[key] = peak / logits_bytes
    return out


def chunked_memory(tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    """Peak bytes of hidden -> logits -> log-probs + entropy -> backward, whole vs chunked."""
    from dapo_megatron.policy.chunked_logits import chunked_logprobs
    from dapo_megatron.policy.logprobs import next_token_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).requires_grad_(True)
    w = (0.05 * torch.randn(vocab, hidden, generator=g)).requires_grad_(True)
    targets = torch.randint(0, vocab, (1, tokens), generator=g)
    weights = torch.randn(1, tokens, generator=g)
    logits_bytes = tokens * vocab * 4

    def run(chunked: bool):
        def go():
            if chunked:
                lp, ent = chunked_logprobs(h, lambda x: x @ w.t(), chunk, targets,
                                           vocab_size=vocab)
            else:
                lp, ent = next_token_logprobs_and_entropy(h @ w.t(), targets, vocab_size=vocab)
            ((lp * weights).sum() + (ent * weights).sum()).backward()
        return go

    return {"logits_bytes": logits_bytes, "chunk": chunk,
            "whole_fwd_bwd_peak_over_logits": peak_bytes(run(False)) / logits_bytes,
            "chunked_fwd_bwd_peak_over_logits": peak_bytes(run(True)) / logits_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--short", type=int, default=48, help="shortest sequence; longest is 4x")
    p.add_argument("--rows", type=int, default=4, help="rows of the naive micro-batch; the "
                   "token budget is rows x the longest sequence")
    p.add_argument("--packed-seqs", type=int, default=48)
    p.add_argument("--packed-short", type=int, default=16,
                   help="shortest sequence of the packed vs padded batch; longest is 16x")
    p.add_argument("--packed-budget-ratio", type=float, default=32768 / 22528,
                   help="token budget over the longest sequence (the examples' 32768 tokens "
                   "for 2048 + 20480)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--mem-seq", type=int, default=512)
    p.add_argument("--mem-vocab", type=int, default=8192)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=256, help="positions per log-prob chunk")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"throughput": throughput(vars(args)), "packed": packed_throughput(vars(args)),
              "logprob_memory": logprob_memory(args.mem_batch, args.mem_seq, args.mem_vocab),
              "chunked_memory": chunked_memory(args.chunk_tokens, args.hidden, args.mem_vocab,
                                               args.chunk_size)}
    t = result["throughput"]
    m = result["logprob_memory"]
    pk = result["packed"]
    cm = result["chunked_memory"]
    lines = [
        f"train step, {args.seqs} seqs of {args.short}..{4 * args.short} tokens:",
        f"  token budget : {t['budget']['tokens_per_s']:8.0f} tok/s  "
        f"{t['budget']['microbatches']:.0f} micro-batches, padding waste "
        f"{t['budget']['padding_waste']:.1%}",
        f"  fixed {args.rows} rows : {t['fixed']['tokens_per_s']:8.0f} tok/s  "
        f"{t['fixed']['microbatches']:.0f} micro-batches, padding waste "
        f"{t['fixed']['padding_waste']:.1%}",
        f"  speedup      : {t['speedup']:.2f}x",
        f"train step, {args.packed_seqs} seqs of {args.packed_short}..{16 * args.packed_short} "
        f"tokens, token budget {round(args.packed_budget_ratio * 16 * args.packed_short)}:",
        f"  packed rows  : {pk['packed']['tokens_per_s']:8.0f} tok/s  "
        f"{pk['packed']['microbatches']:.0f} micro-batches, padding waste "
        f"{pk['packed']['padding_waste']:.1%}",
        f"  padded rows  : {pk['padded']['tokens_per_s']:8.0f} tok/s  "
        f"{pk['padded']['microbatches']:.0f} micro-batches, padding waste "
        f"{pk['padded']['padding_waste']:.1%}",
        f"  speedup      : {pk['speedup']:.2f}x (per CPU second: {pk['cpu_speedup']:.2f}x)",
        f"  control, padded rows with the packed rows' fused attention: "
        f"{pk['padded_fused']['tokens_per_s']:8.0f} tok/s, packed at "
        f"{pk['speedup_same_kernel']:.2f}x (per CPU second: "
        f"{pk['cpu_speedup_same_kernel']:.2f}x)",
        f"log-prob peak memory over logits ({m['logits_bytes'] / 2**20:.0f} MiB logits):",
        f"  vocab-parallel fn: forward {m['ours_fwd_peak_over_logits']:.2f}x, "
        f"forward+backward {m['ours_fwd_bwd_peak_over_logits']:.2f}x",
        f"  full log_softmax : forward {m['naive_log_softmax_fwd_peak_over_logits']:.2f}x, "
        f"forward+backward {m['naive_log_softmax_fwd_bwd_peak_over_logits']:.2f}x",
    ]
    lines += [
        f"log-probs from hidden states, {args.chunk_tokens} tokens x {args.mem_vocab} vocab "
        f"({cm['logits_bytes'] / 2**20:.0f} MiB logits), forward+backward peak over logits:",
        f"  whole sequence : {cm['whole_fwd_bwd_peak_over_logits']:.2f}x",
        f"  {args.chunk_size}-token chunks: {cm['chunked_fwd_bwd_peak_over_logits']:.2f}x",
    ]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    ok = (t["speedup"] > 1.0 and pk["speedup"] > 1.0
          and m["ours_fwd_bwd_peak_over_logits"] < 2.0
          and cm["chunked_fwd_bwd_peak_over_logits"] < 0.5)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
