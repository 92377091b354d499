"""The memory planner against figures worked out by hand from the published model shapes."""

from __future__ import annotations

import json
import os

import pytest

from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.plan import GIB, Layout, active_params, format_report, plan, stage_memory, total_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")
QWEN32B = os.path.join(EX, "qwen2.5_32b_dapo.yaml")
QWEN7B = os.path.join(EX, "qwen2.5_7b_dapo.yaml")
MOE = os.path.join(EX, "qwen3_235b_a22b_moe_dapo.yaml")


def _cfg(path, *overrides, nodes=None):
    extra = [f"parallel.nodes={nodes}"] if nodes else []
    return load_config(path, extra + list(overrides), check_layout=False)


# Qwen2.5-32B (config.json): vocab 152064, hidden 5120, 64 layers, 40 heads, 8 KV heads of 128,
# SwiGLU 27648, QKV bias, untied head. Layout of the example: tp 8, pp 2.
def _qwen32b_last_stage_params_by_hand() -> int:
    # Padded to a multiple of lcm(128, tp) = 128 (layout-independent checkpoints):
    # 152064 = 1188 * 128 is already a multiple.
    padded_vocab = 1188 * 128
    q, k, v = 5120 * 5120, 5120 * 1024, 5120 * 1024  # 40 and 8 heads of 128
    qkv_bias = 5120 + 1024 + 1024
    out_proj = 5120 * 5120
    gate, up, down = 5120 * 27648, 5120 * 27648, 27648 * 5120
    split_per_layer = (q + k + v + qkv_bias + out_proj + gate + up + down) / 8
    norms_per_layer = 5120 + 5120  # replicated on every TP rank
    layers = 32 * (split_per_layer + norms_per_layer)
    lm_head = padded_vocab * 5120 / 8
    final_norm = 5120
    return int(layers + lm_head + final_norm)


def test_qwen32b_whole_model_count():
    report = plan(_cfg(QWEN32B, nodes=4), nodes=4, gpus_per_node=8)
    # embeddings + head, 64 layers, final norm; no padding in the HF model
    by_hand = 2 * 152064 * 5120 + 64 * (
        2 * 5120 + 5120 * 7168 + 7168 + 5120 * 5120 + 3 * 5120 * 27648) + 5120
    assert total_params(report.args) == by_hand == 32_763_876_352


@pytest.mark.parametrize("nodes", [4, 8, 16])
def test_qwen32b_params_grads_optimizer_by_hand(nodes):
    report = plan(_cfg(QWEN32B, nodes=nodes), nodes=nodes, gpus_per_node=8, gpu_mem_gb=80)
    assert not report.errors
    m = report.memory
    # The last stage holds the output layer and the final norm: 5120 more than the first.
    assert m.stage == 1
    n = _qwen32b_last_stage_params_by_hand()
    assert n == 2_048_033_792
    assert m.param_count == n and m.expert_params == 0
    assert m.params == 2 * n  # bf16
    assert m.grads == 4 * n  # fp32 main grads, full buffer
    data_parallel = nodes * 8 // (8 * 2)  # 2, 4, 8
    assert m.optimizer == pytest.approx(12 * n / data_parallel)  # fp32 master + m + v, sharded
    assert report.fits


def test_qwen32b_activations_by_hand():
    """Recompute on, sequence parallel, last stage (1 micro-batch in flight + logits)."""
    report = plan(_cfg(QWEN32B, nodes=4), nodes=4, gpus_per_node=8)
    tokens = 32768
    kept = 32 * 2 * 5120 / 8  # each layer's input, sequence-split over 8 ranks
    # one layer's full set while it is recomputed (per token, one rank: 5 q heads, 1 kv head)
    one_layer = 8 * 5120 / 8 + 2 * (5 + 2) * 128 + 2 * 5 * 128 + 4 * 5 + 6 * 27648 / 8
    # bf16 logits 2 * 152064 / 8 B per token (152064 is a multiple of lcm(128, 8)) are
    # 1.16 GiB > logits_chunk_mb = 256 MiB: one chunk's logits + gradient, 2 * 256 MiB, and the
    # hidden states gathered over the 8 sequence-parallel ranks, 2 * 5120 B per token.
    assert 2 * 152064 / 8 * tokens > 256 * 2**20
    logits = 2 * 256 * 2**20 + 2 * 5120 * tokens
    assert report.memory.logits_chunked and report.memory.logits == logits
    assert report.memory.activations == pytest.approx((kept + one_layer) * tokens + logits)
    assert report.memory.activations_recompute == report.memory.activations
    assert report.memory.activations_no_recompute > 4 * report.memory.activations


