"""One config tree for the whole trainer.

Every knob lives in a dataclass below; the defaults of `AlgoConfig`, `OptimizerConfig` and
`TrainerConfig` are the DAPO paper's (arXiv 2503.14476, sections 3-4). A run's config is a
YAML file of these sections plus dotted command-line overrides:

    dapo-megatron train cfg.yaml algo.eps_high=0.28 trainer.max_steps=20

Unknown keys and wrong types are errors that name the key and where it came from (the file
or the command line); cross-field checks run in `validate()` before anything starts.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from dapo_megatron.errors import ConfigError  # noqa: F401 - part of this module's interface


@dataclass
class ModelConfig:
    """The policy model: an HF checkpoint directory, or an HF-style shape built from scratch."""

    # HF checkpoint dir (config.json, tokenizer). Weights are read from `load` (a Megatron
    # checkpoint written by tools/convert_hf.py); without it, from the HF safetensors.
    hf_dir: Optional[str] = None
    # Megatron checkpoint (tools/convert_hf.py output) with the initial weights
    load: Optional[str] = None
    # A copy of the model's config.json, read when hf_dir has none yet (to plan before the
    # download); once both exist their shapes must agree. Examples ship theirs.
    hf_config: Optional[str] = None
    # Shape of a model built from scratch when hf_dir is empty (the embedded default, tests).
    # Field names are the HF config's, so the same builder reads both.
    architecture: Literal["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"] = "llama"
    vocab_size: int = 0  # 0: the tokenizer's size
    hidden_size: int = 128  # from-scratch shape (HF names); ignored with hf_dir
    num_layers: int = 3  # decoder layers (HF num_hidden_layers)
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 4  # KV heads (GQA when < num_attention_heads)
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    intermediate_size: int = 512  # MLP width (SwiGLU)
    max_position_embeddings: int = 32768  # longest prompt + response the model takes
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = True  # output layer shares the input embedding
    num_experts: int = 0  # > 0 makes a MoE (qwen3_moe / mixtral)
    num_experts_per_tok: int = 2  # MoE top-k
    moe_intermediate_size: int = 0  # expert MLP width (0: intermediate_size)
    norm_topk_prob: bool = True  # MoE: renormalise the top-k router weights
    init_std: float = 0.02  # std of the random initialisation (from scratch)
    # Numerics: "auto" is bf16 on GPU and fp32 on CPU. FP8 goes through Transformer Engine.
    # fp64 (CPU, embedded engine): policy and engine in double precision, to check that two
    # numerical paths agree below fp32's own rounding (a decode step against a KV cache and a
    # full-sequence forward differ by ~1e-5 in fp32 log-probs).
    params_dtype: Literal["auto", "fp32", "bf16", "fp16", "fp64"] = "auto"
    # FP8 training through Transformer Engine (GPU); null: off
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    # Transformer Engine FP8 scaling recipe
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    # recompute activations in backward (less memory, more compute)
    recompute_activations: bool = False

    def hf_config_dict(self, vocab_size: int | None = None) -> dict[str, Any]:
        """The HF-style config dict of a from-scratch model (model_type + HF field names)."""
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        cfg: dict[str, Any] = {
            "model_type": self.architecture,
            "architectures": [_HF_ARCHITECTURES[self.architecture]],
            "vocab_size": vocab_size or self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.init_std,
            "hidden_act": "silu",
        }
        if self.architecture == "qwen2":
            cfg["attention_bias"] = True
        if self.architecture in ("qwen3_moe", "mixtral"):
            key = "num_local_experts" if self.architecture == "mixtral" else "num_experts"
            cfg[key] = self.num_experts
            cfg["num_experts_per_tok"] = self.num_experts_per_tok
            cfg["moe_intermediate_size"] = self.moe_intermediate_size or self.intermediate_size
            cfg["norm_topk_prob"] = self.norm_topk_prob
        return cfg


_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


@dataclass
class ParallelConfig:
    """Process layout. World size = nodes * gpus_per_node (CPU: processes per node)."""

    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    ep: int = 1  # expert parallel size (MoE)
    # context parallel size: packed sequences split over cp GPUs (TE's CP attention; GPU only)
    cp: int = 1
    dp: Optional[int] = None  # derived from the world size; if set, must agree
    nodes: int = 1  # nodes in the job (set by the Slurm scripts)
    gpus_per_node: int = 1  # ranks per node (GPUs; CPU: processes)
    sequence_parallel: bool = False  # GPU only: the torch norm refuses it at TP > 1 on CPU
    # shard optimizer state over data-parallel ranks (ZeRO-1)
    use_distributed_optimizer: bool = True

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)


@dataclass
class AlgoConfig:
    """DAPO itself. Defaults are the paper's; each technique stays switchable for ablations."""

    group_size: int = 16  # G responses per prompt (paper sec. 4.1)
    eps_low: float = 0.2  # Clip-Higher (sec. 3.1): decoupled lower ...
    eps_high: float = 0.28  # ... and upper clip range
    clip_ratio_c: Optional[float] = None  # dual-clip bound for negative advantages; off
    # The surrogate (algo/objectives.py): DAPO's clipped token ratio, GSPO's sequence ratio
    # (arXiv 2507.18071), CISPO's clipped IS weight (arXiv 2506.13585), Dr. GRPO (arXiv
    # 2503.20783: no std in the advantage, constant normaliser algo.max_response_length).
    loss: Literal["dapo", "gspo", "cispo", "drgrpo"] = "dapo"
    # None: the loss's own (dapo, cispo: token-mean; gspo: seq-mean-token-mean; drgrpo:
    # seq-mean-token-sum-norm, i.e. divided by sequences * algo.max_response_length).
    loss_agg: Optional[Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                               "seq-mean-token-sum-norm"]] = None
    gspo_eps_low: float = 3e-4  # GSPO's clip range of the sequence ratio (its experiments)
    gspo_eps_high: float = 4e-4
    dynamic_sampling: bool = True  # sec. 3.2: keep groups with 0 < #correct < G
    max_gen_batches: int = 10  # generation rounds per step before giving up (0: unbounded)
    surplus: Literal["drop", "carry"] = "drop"  # kept groups beyond train_batch_size
    max_response_length: int = 20480  # L_max (sec. 4.1)
    overlong_buffer: int = 4096  # L_cache (sec. 3.4)
    overlong_penalty_factor: float = 1.0  # scale of the soft overlong penalty R_len
    soft_overlong: bool = True  # soft overlong punishment R_len
    overlong_filter: bool = False  # mask truncated samples out of the loss
    adv_eps: float = 1e-6  # eps in A = (R - mean) / (std + eps)
    adv_std_unbiased: bool = True  # std over the G rewards divides by G-1 (torch.std, verl)
    kl_coef: float = 0.0  # DAPO drops the KL term (sec. 2.3); > 0 gives GRPO's KL loss
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # against the frozen initial weights
    reference_offload: bool = False  # GPU: the KL reference's weights in host memory between steps
    entropy_coef: float = 0.0  # entropy bonus in the loss (0: none, as the paper)
    # Train/inference mismatch correction (algo/correction.py): weight each token's policy-
    # gradient term by rho = pi_old / pi_engine truncated at correction_high (token-tis,
    # seq-tis: TIS, Yao et al. 2025), or drop tokens / sequences whose rho lies outside
    # [correction_low, correction_high] (token-mask: IcePop, arXiv 2510.18855; seq-mask).
    # seq-* use the geometric mean of the sequence's token ratios.
    rollout_correction: Literal["none", "token-tis", "token-mask", "seq-tis", "seq-mask"] = "none"
    correction_high: float = 2.0  # C; the TIS blog's value (the mismatch metrics count outside too)
    correction_low: Optional[float] = None  # None: 1 / correction_high
    # MoE routing replay (policy/routing_replay.py): r2, the training passes use the experts
    # this step's old-log-prob pass chose; r3 (rollout routing replay), the old-log-prob and
    # training passes use the experts the rollout engine chose for each token. MoE only.
    routing_replay: Literal["none", "r2", "r3"] = "none"


