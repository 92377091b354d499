"""dapo_megatron.resolve: one answer to "what runs where", shared by validation, the planner,
the engine pool and the model builder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.plan import plan
from dapo_megatron.resolve import layout_errors, read_hf_config, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")
# Each shipped example on the cluster its header documents (the GPU ones: 8 GPUs per node).
EXAMPLES = [("tiny_cpu.yaml", 1, 1), ("qwen2.5_7b_dapo.yaml", 1, 8), ("qwen2.5_32b_dapo.yaml", 4, 8),
            ("qwen3_235b_a22b_moe_dapo.yaml", 16, 8)]


def _load(name, *overrides, nodes=None, gpus=None, check_layout=True):
    extra = [f"parallel.nodes={nodes}"] if nodes else []
    extra += [f"parallel.gpus_per_node={gpus}"] if gpus else []
    return load_config(os.path.join(EX, name), extra + list(overrides), check_layout=check_layout)


@pytest.mark.parametrize("name,nodes,gpus", EXAMPLES)
def test_planner_and_trainer_start_the_same_engines(name, nodes, gpus):
    cfg = _load(name, nodes=nodes, gpus=gpus)
    slots = resolve(cfg).engines  # what Trainer hands EnginePool (controller/loop.py)
    assert slots, name
    if cfg.rollout.engine == "sglang":
        report = plan(cfg, nodes=nodes, gpus_per_node=gpus)
        assert report.fits and not report.errors, report.errors
        assert report.sglang.num_engines == len(slots)
        assert report.sync.num_engines == len(slots)
        # Every GPU of the run serves exactly one engine, which never spans nodes and shares
        # the node of the training rank (placement-group bundle) whose GPU it starts on.
        used = set()
        for s in slots:
            assert s.base_gpu + s.tp <= gpus
            assert s.policy_bundle // gpus == s.node
            gpus_of_engine = {(s.node, s.base_gpu + i) for i in range(s.tp)}
            assert not used & gpus_of_engine
            used |= gpus_of_engine
        assert len(used) == cfg.parallel.world_size
    else:
        assert len(slots) == cfg.parallel.nodes and all(s.resources["CPU"] >= 1 for s in slots)


def test_moe_example_as_planned_by_the_cli_agrees_with_the_trainer():
    out = subprocess.run([sys.executable, "-m", "dapo_megatron.cli", "plan", "examples/qwen3_235b_a22b_moe_dapo.yaml",
                          "--nodes", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    engines = len(resolve(_load("qwen3_235b_a22b_moe_dapo.yaml", nodes=16)).engines)
    assert f"engine_tp=8, {engines} engines" in out.stdout and engines == 16


def test_a_layout_the_builder_refuses_is_refused_by_validation_and_never_suggested():
    # 4 KV heads: megatron-core splits the KV groups over TP, so tp=8 cannot build.
    with pytest.raises(ConfigError, match=r"parallel.tp=8 must divide the KV heads \(num_key_value_heads=4\)"):
        _load("qwen3_235b_a22b_moe_dapo.yaml", "parallel.tp=8", nodes=16)
    # The planner explains it instead of raising, and its suggestion builds.
    cfg = _load("qwen3_235b_a22b_moe_dapo.yaml", "parallel.tp=8", nodes=16, check_layout=False)
    report = plan(cfg, nodes=16, gpus_per_node=8)
    assert not report.fits and any("num_key_value_heads=4" in e for e in report.errors)
    lay = report.suggestion.layout
    args = resolve(_load("qwen3_235b_a22b_moe_dapo.yaml", nodes=16)).args
    assert args.num_kv_heads % lay.tp == 0
    assert layout_errors(args, lay.tp, lay.pp, lay.ep, lay.cp, report.suggestion.nodes * 8) == []
    # An engine wider than a node cannot start (single-node SGLang servers).
    with pytest.raises(ConfigError, match="rollout.engine_tp: 16 must divide parallel.gpus_per_node=8"):
        _load("qwen3_235b_a22b_moe_dapo.yaml", "rollout.engine_tp=16", nodes=16)


def test_nested_text_config_is_what_the_policy_reads(tmp_path):
    nested = tmp_path / "vlm"
    shutil.copytree(os.path.join(EX, "tiny_warm_start"), nested)
    inner = json.loads((nested / "config.json").read_text())
    (nested / "config.json").write_text(json.dumps({"model_type": "some_vlm", "text_config": inner}))
    cfg = _load("tiny_cpu.yaml", f"model.hf_dir={nested}")
    hf, source = read_hf_config(cfg)
    assert hf == inner and source == str(nested / "config.json")
    assert resolve(cfg).args.hidden_size == inner["hidden_size"]


@pytest.mark.parametrize("override,key", [("parallel.cp=2", "parallel.cp"),
                                          ("model.params_dtype=fp16", "model.params_dtype"),
                                          ("parallel.tp=3", "parallel.tp")])
def test_unsupported_knobs_fail_within_seconds_naming_the_key(override, key):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "dapo_megatron.cli", "train", "examples/tiny_cpu.yaml", override,
                          "parallel.gpus_per_node=6"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"config error: examples/tiny_cpu.yaml: {key}" in out.stderr, out.stderr
    assert time.perf_counter() - start < 60  # no Ray, no actor: just the config
