"""Packed sequences: the layout (hand-worked), the packed planner, megatron's PackedSeqParams,
and packed log-probs, entropy and one train step against the padded ones under TP, PP and
MoE EP on gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

torch.set_num_threads(1)


def test_pack_layout_positions_segments_and_unpack_by_hand():
    from dapo_megatron.policy.packing import pack, packed_width, unpack

    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    packed, layout = pack(ids, torch.tensor([3, 2, 4]), seq_align=2, row_align=4)
    # 3 -> 4, 2 -> 2, 4 -> 4: 10 columns, rounded to lcm(2, 4) = 4 -> 12.
    assert packed_width([3, 2, 4], 2, 4) == layout.width == 12
    assert packed.tolist() == [[5, 6, 7, 0, 8, 9, 1, 2, 3, 4, 0, 0]]
    assert layout.starts == (0, 4, 6) and layout.ends == (4, 6, 12)
    assert layout.position_ids().tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 5]]
    assert layout.cu_seqlens().tolist() == [0, 3, 5, 9]
    assert layout.cu_seqlens(padded=True).tolist() == [0, 4, 6, 12]
    values = torch.arange(12.0, requires_grad=True)
    out = unpack(values, layout, rows=3, width=5)
    assert out.tolist() == [[0, 1, 2, 0, 0], [0, 5, 0, 0, 0], [0, 7, 8, 9, 0]]
    out.sum().backward()  # differentiable: gradient 1 exactly where a value was taken
    assert values.grad.tolist() == [0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0]


def test_packed_seq_params_are_megatrons_thd_fields():
    from megatron.core.packed_seq_params import PackedSeqParams

    from dapo_megatron.policy.packing import pack, packed_seq_params

    _, layout = pack(torch.zeros(2, 7, dtype=torch.long), torch.tensor([7, 3]), seq_align=4,
                     row_align=4)
    p = packed_seq_params(layout)
    assert isinstance(p, PackedSeqParams) and p.qkv_format == "thd"
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_q.tolist() == [0, 7, 10]
    assert p.cu_seqlens_kv.tolist() == [0, 7, 10]
    assert p.cu_seqlens_q_padded.tolist() == p.cu_seqlens_kv_padded.tolist() == [0, 8, 12]
    assert p.max_seqlen_q == p.max_seqlen_kv == 8


def test_packed_plan_fills_the_budget_and_wastes_no_padding():
    from dapo_megatron.policy.microbatch import plan_microbatches

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(64, 1024, (64,), generator=g)  # a 16x range
    padded = plan_microbatches(lens, 2, 4096)
    packed = plan_microbatches(lens, 2, 4096, packed=True)
    for plan in (padded, packed):
        rows = sorted(i for per in plan.per_rank for m in per for i in m)
        assert rows == list(range(64))  # every sequence exactly once
    for per in packed.per_rank:
        for m in per:
            assert sum(int(lens[i]) for i in m) <= 4096
    assert packed.padding_waste == 0.0 and padded.padding_waste > 0.02
    assert packed.num_microbatches <= padded.num_microbatches
    # Aligned: each sequence to 8 (CP=4), each row to 16.
    aligned = plan_microbatches(lens, 1, 4096, packed=True, seq_align=8, row_align=16)
    widths = aligned.padded_tokens[0]
    assert widths == sum(-(-sum(-(-int(lens[i]) // 8) * 8 for i in m) // 16) * 16
                         for m in aligned.per_rank[0])


def _trainer(hf, *, tp=1, pp=1, ep=1, budget=48, packing=True):
    from dapo_megatron.config import AlgoConfig, OptimizerConfig, ParallelConfig, TrainerConfig
    from dapo_megatron.policy.train import PolicyTrainer

    cfg, state = hf
    # Adam's first update is lr * g / (|g| + eps): it multiplies a gradient's rounding
    # difference by up to lr / eps (1e5 at the default eps 1e-8, on near-zero gradients).
    # eps = lr bounds that factor by 1, so updated weights within 1e-5 mean gradients
    # within 1e-5, whatever the two paths' attention kernels round differently.
    return PolicyTrainer(
        cfg, parallel=ParallelConfig(tp=tp, pp=pp, ep=ep),
        optim=OptimizerConfig(lr=1e-3, warmup_steps=1, weight_decay=0.1, adam_eps=1e-3),
        algo=AlgoConfig(),
        trainer=TrainerConfig(train_batch_size=2, mini_batch_size=1, max_tokens_per_microbatch=budget,
                              max_steps=10, seed=0, sequence_packing=packing),
        hf_state_dict=state)


def _packed_vs_padded_worker(rank, world_size):
    """Per layout: log-probs, entropy and one train step, padded, packed, and packed with
    log-probs in sequence chunks."""
    from dapo_megatron.policy.chunked_logits import defer_output_layer
    from dapo_megatron.policy.model import unwrap
    from dapo_megatron.policy.parallel import destroy_parallel
    from tests.policy.test_train import full_weights, tiny_batch, tiny_hf_model, with_old_logprobs

    out = {}
    for arch, layouts in (("llama", [(1, 1, 1), (2, 1, 1), (1, 2, 1)]),
                          ("qwen3_moe", [(1, 1, 2)])):
        hf, batch = tiny_hf_model(arch), None
        for layout in layouts:
            for packing in (False, True, "chunked"):
                trainer = _trainer(hf, tp=layout[0], pp=layout[1], ep=layout[2],
                                   packing=bool(packing))
                if packing == "chunked":  # 1 KiB of logits: chunks of 2-4 positions
                    for chunk in trainer.model:
                        defer_output_layer(unwrap(chunk), 1024)
                batch = batch or with_old_logprobs(trainer, tiny_batch(7))
                lp, ent = trainer.compute_logprobs(batch, with_entropy=True)
                metrics = trainer.train_step(batch)
                # Plain lists: tensors would cross the queue as shared memory of a dead rank.
                out[(arch, layout, packing)] = dict(
                    lp=lp.tolist(), ent=ent.tolist(),
                    weights={k: v.tolist() for k, v in full_weights(trainer).items()},
                    **{k: metrics[f"actor/{k}"] for k in ("loss", "grad_norm", "entropy",
                                                          "padding_waste", "microbatches")})
                destroy_parallel()
    return out


@pytest.mark.dist
def test_packed_and_chunked_logprobs_entropy_and_train_step_equal_padded_under_tp_pp_ep():
    out, _ = run_distributed(_packed_vs_padded_worker, 2)
    as_tensors = lambda d: {k: torch.tensor(v) if isinstance(v, list) else  # noqa: E731
                            {n: torch.tensor(w) for n, w in v.items()} if isinstance(v, dict)
                            else v for k, v in d.items()}
    for key, mode in [(k, m) for k in out if not k[2] for m in (True, "chunked")]:
        padded, packed = as_tensors(out[key]), as_tensors(out[key[:2] + (mode,)])
        key = key[:2] + (mode,)
        assert padded["padding_waste"] > 0.0 and packed["padding_waste"] == 0.0, key
        assert padded["lp"].abs().sum() > 0 and padded["ent"].min() >= 0
        torch.testing.assert_close(packed["lp"], padded["lp"], atol=1e-5, rtol=0, msg=str(key))
        torch.testing.assert_close(packed["ent"], padded["ent"], atol=1e-5, rtol=0, msg=str(key))
        for name in ("loss", "grad_norm", "entropy"):
            assert abs(packed[name] - padded[name]) <= 1e-5 * max(1.0, abs(padded[name])), \
                (key, name)
        assert padded["grad_norm"] > 0.1
        for name, w in padded["weights"].items():
            torch.testing.assert_close(packed["weights"][name], w, atol=1e-5, rtol=0,
                                       msg=f"{key} {name}")



def test_collate_packed_rows_fillers_and_uniform_width():
    from dapo_megatron.policy.microbatch import PolicyBatch, collate

    batch = PolicyBatch.from_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]],
                                       [[0, 1, 1], [0, 1], [0, 0, 1, 1]], [1.0, -1.0, 0.5])
    mb = collate(batch, [2, 0], 4, packed=True, seq_align=2, min_width=16)
    assert mb.packed_ids.tolist() == [[6, 7, 8, 9, 1, 2, 3] + [0] * 9]
    assert mb.forward_shape == (1, 16) and mb.packed.starts == (0, 4)
    assert mb.real_tokens == 7 and mb.padded_tokens == 16
    assert mb.input_ids.shape == (2, 4)  # the padded layout the loss reads
    filler = collate(batch, [], 4, packed=True)
    assert filler.forward_shape == (1, 4) and filler.padded_tokens == 0
    assert not filler.response_mask.any() and filler.rows == []


def test_packed_attention_row_layout_by_hand():
    from dapo_megatron.policy.packed_attention import _row_layout

    # Lengths 3, 2, 4, 1 at starts 0, 3, 5, 9. Longest first, a group takes lengths over
    # half its longest: {4, 3}, then {2} (2 * 2 is not > 4), then {1}; a sequence alone
    # in its group is a slice (start, end) of the row.
    groups, to_packed = _row_layout((0, 3, 5, 9, 10))
    assert groups[0].tolist() == [[5, 6, 7, 8], [0, 1, 2, 2]] and groups[1:] == [(3, 5), (9, 10)]
    # Group 0's output is [2, 4] flattened: sequence 2 at 0..3, sequence 0 at 4..6 (7 is
    # padding); sequence 1 follows at 8, 9, sequence 3 at 10.
    assert to_packed.tolist() == [4, 5, 6, 8, 9, 0, 1, 2, 3, 10]
    values = torch.arange(10.0)
    rows = torch.cat([values[g[0]:g[1]] if isinstance(g, tuple)
                      else values.index_select(0, g.reshape(-1)) for g in groups])
    assert torch.equal(rows.index_select(0, to_packed), values)  # the round trip
    # Sequences alone in their groups, longest first as in the row: no index at all.
    assert _row_layout((0, 4, 6)) == ([(0, 4), (4, 6)], None)