@dataclass
class RolloutConfig:
    # embedded (torch, CPU/GPU) or SGLang (GPU, the [gpu] extra)
    engine: Literal["embedded", "sglang"] = "embedded"
    # Prompts per generation round. The paper's recipe oversamples 3x the train batch.
    gen_batch_size: int = 1536
    # Size each round from the keep rate of the rounds before it (algo/sampling.py,
    # BatchAssembler.round_size): the groups still needed / that rate, +10%, at most
    # gen_batch_size; the run's first round and the last one algo.max_gen_batches allows
    # draw gen_batch_size. Less generated and thrown away while most groups pass the filter.
    # False: every round draws gen_batch_size.
    adaptive_gen_batch: bool = False
    temperature: float = 1.0  # sampling temperature of training rollouts
    top_p: float = 1.0  # nucleus sampling of training rollouts (1: off)
    top_k: int = -1  # top-k sampling of training rollouts (-1: off)
    max_prompt_length: int = 2048  # tokens; longer prompts are dropped when the data loads
    old_logprobs: Literal["policy", "engine"] = "policy"  # who supplies pi_old
    num_engines: int = 0  # 0: one per node (or per engine_tp GPUs)
    engine_tp: int = 1  # tensor parallel size of each SGLang engine
    engine_num_cpus: int = 1  # CPU cores per embedded engine actor
    sglang_mem_fraction: float = 0.5  # of GPU memory, colocated with training
    # SGLang honours per-sample seeds only with --enable-deterministic-inference (0.5.23,
    # srt/sampling/sampling_batch_info.py); false trades resume reproducibility for speed.
    sglang_deterministic: bool = True
    # the weight sync's bucket size: the policy's export cuts its buckets (policy_worker.py,
    # the one reader); engines send each bucket on as it came
    weight_bucket_mb: int = 512
    # colocated: engines share the training GPUs (memory released/resumed around training,
    # weights as CUDA IPC handles); disaggregated: engines on GPUs of their own, weights
    # broadcast over a weight-update group (NCCL; gloo on CPU).
    placement: Literal["colocated", "disaggregated"] = "colocated"
    # Hang detection for the engines. A weight-sync call (a bucket, opening or closing the
    # session) taking longer than this counts as hung: the engine is killed, replaced and the
    # sync runs again. A generate call may take as long as it needs, but every this many
    # seconds the engine is pinged; one that does not answer within max(30 s, this) is
    # frozen and replaced, its chunk keeping its place in the round.
    hang_timeout_s: float = 600.0
    max_engine_restarts: int = 3  # dead engines replaced per run before giving up
    # Generate calls in flight per engine (0: 1 for embedded, which decodes one call at a
    # time; 4 for SGLang, which serves many requests at once), so one call's longest
    # response does not hold up the next chunk.
    calls_per_engine: int = 0
    # Partial rollouts (rollout/partial.py): responses still generating when the batch fills
    # are stopped with their tokens, log-probs and versions and continued first next step
    # (embedded engine: the same random stream; SGLang: a seed of the continuation's own,
    # sglang_api.plan_samples), under newer weights; the correction weighs each token by its
    # own engine log-prob. Off: they are discarded.
    partial_rollouts: bool = False
    # Asynchronous training (controller/async_rollout.py): > 0 generates step t+1 while step
    # t trains (disaggregated placement only) and drops groups whose oldest token is more
    # than this many weight versions behind the policy that trains on them. 0: synchronous.
    max_staleness: int = 0


