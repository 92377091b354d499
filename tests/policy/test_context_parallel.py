"""Context-parallel split and gather of packed rows on CP=2 and CP=4 gloo ranks.

The model is replaced by a per-token stand-in (logits from the token and its position in
its sequence, no attention), so every rank can compute its chunks alone: the gathered
log-probs, entropy and logit gradients must equal the unsplit computation exactly, for
odd sequence lengths in one packed row."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

torch.set_num_threads(1)

VOCAB = 37
LENGTHS = [7, 13, 1, 5, 11]  # odd, and a one-token sequence


def _batch():
    from dapo_megatron.policy.microbatch import PolicyBatch

    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    masks = [[0] * min(n, 2) + [1] * max(0, n - 2) for n in LENGTHS]
    return PolicyBatch.from_sequences(seqs, masks, torch.randn(len(LENGTHS), generator=g).tolist())


def _stand_in_logits(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[..., seq]`` ids and positions -> ``[..., seq, VOCAB]`` logits, token by token."""
    g = torch.Generator().manual_seed(0)
    table, pos_table = torch.randn(VOCAB, VOCAB, generator=g), torch.randn(64, VOCAB, generator=g)
    return table[ids] + 0.5 * pos_table[positions]


def test_rank_token_index_is_megatrons_load_balanced_order():
    from dapo_megatron.policy.context_parallel import rank_token_index
    from dapo_megatron.policy.packing import pack

    # Megatron (utils.py, get_batch_on_this_cp_rank): 2*cp chunks, rank r holds r, 2cp-1-r.
    _, layout = pack(torch.zeros(2, 6, dtype=torch.long), torch.tensor([6, 3]), seq_align=4,
                     row_align=2)
    assert layout.starts == (0, 8) and layout.width == 12
    assert rank_token_index(layout, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert rank_token_index(layout, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    every = torch.cat([rank_token_index(layout, 2, r) for r in range(2)]).sort().values
    assert every.tolist() == list(range(12))  # a partition of the row
    with pytest.raises(ValueError, match="seq_align"):
        rank_token_index(pack(torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]))[1], 2, 0)


def _cp_worker(rank, world_size):
    from dapo_megatron.policy.context_parallel import cp_group_and_rank, split_for_rank
    from dapo_megatron.policy.logprobs import token_logprobs_and_entropy
    from dapo_megatron.policy.microbatch import collate
    from dapo_megatron.policy.packing import micro_logprobs
    from dapo_megatron.policy.parallel import destroy_parallel, init_parallel

    cp = world_size
    init_parallel(1, 1, 1, cp)
    group, size, cp_rank = cp_group_and_rank()
    assert size == cp and cp_rank == rank
    batch = _batch()
    mb = collate(batch, list(range(batch.size)), cp, packed=True, seq_align=2 * cp)
    layout = mb.packed
    full = _stand_in_logits(mb.packed_ids[0], layout.position_ids()[0])  # [width, vocab]
    local = split_for_rank(full, layout, cp, rank, dim=0).clone().requires_grad_(True)
    lp, ent = micro_logprobs(mb, local[None], vocab_size=VOCAB)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    grads = [torch.empty_like(local.grad) for _ in range(cp)]
    torch.distributed.all_gather(grads, local.grad, group=group)
    grad_full = torch.zeros_like(full)
    for r, part in enumerate(grads):
        grad_full[split_for_rank(torch.arange(layout.width), layout, cp, r)] = part

    # Unsplit references: the padded rows (log-probs, entropy) and the whole packed row
    # on one rank (gradients).
    width = mb.input_ids.shape[1]
    padded_logits = _stand_in_logits(mb.input_ids, torch.arange(width).expand_as(mb.input_ids))
    ref_lp, ref_ent = token_logprobs_and_entropy(padded_logits, mb.input_ids, vocab_size=VOCAB)
    real = torch.arange(width)[None] < mb.seq_lens[:, None]
    whole = full.clone().requires_grad_(True)
    destroy_parallel()  # CP 1: the same function on the unsplit row
    init_parallel(1, 1, 1, 1)
    lp1, ent1 = micro_logprobs(mb, whole[None], vocab_size=VOCAB)
    ((lp1 * w_lp).sum() + (ent1 * w_ent).sum()).backward()
    destroy_parallel()
    return dict(lp=lp.tolist(), ent=ent.tolist(), ref_lp=(ref_lp * real).tolist(),
                ref_ent=(ref_ent * real).tolist(), lp1=lp1.tolist(), ent1=ent1.tolist(),
                grad=grad_full.tolist(), ref_grad=whole.grad.tolist(),
                local_tokens=local.shape[0], width=layout.width)


@pytest.mark.dist
@pytest.mark.parametrize("cp", [2, 4])
def test_gathered_logprobs_entropy_and_gradients_equal_the_unsplit_row(cp):
    outs = run_distributed(_cp_worker, cp)
    for out in outs:
        t = {k: torch.tensor(v) for k, v in out.items()}
        assert out["local_tokens"] * cp == out["width"]
        assert t["ref_lp"].abs().sum() > 0 and t["ref_grad"].abs().sum() > 0
        # Exactly: the same per-token arithmetic, only reordered across ranks.
        assert torch.equal(t["lp"], t["ref_lp"]) and torch.equal(t["ent"], t["ref_ent"])
        assert torch.equal(t["lp"], t["lp1"]) and torch.equal(t["ent"], t["ent1"])
        assert torch.equal(t["grad"], t["ref_grad"])