def test_context_parallel_splits_the_micro_batch_and_chunking_bounds_the_logits():
    """CP c: every per-token term over T / c tokens. Without chunking the log-prob pass holds
    the whole bf16 logits and their gradient, 4 * V_pad / t B per token."""
    base = _cfg(QWEN32B, "trainer.logits_chunk_mb=0", nodes=4)
    args = plan(base, nodes=4, gpus_per_node=8).args
    per = {cp: stage_memory(base, args, Layout(8, 2, 1, cp, True), 32, 1) for cp in (1, 2, 4)}
    assert per[1].logits == 4 * 152064 / 8 * 32768 and not per[1].logits_chunked
    for cp in (2, 4):
        assert per[cp].tokens == 32768 / cp
        assert per[cp].activations == pytest.approx(per[1].activations / cp)
    chunked = stage_memory(_cfg(QWEN32B, nodes=4), args, Layout(8, 2, 1, 2, True), 32, 1)
    assert chunked.logits_chunked and chunked.logits == 2 * 256 * 2**20 + 2 * 5120 * 16384


def test_qwen32b_sglang_share_and_weight_sync_by_hand():
    report_cfg = _cfg(QWEN32B, nodes=4)
    report = plan(report_cfg, nodes=4, gpus_per_node=8)
    sh = report.sglang
    total = 32_763_876_352
    assert sh.engine_tp == 4 and sh.num_engines == 8
    assert sh.weights == 2 * total / 4
    kv_per_token = 2 * 64 * (8 / 4) * 128 * 2  # K and V, 64 layers, 2 KV heads per GPU, bf16
    assert sh.kv_bytes_per_token == kv_per_token
    # --mem-fraction-static takes 0.5 of what is free when SGLang starts: the GPU less the
    # overhead and the training state, which stays resident (no trainer.offload).
    static = max(stage_memory(report_cfg, report.args, report.layout, 32, s).static for s in range(2))
    free_at_start = 80 * GIB - 5 * GIB - static
    assert sh.reserved == pytest.approx(0.5 * free_at_start)
    assert sh.pool_tokens == int((0.5 * free_at_start - 2 * total / 4) // kv_per_token)
    assert sh.requested_seqs == 1536 * 16 // 8
    assert report.sync.total_bytes == 8 * 2 * total
    assert report.rollout_peak == pytest.approx(static + 0.5 * free_at_start + 5 * GIB)
    # Offloaded to host before the engines start: SGLang sees everything but the overhead.
    offloaded = plan(_cfg(QWEN32B, "trainer.offload=true", nodes=4), nodes=4, gpus_per_node=8)
    assert offloaded.sglang.reserved == pytest.approx(0.5 * 75 * GIB)
    assert offloaded.rollout_peak == pytest.approx(0.5 * 75 * GIB + 5 * GIB)


def test_moe_example_expert_split_by_hand():
    """Qwen3-235B-A22B shape, tp 4, pp 2, ep 16 on 16 nodes; expert TP = tp."""
    report = plan(_cfg(MOE, nodes=16), nodes=16, gpus_per_node=8)
    assert not report.errors and report.fits
    assert round(total_params(report.args) / 1e9, 1) == 235.1
    assert round(active_params(report.args) / 1e9, 1) == 22.2
    m = report.memory
    attn = (4096 * 64 * 128 + 2 * 4096 * 4 * 128 + 64 * 128 * 4096) / 4
    replicated = 2 * 4096 + 2 * 128 + 4096 * 128  # norms, q/k norms, router
    padded_vocab = 1187 * 128  # 151936 = 1187 * 128: a multiple of lcm(128, tp=4) already
    dense_last = 47 * (attn + replicated) + padded_vocab * 4096 / 4 + 4096
    experts = 47 * (128 // 16) * 3 * 4096 * 1536 / 4
    assert (m.stage, m.dense_params, m.expert_params) == (1, dense_last, experts)
    # dense state sharded over 128 / (4 * 2) = 16 ranks; experts over 128 / (4 * 16 * 2) = 1
    assert m.optimizer == pytest.approx(12 * dense_last / 16 + 12 * experts / 1)


def test_moe_on_too_few_nodes_suggests_more():
    report = plan(_cfg(MOE, nodes=16), nodes=4, gpus_per_node=8)
    assert not report.fits
    assert report.suggestion is not None and report.suggestion.nodes > 4
    text = format_report(report)
    assert "DOES NOT FIT" in text and f"needs {report.suggestion.nodes} nodes" in text


def test_rejects_tp_that_does_not_divide_heads():
    # tp=16 divides the 32 GPUs but not 40 heads; the config alone cannot tell (shape from hf_dir).
    report = plan(_cfg(QWEN32B, "parallel.tp=16", "parallel.pp=1", nodes=4), nodes=4, gpus_per_node=8)
    assert not report.fits
    assert any("parallel.tp=16" in e and "num_attention_heads=40" in e for e in report.errors)
    assert "num_attention_heads=40" in format_report(report)
    sg = report.suggestion
    assert sg is not None and 40 % sg.layout.tp == 0 and sg.nodes == 4


def test_rejects_pp_that_does_not_divide_layers():
    report = plan(_cfg(QWEN7B, "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=8", nodes=1),
                  nodes=1, gpus_per_node=8)
    assert not report.fits
    assert any("parallel.pp=8" in e and "num_hidden_layers=28" in e for e in report.errors)
    sg = report.suggestion
    assert sg is not None and 28 % sg.layout.pp == 0


def test_rejects_ep_on_a_dense_model_and_ep_not_dividing_experts():
    dense = plan(_cfg(QWEN32B, nodes=4), nodes=4, gpus_per_node=8)
    assert dense.fits
    cfg = _cfg(QWEN32B, nodes=4)
    cfg.parallel.ep = 2
    assert any("parallel.ep=2 needs a MoE model" in e for e in plan(cfg, 4, 8).errors)
    cfg = _cfg(MOE, nodes=16)
    cfg.parallel.ep, cfg.parallel.pp = 3, 1
    errors = plan(cfg, 48, 8).errors
    assert any("parallel.ep=3 must divide the experts (num_experts=128)" in e for e in errors)


def test_suggested_layout_really_fits():
    cfg = _cfg(QWEN32B, "parallel.tp=2", "parallel.pp=1", "model.recompute_activations=false", nodes=4)
    report = plan(cfg, nodes=4, gpus_per_node=8)
    assert not report.fits and report.suggestion is not None
    lay: Layout = report.suggestion.layout
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep = lay.tp, lay.pp, lay.ep
    cfg.parallel.cp, cfg.model.recompute_activations = lay.cp, lay.recompute
    again = plan(cfg, nodes=report.suggestion.nodes, gpus_per_node=8)
    assert again.fits and not again.errors
    assert again.train_peak == pytest.approx(report.suggestion.train_peak)


def test_suggestion_searches_context_parallelism_on_packed_rows_only():
    """235B at 262,144 tokens per micro-batch: only CP=2 fits on the same 16 nodes in one
    step (the activations halve; TP, PP and EP do not get there in one). Padded rows cannot
    be split over CP ranks, so without packing no cp > 1 is suggested."""
    cfg = _cfg(MOE, "trainer.max_tokens_per_microbatch=262144", nodes=16)
    report = plan(cfg, nodes=16, gpus_per_node=8)
    assert not report.fits and report.layout.cp == 1
    sg = report.suggestion
    assert (sg.layout.tp, sg.layout.pp, sg.layout.ep, sg.layout.cp, sg.nodes) == (4, 2, 16, 2, 16)
    assert "parallel.cp=2" in format_report(report)
    cfg.parallel.cp = 2
    again = plan(cfg, nodes=16, gpus_per_node=8)
    assert again.fits and again.train_peak == pytest.approx(sg.train_peak)
    padded = plan(_cfg(MOE, "trainer.max_tokens_per_microbatch=262144",
                       "trainer.sequence_packing=false", nodes=16), nodes=16, gpus_per_node=8)
    assert padded.suggestion is None or padded.suggestion.layout.cp == 1
    # The example itself on 8 nodes: ep 8 and cp 2 fit there; padded rows need 16 nodes.
    on8 = plan(_cfg(MOE, nodes=16), nodes=8, gpus_per_node=8).suggestion
    assert (on8.layout.ep, on8.layout.cp, on8.nodes) == (8, 2, 8)
    on8 = plan(_cfg(MOE, "trainer.sequence_packing=false", nodes=16), nodes=8,
               gpus_per_node=8).suggestion
    assert (on8.layout.ep, on8.layout.cp, on8.nodes) == (16, 1, 16)


def test_smaller_gpus_do_not_fit():
    report = plan(_cfg(QWEN32B, nodes=4), nodes=4, gpus_per_node=8, gpu_mem_gb=40)
    assert not report.fits  # rollout peak: ~23 GiB resident + 20 GiB SGLang + 5 GiB overhead


def test_shape_comes_from_hf_dir_then_the_shipped_copy_and_nested_text_config(tmp_path):
    hf = {"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 512,
          "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "some_vlm", "text_config": hf}))
    # hf_dir's config.json (its text_config) is the shape; the example's copy must then agree.
    cfg = _cfg(QWEN7B, f"model.hf_dir={tmp_path}", "model.hf_config=null", "parallel.tp=2", nodes=1)
    report = plan(cfg, nodes=1, gpus_per_node=8)
    assert report.args_source == str(tmp_path / "config.json")
    per_layer = 2 * 256 + 256 * (8 + 4) * 32 + (8 + 4) * 32 + 8 * 32 * 256 + 3 * 256 * 512
    assert total_params(report.args) == 1024 * 256 + 4 * per_layer + 256  # tied: one embedding
    with pytest.raises(ConfigError, match="model.hf_config: .* describes another model"):
        plan(_cfg(QWEN7B, f"model.hf_dir={tmp_path}", "parallel.tp=2", nodes=1), nodes=1, gpus_per_node=8)
    # Before the download: the shipped copy of config.json.
    missing = plan(_cfg(QWEN7B, f"model.hf_dir={tmp_path / 'absent'}", nodes=1), nodes=1, gpus_per_node=8)
    assert missing.args_source.endswith("model_configs/qwen2.5-7b.json") and missing.args.hidden_size == 3584
    with pytest.raises(ConfigError, match="model.hf_dir: no config.json"):
        plan(_cfg(QWEN7B, f"model.hf_dir={tmp_path / 'absent'}", "model.hf_config=null", nodes=1),
             nodes=1, gpus_per_node=8)


@pytest.mark.parametrize("path,nodes", [(QWEN7B, 1), (QWEN32B, 4), (MOE, 16)])
def test_examples_fit_their_documented_cluster(path, nodes):
    report = plan(_cfg(path, nodes=nodes), nodes=nodes, gpus_per_node=8, gpu_mem_gb=80)
    assert report.fits, format_report(report)
    assert report.train_peak <= 80 * GIB and report.rollout_peak <= 80 * GIB