@dataclass
class DataConfig:
    # Training prompts: jsonl or parquet (DAPO-Math-17K format). Empty: the embedded task.
    train_path: str = ""
    eval_path: str = ""  # held-out prompts for avg@k (empty: the embedded task's held-out split)
    prompt_key: str = "prompt"  # column of the chat prompt ([{role, content}])
    question_key: str = "question"  # column of the bare question (for data.template=dapo)
    # column of the reference answer (dotted: nested field)
    answer_key: str = "reward_model.ground_truth"
    data_source_key: str = "data_source"  # column naming the source (reported per source)
    # dapo: rebuild the prompt with the DAPO instruction; as-is: use the prompt column
    template: Literal["dapo", "as-is"] = "dapo"
    tokenizer: str = ""  # HF tokenizer dir; empty: model.hf_dir, or the embedded tokenizer
    shuffle: bool = True  # seeded shuffle of the prompt order every epoch
    # The embedded task (used when train_path is empty), data/synthetic.py: "arithmetic"
    # (a+b*c) or "chains" (n additions/subtractions, one line per step: lengths vary with n).
    synthetic_task: Literal["arithmetic", "chains"] = "arithmetic"
    synthetic_train_size: int = 20000
    synthetic_eval_size: int = 300  # held-out problems of the embedded task
    synthetic_max_addend: int = 20  # arithmetic: a in a+b*c
    synthetic_max_factor: int = 9  # arithmetic: b and c
    synthetic_min_steps: int = 1  # chains: n drawn uniformly from min..max
    synthetic_max_steps: int = 7


@dataclass
class RewardConfig:
    timeout_s: float = 5.0  # per-answer scoring time limit; a timeout scores incorrect_score
    num_workers: int = 1  # reward worker processes
    correct_score: float = 1.0  # reward of a correct final answer
    incorrect_score: float = -1.0  # reward of a wrong or missing answer


