"""Config: YAML + dotted overrides, type errors and every cross-field check name their key."""

import textwrap

import pytest

from dapo_megatron.config import ConfigError, DapoConfig, load_config


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_paper_defaults():
    cfg = DapoConfig()
    assert (cfg.algo.eps_low, cfg.algo.eps_high) == (0.2, 0.28)
    assert cfg.algo.group_size == 16
    assert cfg.algo.loss == "dapo" and cfg.algo.loss_agg is None  # None: DAPO's token-mean
    assert (cfg.algo.max_response_length, cfg.algo.overlong_buffer) == (20480, 4096)
    assert cfg.trainer.train_batch_size == 512 and cfg.trainer.num_mini_batches == 16
    assert cfg.optimizer.lr == 1e-6 and cfg.optimizer.warmup_steps == 20
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.k) == (1.0, 0.7, 32)
    assert cfg.algo.kl_coef == 0.0


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, """
        algo:
          eps_high: 0.3
          group_size: 8
        trainer:
          train_batch_size: 64
          mini_batch_size: 16
        """, name="my_run.yaml")
    cfg = load_config(path, ["algo.eps_high=0.28", "trainer.max_steps=20", "rollout.engine=sglang"])
    assert cfg.algo.eps_high == 0.28 and cfg.algo.group_size == 8
    assert cfg.trainer.max_steps == 20 and cfg.trainer.num_mini_batches == 4
    assert cfg.rollout.engine == "sglang"
    assert cfg.name == "my_run" and cfg.run_dir.endswith("runs/my_run")


def test_int_widens_to_float_but_not_bool(tmp_path):
    cfg = load_config(None, ["optimizer.lr=1"])
    assert isinstance(cfg.optimizer.lr, float)
    # YAML 1.1 reads 1e-3 as a string; it is still a number to us.
    assert load_config(None, ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3
    assert load_config(_write(tmp_path, "optimizer:\n  lr: 3e-4\n")).optimizer.lr == 3e-4
    with pytest.raises(ConfigError, match="algo.eps_high"):
        load_config(None, ["algo.eps_high=true"])


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("algo:\n  eps_hihg: 0.3\n", "algo.eps_hihg"),
        ("algoo:\n  eps_high: 0.3\n", "algoo"),
        ("trainer:\n  max_steps: ten\n", "trainer.max_steps"),
        ("algo:\n  loss_agg: seq-mean\n", "algo.loss_agg"),
        ("parallel: 3\n", "parallel"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path, yaml_text, key):
    path = _write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value) and path in str(e.value)


def test_override_errors_name_key():
    with pytest.raises(ConfigError, match="algo.nope"):
        load_config(None, ["algo.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["algo.eps_high"])
    with pytest.raises(ConfigError, match="'algo' is a section"):
        load_config(None, ["algo=1"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        # TP*PP*CP must divide the world size; an explicit DP must close the product.
        (["parallel.gpus_per_node=4", "parallel.tp=3"], "parallel.tp"),
        (["parallel.gpus_per_node=8", "parallel.tp=2", "parallel.dp=2"], "parallel.dp"),
        (["parallel.gpus_per_node=2", "parallel.ep=2"], "parallel.ep"),  # dense model
        (["parallel.gpus_per_node=4", "parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
          "model.architecture=qwen3_moe", "model.num_experts=4"], "parallel.ep"),
        (["parallel.gpus_per_node=2", "parallel.ep=2", "model.architecture=qwen3_moe",
          "model.num_experts=3"], "parallel.ep"),
        (["model.architecture=mixtral"], "model.num_experts"),
        (["parallel.gpus_per_node=8", "parallel.tp=8"], "parallel.tp"),  # 4 heads
        (["parallel.gpus_per_node=2", "parallel.pp=2", "model.num_layers=3"], "parallel.pp"),
        (["model.num_key_value_heads=3"], "model.num_key_value_heads"),
        (["trainer.mini_batch_size=30"], "trainer.mini_batch_size"),
        (["trainer.train_batch_size=4", "trainer.mini_batch_size=1", "algo.group_size=2",
          "parallel.gpus_per_node=4"], "trainer.mini_batch_size"),
        (["algo.overlong_buffer=20480"], "algo.overlong_buffer"),
        (["algo.overlong_buffer=-1"], "algo.overlong_buffer"),
        (["algo.group_size=1"], "algo.group_size"),
        (["algo.eps_low=1.0"], "algo.eps_low"),
        (["algo.clip_ratio_c=0.5"], "algo.clip_ratio_c"),
        (["model.max_position_embeddings=1024"], "algo.max_response_length"),
        (["trainer.max_tokens_per_microbatch=1000"], "trainer.max_tokens_per_microbatch"),
        (["rollout.top_p=0"], "rollout.top_p"),
        (["rollout.temperature=0"], "rollout.temperature"),
        (["rollout.sglang_mem_fraction=1.0"], "rollout.sglang_mem_fraction"),
        (["reward.timeout_s=0"], "reward.timeout_s"),
        (["optimizer.min_lr=1.0"], "optimizer.min_lr"),
        (["model.fp8=e4m3", "model.params_dtype=fp32"], "model.fp8"),
        (["model.params_dtype=fp64"], "use_distributed_optimizer=false"),
        (["model.params_dtype=fp64", "parallel.use_distributed_optimizer=false", "rollout.engine=sglang"],
         "model.params_dtype"),
    ],
)
def test_cross_field_checks(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value)


def test_valid_parallel_layouts():
    cfg = load_config(None, ["parallel.gpus_per_node=8", "parallel.tp=2", "parallel.pp=1"])
    assert cfg.parallel.data_parallel_size == 4
    cfg = load_config(None, ["parallel.gpus_per_node=4", "parallel.ep=2", "parallel.tp=2",
                             "model.architecture=qwen3_moe", "model.num_experts=4"])
    assert cfg.parallel.data_parallel_size == 2


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["algo.loss=ppo"], "algo.loss"),
        (["algo.rollout_correction=tis"], "algo.rollout_correction"),
        (["algo.rollout_correction=token-tis", "rollout.old_logprobs=engine"], "algo.rollout_correction"),
        (["algo.correction_high=0.5"], "algo.correction_high"),
        (["algo.correction_low=2.0"], "algo.correction_low"),
        (["algo.loss=gspo", "algo.clip_ratio_c=3.0"], "algo.clip_ratio_c"),
        (["algo.loss=cispo", "algo.clip_ratio_c=3.0"], "algo.clip_ratio_c"),
        (["algo.gspo_eps_low=1.0"], "algo.gspo_eps_low"),
        (["algo.kl_coef=-0.1"], "algo.kl_coef"),
        (["algo.kl_estimator=k4"], "algo.kl_estimator"),
    ],
)
def test_loss_correction_and_kl_checks_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_each_loss_resolves_its_own_aggregation_unless_set():
    from dapo_megatron.algo import resolve_agg

    def agg(*overrides):
        a = load_config(None, list(overrides)).algo
        return resolve_agg(a.loss, a.loss_agg)

    assert agg() == "token-mean"
    assert agg("algo.loss=gspo") == "seq-mean-token-mean"
    assert agg("algo.loss=drgrpo") == "seq-mean-token-sum-norm"
    assert agg("algo.loss=cispo") == "token-mean"
    assert agg("algo.loss=gspo", "algo.loss_agg=token-mean") == "token-mean"


