"""Log-probs in sequence chunks: equal to the whole-sequence computation (values and
gradients, float64), and the peak memory of forward + backward bounded by a chunk's logits
instead of the micro-batch's (measured with the torch profiler's allocation events)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


def _peak_bytes(fn) -> int:
    """Peak bytes allocated above the start while ``fn`` runs (the bench's measurement)."""
    from bench.train_bench import peak_bytes

    return peak_bytes(fn)


def _problem(tokens, hidden, vocab, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g, dtype=dtype).requires_grad_(True)
    w = (0.3 * torch.randn(vocab, hidden, generator=g, dtype=dtype)).requires_grad_(True)
    targets = torch.randint(0, vocab - 3, (1, tokens), generator=g)  # 3 padded vocab rows
    weights = torch.randn(2, 1, tokens, generator=g, dtype=dtype)
    return h, w, targets, weights


def _run(h, w, targets, weights, chunk, vocab):
    from dapo_megatron.policy.chunked_logits import chunked_logprobs
    from dapo_megatron.policy.logprobs import next_token_logprobs_and_entropy

    kw = dict(vocab_size=vocab - 3, temperature=0.7)
    if chunk:
        lp, ent = chunked_logprobs(h, lambda x: x @ w.t(), chunk, targets, **kw)
    else:
        lp, ent = next_token_logprobs_and_entropy(h @ w.t(), targets, **kw)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    return lp.detach(), ent.detach()


def test_chunks_equal_the_whole_sequence_in_float64():
    ref = _problem(50, 8, 40, torch.float64)
    lp, ent = _run(*ref, chunk=0, vocab=40)
    for chunk in (1, 7, 50, 64):
        got = _problem(50, 8, 40, torch.float64)
        lp_c, ent_c = _run(*got, chunk=chunk, vocab=40)
        torch.testing.assert_close(lp_c, lp, atol=1e-12, rtol=0)
        torch.testing.assert_close(ent_c, ent, atol=1e-12, rtol=0)
        torch.testing.assert_close(got[0].grad, ref[0].grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(got[1].grad, ref[1].grad, atol=1e-12, rtol=0)


def test_peak_memory_follows_the_chunk_not_the_micro_batch():
    tokens, hidden, vocab = 1024, 32, 2048
    logits_bytes = tokens * vocab * 4  # 8 MiB fp32
    peaks = {}
    for chunk in (0, 64):
        h, w, targets, weights = _problem(tokens, hidden, vocab, torch.float32)
        peaks[chunk] = _peak_bytes(lambda: _run(h, w, targets, weights, chunk, vocab))
    assert peaks[0] > 2 * logits_bytes  # logits + their gradient at least
    # One 64-token chunk's logits are 1/16 of the whole: keep well under a third.
    assert peaks[64] < logits_bytes / 3, (peaks, logits_bytes)