@dataclass
class OptimizerConfig:
    lr: float = 1e-6  # paper sec. 4.1
    min_lr: float = 0.0  # floor of the cosine/linear decay
    warmup_steps: int = 20  # linear warmup, paper sec. 4.1
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"  # schedule after warmup
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0: off)


@dataclass
class TrainerConfig:
    train_batch_size: int = 512  # prompts (groups) per step, paper sec. 4.1
    mini_batch_size: int = 32  # prompts per optimizer step: 512/32 = 16 updates per step
    max_tokens_per_microbatch: int = 32768  # token budget of one packed micro-batch
    max_steps: int = 100  # rollout steps (each: generate, filter, mini-batch updates)
    # Stop at the first step boundary once the engines generated this many responses for
    # training: every response with a token, kept, dropped, aborted or left unscored (0: none).
    sample_budget: int = 0
    # Niceness of Ray's worker processes (policy ranks, engines, reward) above the driver's,
    # when the trainer starts Ray itself. 0: the driver's priority (Ray's own default is 15).
    worker_niceness: int = 0
    seed: int = 42  # seeds data order, sampling and initialisation
    run_dir: str = ""  # empty: runs/<config file name>
    # auto: GPU when the Ray cluster has one; cuda fails at start-up without one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Colocated GPU runs: move params, grads and optimizer state to host memory after each
    # update, so the engines' KV cache gets the memory back (a no-op on CPU).
    offload: bool = False
    # A policy rank busy in a call (train, weight push, save) is pinged this often; one that
    # does not answer within max(30 s, this) is frozen: the run stops with an error naming it
    # (the newest checkpoint is kept; rerun to resume). A long step is not a hang.
    hang_timeout_s: float = 600.0
    # Micro-batches as packed rows (sequences end to end, no padding; THD on GPU) in the
    # old-log-prob, reference and training passes; false: right-padded rows.
    sequence_packing: bool = True
    # MiB of one micro-batch's vocab-parallel logits on a rank above which log-probs and
    # entropy run in sequence chunks with the output layer recomputed (0: never chunk).
    logits_chunk_mb: int = 256

    @property
    def num_mini_batches(self) -> int:
        return self.train_batch_size // self.mini_batch_size


@dataclass
class EvalConfig:
    every: int = 5  # steps; 0: never
    k: int = 32  # samples per prompt: avg@k (paper: avg@32)
    temperature: float = 1.0  # paper: 1.0
    top_p: float = 0.7  # paper: 0.7
    max_prompts: int = 0  # 0: the whole eval set


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <run dir>/checkpoints
    save_every: int = 10  # steps; also at the end of the run (0: only on SIGTERM/SIGUSR1)
    keep_last: int = 2  # checkpoints kept (older ones are deleted)
    resume: bool = True  # continue from the newest checkpoint in dir
    # With resume false on a directory that holds a run: move that run aside and start over
    # (false: refuse, so an old run is never overwritten or mixed with a new one).
    overwrite: bool = False


@dataclass
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"  # console log level
    tensorboard: bool = False  # also write TensorBoard events to <run dir>/tensorboard
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "dapo-megatron"  # wandb project name
    # Decoded responses logged per data source every step, with reward and length (verl's
    # num_examine); evaluation logs one per data source. 0: none.
    num_examine: int = 1


@dataclass
class DapoConfig:
    name: str = "dapo"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> str:
        return self.trainer.run_dir or os.path.join("runs", self.name)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, check_layout: bool = True) -> "DapoConfig":
        _validate(self)
        if check_layout:
            _validate_cp_device(self)
            _validate_fp64_device(self)
            # The model's shape against the layout, lengths and engines: one place.
            from dapo_megatron.resolve import resolve

            resolve(self)
        return self