def test_extends_merges_section_by_section_relative_to_the_file(tmp_path):
    (tmp_path / "base").mkdir()
    _write(tmp_path, """
        name: base_run
        algo:
          eps_high: 0.3
          group_size: 8
        trainer:
          train_batch_size: 32
          mini_batch_size: 8
        """, name="base/base.yaml")
    mid = _write(tmp_path, """
        extends: base/base.yaml
        algo:
          group_size: 4
        trainer:
        """, name="mid.yaml")
    leaf = _write(tmp_path, """
        extends: mid.yaml
        trainer:
          max_steps: 7
        """, name="leaf.yaml")
    cleared = _write(tmp_path, """
        extends: hf.yaml
        model:
          hf_config: null
        """, name="cleared.yaml")
    _write(tmp_path, """
        model:
          hf_config: some/config.json
        """, name="hf.yaml")
    assert load_config(str(tmp_path / "hf.yaml"), check_layout=False).model.hf_config == "some/config.json"
    assert load_config(cleared, check_layout=False).model.hf_config is None  # null inside a section is a value
    cfg = load_config(leaf, ["algo.eps_low=0.1"])
    # Each file's keys over its base's, key by key; an empty section keeps the base's.
    assert (cfg.algo.eps_high, cfg.algo.group_size, cfg.algo.eps_low) == (0.3, 4, 0.1)
    assert (cfg.trainer.train_batch_size, cfg.trainer.mini_batch_size, cfg.trainer.max_steps) == (32, 8, 7)
    assert cfg.name == "leaf"  # never the base's name
    assert load_config(mid).name == "mid" and load_config(mid).trainer.train_batch_size == 32
    # The same fields written out in one file give the same config.
    flat = _write(tmp_path, """
        algo:
          eps_high: 0.3
          group_size: 4
        trainer:
          train_batch_size: 32
          mini_batch_size: 8
          max_steps: 7
        """, name="leaf_flat.yaml")
    got, want = load_config(leaf, ["algo.eps_low=0.1"]), load_config(flat, ["algo.eps_low=0.1"])
    got.name = want.name
    assert got == want


@pytest.mark.parametrize("text, match", [
    ("extends: nowhere.yaml\n", r"extends: config file not found: .*nowhere\.yaml"),
    ("extends: [a.yaml]\n", r"extends must be the path of another config file"),
    ("extends: self.yaml\n", r"extends: a cycle"),
])
def test_extends_errors_name_the_file_and_field(tmp_path, text, match):
    path = _write(tmp_path, text, name="self.yaml")
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_the_long_chains_example_is_the_chains_example_with_four_changes():
    """examples/tiny_chains_long.yaml names only what differs from examples/tiny_chains.yaml."""
    import dataclasses
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    long = dataclasses.asdict(load_config(os.path.join(root, "examples/tiny_chains_long.yaml")))
    base = dataclasses.asdict(load_config(os.path.join(root, "examples/tiny_chains.yaml")))
    diff = {(s, k) for s in base if isinstance(base[s], dict) for k in base[s] if base[s][k] != long[s][k]}
    assert diff == {("model", "hf_dir"), ("model", "max_position_embeddings"),
                    ("algo", "max_response_length"), ("algo", "overlong_buffer")}
