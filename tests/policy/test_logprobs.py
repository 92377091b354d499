"""Vocab-parallel log-probs/entropy against a float64 full-vocabulary reference."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.policy.logprobs import token_logprobs_and_entropy
from tests.dist import run_distributed

torch.set_num_threads(1)

VOCAB, PADDED = 13, 16  # padded vocabulary, as megatron pads to a multiple of 8 * tp


def _reference(logits_full, input_ids, temperature=1.0):
    """float64 log_softmax over the real vocabulary, aligned so column t scores token t."""
    z = logits_full[..., :VOCAB].double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    lp_next = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ent_next = -(logp.exp() * logp).sum(-1)[:, :-1]
    zero = torch.zeros(input_ids.shape[0], 1, dtype=torch.float64)
    return torch.cat([zero, lp_next], 1), torch.cat([zero, ent_next], 1)


def _data(seed=0, batch=3, seq=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, PADDED, generator=g) * 3
    logits[..., VOCAB:] = 50.0  # padded entries: would dominate the softmax if included
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    weights = torch.randn(2, batch, seq, generator=g)
    return logits, ids, weights


def _check_against_reference(logits_full, local, lp, ent, ids, weights, temperature, tp_slice):
    ref_leaf = logits_full.double().requires_grad_(True)
    ref_lp, ref_ent = _reference(ref_leaf, ids, temperature)
    (weights[0].double() * ref_lp + weights[1].double() * ref_ent).sum().backward()
    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(local.grad.double(), ref_leaf.grad[..., tp_slice], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_rank_matches_float64_with_gradients(temperature):
    logits, ids, weights = _data()
    local = logits.clone().requires_grad_(True)
    # A tiny chunk forces the streamed path over several row chunks.
    lp, ent = token_logprobs_and_entropy(local, ids, vocab_size=VOCAB, temperature=temperature,
                                         chunk_elements=VOCAB * 2)
    (weights[0] * lp + weights[1] * ent).sum().backward()
    _check_against_reference(logits, local, lp, ent, ids, weights, temperature, slice(0, PADDED))
    assert torch.all(local.grad[..., VOCAB:] == 0)  # padded vocabulary gets no gradient


def test_without_entropy_returns_none_and_same_logprobs():
    logits, ids, _ = _data(1)
    lp1, ent1 = token_logprobs_and_entropy(logits, ids, vocab_size=VOCAB, with_entropy=False)
    lp2, _ = token_logprobs_and_entropy(logits, ids, vocab_size=VOCAB)
    assert ent1 is None
    torch.testing.assert_close(lp1, lp2)


def test_rejects_ids_beyond_vocab_and_bad_shapes():
    logits, ids, _ = _data(2)
    ids[0, 3] = VOCAB
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs_and_entropy(logits, ids, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="batch, seq"):
        token_logprobs_and_entropy(logits[0], ids, vocab_size=VOCAB)


def _tp2_worker(rank, world_size, temperature):
    import torch.distributed as dist

    # The whole 2-rank world is the TP group here; the model tests cover parallel_state's.
    logits, ids, weights = _data(3)
    width = PADDED // 2
    tp_slice = slice(rank * width, (rank + 1) * width)
    local = logits[..., tp_slice].clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(local, ids, vocab_size=VOCAB, temperature=temperature,
                                         tp_group=dist.group.WORLD, chunk_elements=16)
    (weights[0] * lp + weights[1] * ent).sum().backward()
    _check_against_reference(logits, local, lp, ent, ids, weights, temperature, tp_slice)
    return lp.detach().tolist()  # plain data: tensors do not survive the result queue


@pytest.mark.dist
def test_tensor_parallel_two_ranks_match_full_vocab():
    # Rank 1 holds ids 8..15, of which 13..15 are padding: exercises the partial shard.
    lp0, lp1 = run_distributed(_tp2_worker, 2, 0.8)
    assert lp0 == lp1  # every TP rank holds the same result


def _layouts_worker(rank, world_size):
    """compute_logprobs of one batch under several layouts, switched inside the process."""
    from dapo_megatron.policy.parallel import destroy_parallel
    from tests.policy.test_train import make_trainer, tiny_batch, tiny_hf_model

    out = {}
    batch = tiny_batch(5, n=6)
    for arch, layouts in (("llama", [(1, 1, 1), (2, 1, 1), (1, 2, 1)]),
                          ("qwen3_moe", [(1, 1, 1), (1, 1, 2)])):
        hf = tiny_hf_model(arch)
        for tp, pp, ep in layouts:
            trainer = make_trainer(hf, tp=tp, pp=pp, ep=ep, budget=48)
            lp, ent = trainer.compute_logprobs(batch, with_entropy=True)
            out[(arch, tp, pp, ep)] = (lp.tolist(), ent.tolist())
            destroy_parallel()
    return out


@pytest.mark.dist
def test_model_logprobs_and_entropy_equal_across_tp_pp_ep():
    out0, out1 = run_distributed(_layouts_worker, 2)
    assert out0 == out1  # every rank (both PP stages, both DP ranks) gets the full result
    for arch, layouts in (("llama", [(2, 1, 1), (1, 2, 1)]), ("qwen3_moe", [(1, 1, 2)])):
        ref_lp, ref_ent = (torch.tensor(x) for x in out0[(arch, 1, 1, 1)])
        assert ref_lp.abs().sum() > 0 and ref_ent.min() >= 0
        for layout in layouts:
            lp, ent = (torch.tensor(x) for x in out0[(arch,) + layout])
            torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0, msg=f"{arch} {layout}")
            torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0, msg=f"{arch} {layout}")