# --------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_layout: bool = True) -> DapoConfig:
    """Read a YAML config (or the defaults when `path` is None; `extends:` resolved, see
    `_read_yaml`), apply `a.b=value` overrides, check types and cross-field rules. The run name
    defaults to the file's stem.

    check_layout=False leaves out the model-against-layout check (dapo_megatron.resolve), for
    the planner, which reports a layout's errors and suggests one that works instead."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = path
        raw = _read_yaml(path)
    cfg = _build(DapoConfig, raw, prefix="", source=source)
    if path is not None and "name" not in raw:
        cfg.name = os.path.splitext(os.path.basename(path))[0]
    for item in overrides:
        apply_override(cfg, item)
    try:
        return cfg.validate(check_layout=check_layout)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file's sections, with `extends: other.yaml` (a path relative to the file)
    resolved: the other file's sections first, then this file's keys over them, section by
    section, so a variant names only what it changes. `name` is never inherited: a run is
    named by its own file."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: extends: a cycle ({' -> '.join(chain + (real,))})")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends must be the path of another config file, not {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.exists(base_path):
        raise ConfigError(f"{path}: extends: config file not found: {base_path}")
    merged = _read_yaml(base_path, chain + (real,))
    merged.pop("name", None)
    return _merge(merged, raw)


def _merge(base: dict[str, Any], over: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """`over`'s keys over `base`'s, mappings merged key by key. An empty top-level section
    (`trainer:` with nothing under it, None) keeps the base's; inside a section, null is a value
    (`hf_dir: null` clears the base's)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, top=False)
        elif value is not None or not top or key not in out:
            out[key] = value
    return out


def apply_override(cfg: DapoConfig, item: str) -> None:
    """Apply one `section.key=value` override; the value is read as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    target: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or part not in _field_types(type(target)):
            raise ConfigError(f"command line: unknown config key {'.'.join(parts[: i + 1])!r}")
        target = getattr(target, part)
    leaf = parts[-1]
    types_ = _field_types(type(target)) if dataclasses.is_dataclass(target) else {}
    if leaf not in types_:
        raise ConfigError(f"command line: unknown config key {key!r}")
    if dataclasses.is_dataclass(types_[leaf]):
        raise ConfigError(f"command line: {key!r} is a section; set one of its keys")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    setattr(target, leaf, _coerce(types_[leaf], value, key, "command line"))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = _field_types(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key {prefix + unknown[0]!r} "
            f"(known keys in {prefix.rstrip('.') or 'the top level'}: {', '.join(hints)})"
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(tp, value, prefix + name, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key} must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    return value


# --------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _validate(cfg: DapoConfig) -> None:
    _validate_ranges(cfg)
    _validate_checkpoint(cfg)
    p, a, t, m, r = cfg.parallel, cfg.algo, cfg.trainer, cfg.model, cfg.rollout
    for name in ("tp", "pp", "ep", "cp", "nodes", "gpus_per_node"):
        _check(getattr(p, name) >= 1, f"parallel.{name}", "must be >= 1")
    if p.dp is not None:
        _check(
            p.tp * p.pp * p.cp * p.dp == p.world_size,
            "parallel.dp",
            f"tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} must equal the world size {p.world_size}",
        )
    if p.cp > 1:
        _check(cfg.trainer.sequence_packing, "parallel.cp",
               "context parallelism splits packed rows; set trainer.sequence_packing=true")
    _check(m.params_dtype != "fp16", "model.params_dtype",
           "fp16 needs dynamic loss scaling, which this trainer does not run; use bf16 (GPU) or fp32")
    if m.params_dtype == "fp64":
        # megatron-core's distributed optimizer casts gradients with .float()
        # (optimizer/distrib_optimizer.py, copy_group_grads); its plain optimizer keeps the
        # parameters' dtype. SGLang and Transformer Engine serve no fp64.
        _check(not p.use_distributed_optimizer, "model.params_dtype",
               "fp64 needs parallel.use_distributed_optimizer=false (megatron-core's "
               "distributed optimizer keeps fp32 gradients)")
        _check(r.engine == "embedded", "model.params_dtype",
               f"fp64 runs on the embedded engine only; rollout.engine={r.engine} has no fp64")
        _check(m.fp8 is None, "model.params_dtype", "fp64 and model.fp8 exclude each other")
    if m.hf_dir is None and m.hf_config is None and m.architecture in ("qwen3_moe", "mixtral"):
        _check(m.num_experts > 0, "model.num_experts", f"must be > 0 for architecture {m.architecture}")
        _check(0 < m.num_experts_per_tok <= m.num_experts, "model.num_experts_per_tok",
               "must be in 1..num_experts")
    _check(a.group_size >= 2, "algo.group_size", "must be >= 2 (advantages are relative within a group)")
    _check(0 <= a.eps_low < 1, "algo.eps_low", "must be in [0, 1)")
    _check(a.eps_high >= 0, "algo.eps_high", "must be >= 0")
    if a.clip_ratio_c is not None:
        _check(a.clip_ratio_c > 1, "algo.clip_ratio_c", "dual-clip bound must be > 1")
    _check(a.max_response_length > 0, "algo.max_response_length", "must be > 0")
    _check(
        0 <= a.overlong_buffer < a.max_response_length,
        "algo.overlong_buffer",
        f"L_cache={a.overlong_buffer} must be >= 0 and < L_max=algo.max_response_length={a.max_response_length}",
    )
    _check(a.max_gen_batches >= 0, "algo.max_gen_batches", "must be >= 0 (0: unbounded)")
    _validate_loss_and_correction(cfg)
    _check(t.train_batch_size >= 1, "trainer.train_batch_size", "must be >= 1")
    _check(t.sample_budget >= 0, "trainer.sample_budget", "must be >= 0 (0: no budget)")
    _check(t.mini_batch_size >= 1, "trainer.mini_batch_size", "must be >= 1")
    _check(
        t.train_batch_size % t.mini_batch_size == 0,
        "trainer.mini_batch_size",
        f"trainer.train_batch_size={t.train_batch_size} must be divisible by "
        f"trainer.mini_batch_size={t.mini_batch_size}",
    )
    dp = p.data_parallel_size
    _check(
        t.mini_batch_size * a.group_size >= dp,
        "trainer.mini_batch_size",
        f"a mini-batch of {t.mini_batch_size}x{a.group_size} responses cannot feed {dp} data-parallel ranks",
    )
    _check(
        t.max_tokens_per_microbatch >= r.max_prompt_length + a.max_response_length,
        "trainer.max_tokens_per_microbatch",
        f"must hold one full sequence (rollout.max_prompt_length + algo.max_response_length = "
        f"{r.max_prompt_length + a.max_response_length})",
    )
    _check(r.gen_batch_size >= 1, "rollout.gen_batch_size", "must be >= 1")
    _check(0 < r.temperature, "rollout.temperature", "must be > 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _check(0 < r.sglang_mem_fraction < 1, "rollout.sglang_mem_fraction", "must be in (0, 1)")
    _validate_async_rollout(cfg)
    d = cfg.data
    _check(1 <= d.synthetic_min_steps <= d.synthetic_max_steps, "data.synthetic_min_steps",
           f"need 1 <= synthetic_min_steps <= synthetic_max_steps (got {d.synthetic_min_steps}, "
           f"{d.synthetic_max_steps})")
    _check(cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _check(cfg.reward.num_workers >= 1, "reward.num_workers", "must be >= 1")
    _check(cfg.optimizer.lr > 0, "optimizer.lr", "must be > 0")
    _check(cfg.optimizer.min_lr <= cfg.optimizer.lr, "optimizer.min_lr", "must be <= optimizer.lr")
    _check(cfg.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(cfg.eval.k >= 1, "eval.k", "must be >= 1")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    if m.fp8 is not None:
        _check(m.params_dtype in ("auto", "bf16"), "model.fp8", "FP8 training needs bf16 params")
    _validate_gpu_features(cfg)


def visible_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of CUDA device 0 as this process sees it; None without a usable GPU."""
    import torch

    try:
        return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken driver means "cannot know"
        return None


def _validate_cp_device(cfg: DapoConfig) -> None:
    """A run's start only (the planner may run on a login node without GPUs)."""
    p = cfg.parallel
    if p.cp > 1:
        # The split runs through TE's CP attention (extensions/transformer_engine.py,
        # TEDotProductAttention with cp_group); megatron's local attention cannot attend
        # across ranks.
        _check(cfg.trainer.device != "cpu" and visible_compute_capability() is not None,
               "parallel.cp", f"parallel.cp={p.cp} needs Transformer Engine's context-parallel "
               "attention on GPUs; megatron's local (CPU) attention cannot attend across "
               "ranks. Use parallel.cp=1 on CPU")


def _validate_fp64_device(cfg: DapoConfig) -> None:
    """A run's start only, like _validate_cp_device."""
    if cfg.model.params_dtype == "fp64":
        _check(cfg.trainer.device == "cpu" or visible_compute_capability() is None,
               "model.params_dtype", "fp64 is a CPU mode (numerics checks); on GPUs use bf16 "
               "or fp32, or set trainer.device=cpu")


def _validate_gpu_features(cfg: DapoConfig) -> None:
    """GPU-only settings that megatron-core / Transformer Engine would reject later, on a
    GPU, after the cluster is up (issue 14, finding 9)."""
    p, m = cfg.parallel, cfg.model
    # megatron-core refuses it (model_parallel_config.py, __post_init__: "Cannot use sequence
    # parallelism without tensor parallelism"); it splits activations over the TP group.
    _check(not (p.sequence_parallel and p.tp == 1), "parallel.sequence_parallel",
           "needs tensor parallelism (parallel.tp > 1); set it to false at tp 1")
    if m.fp8 is not None and m.fp8_recipe == "mxfp8":
        # TE runs MXFP8 only on compute capability >= 10.0 (Blackwell): transformer_engine
        # 2.20.2 pytorch/quantization.py, _compute_mxfp8_support. Hopper (9.0) fails there.
        cc = visible_compute_capability()
        _check(cc is not None and cc >= (10, 0), "model.fp8_recipe",
               "mxfp8 needs a GPU of compute capability >= 10.0 (Blackwell); "
               + (f"this machine's GPU reports {cc[0]}.{cc[1]}" if cc else
                  "no GPU is visible here, so it cannot be checked")
               + ". On Hopper (H100/H200, 9.0) use fp8_recipe delayed, tensorwise or blockwise")


def _validate_async_rollout(cfg: DapoConfig) -> None:
    r = cfg.rollout
    if r.max_staleness > 0:
        _check(r.placement == "disaggregated", "rollout.max_staleness",
               f"= {r.max_staleness} overlaps generation with training, which needs engines that keep "
               "their memory while the policy trains: set rollout.placement=disaggregated (with "
               "rollout.num_engines), or rollout.max_staleness=0")


def _validate_loss_and_correction(cfg: DapoConfig) -> None:
    a = cfg.algo
    if a.clip_ratio_c is not None:
        _check(a.loss in ("dapo", "drgrpo"), "algo.clip_ratio_c",
               f"dual clip bounds the PPO-clip token term; algo.loss={a.loss} has none (unset it)")
    if a.rollout_correction != "none":
        _check(cfg.rollout.old_logprobs == "policy", "algo.rollout_correction",
               "corrects pi_old (the policy's recomputed log-probs) towards the engine's sampling "
               "distribution; with rollout.old_logprobs=engine the ratio is 1 and it does nothing. "
               "Set rollout.old_logprobs=policy or algo.rollout_correction=none")


_GE0 = (lambda v: v >= 0, "must be >= 0")
_GE1 = (lambda v: v >= 1, "must be >= 1")
_GT0 = (lambda v: v > 0, "must be > 0")
_ANY = (lambda v: True, "")
_UNIT = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_PROB = (lambda v: 0 < v <= 1, "must be in (0, 1]")
# The range of every numeric key (floats must also be finite). A numeric key added to the
# tree needs an entry here: tests/test_config.py fails on one without.
NUMERIC_RANGES: dict[str, tuple] = {
    "model.vocab_size": _GE0, "model.hidden_size": _GE1, "model.num_layers": _GE1,
    "model.num_attention_heads": _GE1, "model.num_key_value_heads": _GE1, "model.head_dim": _GE0,
    "model.intermediate_size": _GE1, "model.max_position_embeddings": _GE1, "model.rope_theta": _GT0,
    "model.rms_norm_eps": _GT0, "model.num_experts": _GE0, "model.num_experts_per_tok": _GE1,
    "model.moe_intermediate_size": _GE0, "model.init_std": _GT0,
    "parallel.tp": _GE1, "parallel.pp": _GE1, "parallel.ep": _GE1, "parallel.cp": _GE1, "parallel.dp": _GE1,
    "parallel.nodes": _GE1, "parallel.gpus_per_node": _GE1,
    "algo.group_size": (lambda v: v >= 2, "must be >= 2 (advantages are relative within a group)"),
    "algo.eps_low": _UNIT, "algo.eps_high": _GE0,
    "algo.clip_ratio_c": (lambda v: v > 1, "dual-clip bound must be > 1"),
    "algo.max_gen_batches": _GE0, "algo.max_response_length": _GE1, "algo.overlong_buffer": _GE0,
    "algo.overlong_penalty_factor": _GE0, "algo.adv_eps": _GT0, "algo.kl_coef": _GE0,
    "algo.entropy_coef": _ANY, "algo.gspo_eps_low": _UNIT, "algo.gspo_eps_high": _GE0,
    "algo.correction_high": (lambda v: v >= 1, "must be >= 1 (the band holds ratio 1)"),
    "algo.correction_low": (lambda v: 0 <= v <= 1, "must be in [0, 1] (or null: 1/high)"),
    "rollout.gen_batch_size": _GE1, "rollout.temperature": _GT0, "rollout.top_p": _PROB,
    "rollout.top_k": (lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1"),
    "rollout.max_prompt_length": _GE1, "rollout.num_engines": (lambda v: v >= 0, "must be >= 0 (0: one per node)"),
    "rollout.engine_tp": _GE1, "rollout.engine_num_cpus": _GE1,
    "rollout.sglang_mem_fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "rollout.weight_bucket_mb": _GE1, "rollout.max_engine_restarts": _GE0, "rollout.hang_timeout_s": _GT0,
    "rollout.calls_per_engine": (lambda v: v >= 0, "must be >= 0 (0: 1 for embedded, 4 for SGLang)"),
    "rollout.max_staleness": (lambda v: v >= 0, "must be >= 0 (0: synchronous training)"),
    "data.synthetic_train_size": _GE1, "data.synthetic_eval_size": _GE0,
    "data.synthetic_max_addend": _GE1, "data.synthetic_max_factor": _GE1,
    "data.synthetic_min_steps": _GE1, "data.synthetic_max_steps": _GE1,
    "trainer.worker_niceness": (lambda v: 0 <= v <= 19, "must be in 0..19 (added to the driver's)"),
    "reward.timeout_s": _GT0, "reward.num_workers": _GE1, "reward.correct_score": _ANY,
    "reward.incorrect_score": _ANY,
    "logging.num_examine": (lambda v: v >= 0, "must be >= 0 (0: log no responses)"),
    "optimizer.lr": _GT0, "optimizer.min_lr": _GE0, "optimizer.warmup_steps": _GE0,
    "optimizer.weight_decay": _GE0, "optimizer.adam_beta1": _UNIT, "optimizer.adam_beta2": _UNIT,
    "optimizer.adam_eps": _GT0, "optimizer.clip_grad": (lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
    "trainer.train_batch_size": _GE1, "trainer.mini_batch_size": _GE1,
    "trainer.max_tokens_per_microbatch": _GE1, "trainer.logits_chunk_mb": _GE0, "trainer.max_steps": _GE0,
    "trainer.sample_budget": (lambda v: v >= 0, "must be >= 0 (0: no budget)"), "trainer.seed": _GE0,
    "trainer.hang_timeout_s": _GT0,
    "eval.every": (lambda v: v >= 0, "must be >= 0 (0: never)"), "eval.k": _GE1, "eval.temperature": _GT0,
    "eval.top_p": _PROB, "eval.max_prompts": _GE0,
    "checkpoint.save_every": (lambda v: v >= 0, "must be >= 0 (0: none, except on a stop signal)"),
    "checkpoint.keep_last": _GE1,
}


def numeric_keys(cls: type = DapoConfig, prefix: str = "") -> dict[str, type]:
    """Every int/float key of the config tree (dotted name -> int or float)."""
    out: dict[str, type] = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(numeric_keys(tp, f"{prefix}{name}."))
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(args) == 1 and args[0] in (int, float):
            out[prefix + name] = args[0]
    return out


def _validate_ranges(cfg: DapoConfig) -> None:
    """Refuse nan/inf and out-of-range numbers, naming the key (before any cross-field rule)."""
    import math

    for key in numeric_keys():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        if isinstance(value, float):
            _check(math.isfinite(value), key, f"must be a finite number, got {value}")
        ok, message = NUMERIC_RANGES.get(key, _ANY)
        _check(ok(value), key, f"{message}, got {value}")


def _validate_checkpoint(cfg: DapoConfig) -> None:
    c = cfg.checkpoint
    _check(not (c.overwrite and c.resume), "checkpoint.overwrite",
           "moves an earlier run aside to start over, so it needs checkpoint.resume=false")


def check_run_paths(cfg: DapoConfig) -> None:
    """Before anything starts: the data files exist and checkpoint.dir can be written.
    (Not part of `validate`: `plan` and the tests read configs whose files live elsewhere.)"""
    import tempfile

    for key in ("data.train_path", "data.eval_path"):
        path = getattr(cfg.data, key.split(".")[1])
        _check(not path or os.path.isfile(path), key, f"no such file: {path}")
    root = cfg.checkpoint_dir
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"checkpoint.dir: cannot write checkpoints to {root} ({type(e).__name__}: "
                          f"{e.strerror or e}); fix its permissions or set checkpoint.dir elsewhere") from None


def dump_config(cfg: DapoConfig, path: str) -> None:
    """Write the fully resolved config next to a run, for the record and for resume."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
