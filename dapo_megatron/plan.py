"""Memory planner: does a config's parallel layout fit the cluster, and if not, what would?

`plan(cfg, nodes, gpus_per_node, gpu_mem_gb)` checks the TP/PP/EP layout against the model
and the cluster, then estimates per-GPU memory for the fullest pipeline stage; `format_report`
renders the result (`dapo-megatron plan CONFIG --nodes N --gpus-per-node 8`). Sizes are in
bytes; the report prints GiB (2**30 bytes). `gpu_mem_gb` is in GiB as nvidia-smi shows it
(an "80 GB" H100 reports 81559 MiB = 79.6 GiB).

Formulas and their sources (h hidden, a heads, k kv heads, d head dim, f MLP width, E experts,
K experts per token, fe expert width, V vocab, L layers; t, p, e, c = TP, PP, EP, CP; T tokens per
micro-batch; dp_dense = world/(t*p), dp_expert = world/(t*e*p)):

Parameters (exact count from the shape, per rank):
  embedding / output layer   V_pad*h/t, V_pad = V rounded up to a multiple of lcm(128, t), as
                             our model builder pads (convert.arch.padded_vocab_size; Megatron-LM's
                             `_vocab_size_with_padding` uses 128*t);
                             the embedding sits on the first stage, the output layer on the last;
                             tied embeddings with p > 1 keep a copy on the last stage too
                             (Megatron's shared embedding group).
  attention                  h*(a+2k)*d/t (fused QKV, column parallel) + a*d*h/t (output, row parallel)
                             + (a+2k)*d/t with QKV bias (qwen2) + 2*d with QK-norm (qwen3);
                             k < t is allowed when t is a multiple of k (megatron-core attention.py
                             all-gathers and slices the KV heads), the weight is still split t ways.
  dense MLP (SwiGLU)         3*h*f/t
  MoE MLP                    h*E router (replicated) + (E/e)*3*h*fe/t (expert tensor parallel = t,
                             Megatron's default when --expert-tensor-parallel-size is unset)
  norms                      2*h per layer + h final norm (replicated over TP)
Gradients, optimizer (Megatron DDP + distributed optimizer; megatron-core docs, "Distributed
Optimizer": bf16 params with fp32 grads cost 6 + 12/d bytes per parameter, fp32 params 8 + 8/d):
  bf16 params 2 B, fp32 main grads 4 B (full buffer on every rank), fp32 master + Adam m + v
  12 B sharded over the data-parallel ranks (dense over dp_dense, experts over dp_expert);
  fp32 params: 4 + 4 B, Adam m + v 8 B sharded. Without the distributed optimizer, unsharded.
Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, sec. 4: 34*s*b*h + 5*a*s^2*b bytes per layer, /t with sequence
parallelism). Redone for this model family: bf16, no dropout, RMSNorm, SwiGLU, GQA, and flash
attention, which never stores the a*s^2 score matrix (the 5as/h term vanishes). Per token, per layer:
  norm inputs + QKV/fc1 inputs     8h    (/t with sequence parallelism, else replicated)
  q, k, v (saved by flash attn)    2(a+2k)d/t,  attention output (= projection input) 2ad/t,
                                   softmax log-sum-exp 4a/t, QK-norm inputs 2(a+k)d/t
  dense SwiGLU                     fc1 output 4f/t + fc2 input 2f/t
  MoE                              router logits 4E (/t with SP) + K*(2h + 6fe/t) for the K routed
                                   copies, assuming balanced routing (real routers skew: keep headroom)
  Full recompute (Megatron recompute_granularity=full, uniform, 1 layer) keeps only each layer's
  input, 2h (/t with SP), plus one layer's full set while it is recomputed.
  1F1B keeps min(p - stage, microbatches) micro-batches in flight on a stage (Korthikanti sec. 4.2.3),
  counted here as p - stage (a DAPO mini-batch has far more micro-batches than stages).
  The last stage adds the logits: bf16 2*V_pad/t plus fp32 log-softmax 4*V_pad/t per token.
  T = trainer.max_tokens_per_microbatch / c (packed sequences).
SGLang share (colocated): SGLang takes rollout.sglang_mem_fraction of each GPU for its weights
  (2 B per parameter / engine_tp) and its KV pool; KV costs 2 (K and V) * L * max(k/engine_tp, 1)
  * d * 2 B per token per GPU (SGLang replicates KV heads when engine_tp > k). The requested
  concurrency is rollout.gen_batch_size * G sequences of max_prompt_length + max_response_length
  tokens spread over the engines; what does not fit in the pool waits in SGLang's queue.
Colocated timeline (as in verl and slime): SGLang's memory is released while Megatron trains, while
  Megatron's weights, grads and optimizer stay resident through rollout. So two peaks must fit:
  training = static + activations + overhead; rollout = static + SGLang share + overhead.
  `overhead_gb` (default 5 GiB) covers the CUDA context, NCCL buffers and allocator fragmentation:
  an estimate, not a measurement.
Weight sync per step: every engine receives the whole model as bf16 HF tensors (2 B per parameter),
  in buckets of rollout.weight_bucket_mb.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from dapo_megatron.config import ConfigError, DapoConfig, ModelConfig

GIB = 2**30


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The sizes the planner needs, read from an HF config dict."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden: int  # dense MLP width
    num_experts: int = 0  # 0: dense
    experts_per_token: int = 0
    expert_ffn_hidden: int = 0
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE MLP (True) or dense (False)
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> "ModelShape":
        """The shape as the model builder reads it (one interpretation of HF configs:
        dapo_megatron.convert.arch.model_args_from_hf)."""
        from dapo_megatron.convert.arch import UnsupportedModelError, model_args_from_hf

        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in hf:
                raise ConfigError(f"{source}: {key} is missing; the planner needs the model's shape")
        if not hf["vocab_size"]:
            raise ConfigError(f"{source}: vocab_size is 0 (the tokenizer's size); set model.vocab_size "
                              f"for planning")
        try:
            args = model_args_from_hf(hf)
        except (UnsupportedModelError, KeyError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
        return cls(
            architecture=hf.get("model_type", args.family),
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            ffn_hidden=args.ffn_hidden_size,
            num_experts=args.num_experts,
            experts_per_token=args.moe_top_k,
            expert_ffn_hidden=args.moe_ffn_hidden_size,
            moe_layers=tuple(args.is_moe_layer(i) for i in range(args.num_layers)),
            tied_embeddings=args.tie_word_embeddings,
            qkv_bias=args.qkv_bias,
            qk_norm=args.qk_norm,
        )

    def padded_vocab(self, tp: int) -> int:
        from dapo_megatron.convert.arch import padded_vocab_size

        return padded_vocab_size(self.vocab_size, tp)

    def layer_params(self, moe: bool) -> tuple[int, int]:
        """(dense, expert) parameters of one whole layer, no parallelism."""
        h, d, a, k = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        dense = 2 * h + h * (a + 2 * k) * d + a * d * h
        dense += (a + 2 * k) * d if self.qkv_bias else 0
        dense += 2 * d if self.qk_norm else 0
        if moe:
            return dense + h * self.num_experts, self.num_experts * 3 * h * self.expert_ffn_hidden
        return dense + 3 * h * self.ffn_hidden, 0

    def total_params(self) -> int:
        """Parameters of the HF model (unpadded vocabulary)."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return emb + self.hidden_size + sum(sum(self.layer_params(m)) for m in self.moe_layers)

    def active_params(self) -> int:
        """Parameters used per token (MoE: K of E experts)."""
        if not self.num_experts:
            return self.total_params()
        routed = self.experts_per_token * 3 * self.hidden_size * self.expert_ffn_hidden
        return self.total_params() - sum(self.layer_params(True)[1] - routed for m in self.moe_layers if m)


def load_model_shape(model: ModelConfig) -> tuple[ModelShape, str]:
    """The shape from model.hf_dir/config.json when that file exists, else the inline fields."""
    if model.hf_dir:
        path = os.path.join(model.hf_dir, "config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
            hf = hf.get("text_config", hf)
            return ModelShape.from_hf(hf, path), path
    return ModelShape.from_hf(model.hf_config_dict(), "model (inline shape)"), "the inline model shape"


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int = 1
    cp: int = 1
    recompute: bool = False

    def __str__(self) -> str:
        return (f"tp={self.tp} pp={self.pp} ep={self.ep} cp={self.cp} "
                f"recompute={'on' if self.recompute else 'off'}")


def layout_errors(shape: ModelShape, layout: Layout, world: int) -> list[str]:
    """Why `layout` cannot run `shape` on `world` GPUs; each message names the constraint."""
    t, p, e, c = layout.tp, layout.pp, layout.ep, layout.cp
    errors = []
    if shape.num_heads % t:
        errors.append(f"parallel.tp={t} must divide the attention heads (num_attention_heads={shape.num_heads})")
    if shape.num_kv_heads % t and t % shape.num_kv_heads:
        errors.append(f"parallel.tp={t} and the KV heads (num_key_value_heads={shape.num_kv_heads}) must "
                      f"divide one another")
    if shape.ffn_hidden and any(not m for m in shape.moe_layers) and shape.ffn_hidden % t:
        errors.append(f"parallel.tp={t} must divide the MLP width (intermediate_size={shape.ffn_hidden})")
    if shape.num_experts and shape.expert_ffn_hidden % t:
        errors.append(f"parallel.tp={t} (= expert TP) must divide the expert MLP width "
                      f"(moe_intermediate_size={shape.expert_ffn_hidden})")
    if shape.num_layers % p:
        errors.append(f"parallel.pp={p} must divide the layers (num_hidden_layers={shape.num_layers})")
    if e > 1 and not shape.num_experts:
        errors.append(f"parallel.ep={e} needs a MoE model; this one is dense (set parallel.ep=1)")
    elif shape.num_experts and shape.num_experts % e:
        errors.append(f"parallel.ep={e} must divide the experts (num_experts={shape.num_experts})")
    if world % (t * p * c):
        errors.append(f"tp*pp*cp = {t}*{p}*{c} = {t * p * c} must divide the world size {world}")
    if e > 1 and world % (t * e * p):
        errors.append(f"tp*ep*pp = {t}*{e}*{p} = {t * e * p} (the expert grid, expert TP = tp) must divide "
                      f"the world size {world}")
    return errors


# --------------------------------------------------------------------------- memory


@dataclass
class StageMemory:
    """Bytes per GPU on one pipeline stage."""

    stage: int
    dense_params: int  # parameter count on this rank, replicated over DP
    expert_params: int
    params: float
    grads: float
    optimizer: float
    ref_params: float  # frozen reference model (only with algo.kl_coef > 0)
    activations: float  # with the layout's recompute setting
    activations_no_recompute: float
    activations_recompute: float

    @property
    def param_count(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def static(self) -> float:
        """Resident through rollout too: weights, grads, optimizer state."""
        return self.params + self.grads + self.optimizer + self.ref_params


def _bytes_per_param(cfg: DapoConfig) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes per parameter; 'auto' is bf16 on GPU."""
    if cfg.model.params_dtype == "fp32":
        return 4, 4, 8  # Adam m, v; the fp32 param is its own master
    return 2, 4, 12  # bf16/fp16 param, fp32 main grad, fp32 master + m + v


def _layer_activation_bytes(shape: ModelShape, t: int, sp: bool, moe: bool) -> tuple[float, float]:
    """(full, recompute-kept) activation bytes per token for one layer on one TP rank."""
    h, d = shape.hidden_size, shape.head_dim
    a_local = shape.num_heads / t
    k_local = max(shape.num_kv_heads / t, 1.0)  # k < t: each rank computes one KV head
    seq_split = t if sp else 1
    act = 8 * h / seq_split
    act += 2 * (a_local + 2 * k_local) * d + 2 * a_local * d + 4 * a_local
    if shape.qk_norm:
        act += 2 * (a_local + k_local) * d
    if moe:
        act += 4 * shape.num_experts / seq_split
        act += shape.experts_per_token * (2 * h + 6 * shape.expert_ffn_hidden / t)
    else:
        act += 6 * shape.ffn_hidden / t
    return act, 2 * h / seq_split


def stage_memory(cfg: DapoConfig, shape: ModelShape, layout: Layout, world: int, stage: int) -> StageMemory:
    t, p, e = layout.tp, layout.pp, layout.ep
    sp = cfg.parallel.sequence_parallel and t > 1
    per_stage = shape.num_layers // p
    layers = shape.moe_layers[stage * per_stage : (stage + 1) * per_stage]
    first, last = stage == 0, stage == p - 1

    dense = expert = 0
    for moe in layers:
        d_full, e_full = shape.layer_params(moe)
        norms = 2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_norm else 0)
        router = shape.hidden_size * shape.num_experts if moe else 0
        dense += (d_full - norms - router) // t + norms + router  # norms and router are replicated
        expert += e_full // e // t
    emb = shape.padded_vocab(t) * shape.hidden_size // t
    if first:
        dense += emb
    if last:
        dense += shape.hidden_size  # final norm
        if not shape.tied_embeddings or p > 1:
            dense += emb  # output layer, or the last stage's copy of tied embeddings

    pb, gb, ob = _bytes_per_param(cfg)
    if cfg.parallel.use_distributed_optimizer:
        optimizer = ob * dense / (world // (t * p)) + (ob * expert / (world // (t * e * p)) if expert else 0)
    else:
        optimizer = ob * (dense + expert)
    ref = 2 * (dense + expert) if cfg.algo.kl_coef > 0 else 0.0

    tokens = cfg.trainer.max_tokens_per_microbatch / layout.cp
    in_flight = p - stage
    full = kept = biggest = 0.0
    for moe in layers:
        layer_full, layer_kept = _layer_activation_bytes(shape, t, sp, moe)
        full += layer_full
        kept += layer_kept
        biggest = max(biggest, layer_full)
    no_rc = in_flight * full * tokens
    rc = in_flight * kept * tokens + biggest * tokens
    if last:
        logits = (2 + 4) * shape.padded_vocab(t) / t * tokens
        no_rc += logits
        rc += logits
    return StageMemory(stage, dense, expert, pb * (dense + expert), gb * (dense + expert), optimizer, ref,
                       rc if layout.recompute else no_rc, no_rc, rc)


@dataclass
class SglangShare:
    colocated: bool
    engine_tp: int
    num_engines: int
    reserved: float  # sglang_mem_fraction of the GPU
    weights: float  # per GPU
    kv_pool: float  # per GPU
    kv_bytes_per_token: float  # per GPU
    pool_tokens: int  # per engine (each of its GPUs holds 1/engine_tp of every token's KV)
    seq_len: int
    requested_seqs: int  # per engine
    kv_needed: float  # per GPU, for every requested sequence at full length at once

    @property
    def full_seqs_fit(self) -> int:
        return self.pool_tokens // self.seq_len


@dataclass
class WeightSync:
    model_bytes: float
    num_engines: int
    per_gpu_bytes: float
    buckets: int

    @property
    def total_bytes(self) -> float:
        return self.model_bytes * self.num_engines


def sglang_share(cfg: DapoConfig, shape: ModelShape, world: int, gpu_mem: float) -> SglangShare:
    r, a = cfg.rollout, cfg.algo
    etp = r.engine_tp
    engines = r.num_engines or max(world // etp, 1)
    reserved = r.sglang_mem_fraction * gpu_mem
    weights = 2 * shape.total_params() / etp
    kv_per_token = 2 * shape.num_layers * max(shape.num_kv_heads / etp, 1.0) * shape.head_dim * 2
    pool = max(reserved - weights, 0.0)
    seq_len = r.max_prompt_length + a.max_response_length
    requested = math.ceil(r.gen_batch_size * a.group_size / engines)
    return SglangShare(cfg.rollout.placement == "colocated", etp, engines, reserved, weights, pool, kv_per_token,
                       int(pool // kv_per_token), seq_len, requested, requested * seq_len * kv_per_token)


# --------------------------------------------------------------------------- the plan


@dataclass
class Suggestion:
    layout: Layout
    nodes: int
    train_peak: float
    rollout_peak: float


@dataclass
class PlanReport:
    config_name: str
    shape: ModelShape
    shape_source: str
    nodes: int
    gpus_per_node: int
    gpu_mem: float  # bytes
    overhead: float  # bytes
    layout: Layout
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    memory: Optional[StageMemory] = None  # the stage with the highest peak
    sglang: Optional[SglangShare] = None
    sync: Optional[WeightSync] = None
    train_peak: float = 0.0
    rollout_peak: float = 0.0
    fits: bool = False
    suggestion: Optional[Suggestion] = None

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.layout.tp * self.layout.pp * self.layout.cp)


def _evaluate(cfg: DapoConfig, shape: ModelShape, layout: Layout, nodes: int, gpus_per_node: int,
              gpu_mem: float, overhead: float) -> tuple[list[str], Optional[StageMemory], SglangShare, float, float, bool]:
    """(errors, fullest stage, SGLang share, training peak, rollout peak, fits) for one layout."""
    world = nodes * gpus_per_node
    errors = layout_errors(shape, layout, world)
    share = sglang_share(cfg, shape, world, gpu_mem)
    if errors:
        return errors, None, share, 0.0, 0.0, False
    dp = world // (layout.tp * layout.pp * layout.cp)
    if cfg.trainer.mini_batch_size * cfg.algo.group_size < dp:
        errors.append(f"a mini-batch of {cfg.trainer.mini_batch_size}x{cfg.algo.group_size} responses cannot "
                      f"feed dp={dp} data-parallel ranks (raise trainer.mini_batch_size or model parallelism)")
        return errors, None, share, 0.0, 0.0, False
    stages = [stage_memory(cfg, shape, layout, world, s) for s in range(layout.pp)]
    worst = max(stages, key=lambda m: max(m.static + m.activations, m.static + share.reserved))
    train_peak = max(m.static + m.activations for m in stages) + overhead
    rollout_peak = max(m.static for m in stages) + overhead + (share.reserved if share.colocated else 0.0)
    sglang_ok = share.pool_tokens >= share.seq_len
    fits = train_peak <= gpu_mem and rollout_peak <= gpu_mem and sglang_ok
    return errors, worst, share, train_peak, rollout_peak, fits


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def suggest_layout(cfg: DapoConfig, shape: ModelShape, current: Layout, nodes: int, gpus_per_node: int,
                   gpu_mem: float, overhead: float, max_nodes_factor: int = 64) -> Optional[Suggestion]:
    """The fitting layout nearest to `current` (TP kept within a node), searching this node count
    first, then twice as many nodes, and so on up to `max_nodes_factor` times as many."""
    tps = _divisors(gpus_per_node)
    pps = _divisors(shape.num_layers)
    eps = _divisors(shape.num_experts) if shape.num_experts else [1]
    recomputes = sorted({current.recompute, True})

    def distance(lay: Layout) -> tuple:
        steps = sum(abs(math.log2(new / old)) for new, old in
                    ((lay.tp, current.tp), (lay.pp, current.pp), (lay.ep, current.ep)))
        return (steps + (lay.recompute != current.recompute), lay.tp * lay.pp, lay.ep)

    n = nodes
    while n <= nodes * max_nodes_factor:
        found = []
        for t in tps:
            for p in pps:
                for e in eps:
                    for rc in recomputes:
                        lay = Layout(t, p, e, current.cp, rc)
                        _, _, _, tpk, rpk, fits = _evaluate(cfg, shape, lay, n, gpus_per_node, gpu_mem, overhead)
                        if fits:
                            found.append((distance(lay), lay, tpk, rpk))
        if found:
            _, lay, tpk, rpk = min(found, key=lambda x: (x[0], max(x[2], x[3])))
            return Suggestion(lay, n, tpk, rpk)
        n *= 2
    return None


def plan(cfg: DapoConfig, nodes: int, gpus_per_node: int, gpu_mem_gb: float = 80.0, *,
         overhead_gb: float = 5.0, suggest: bool = True) -> PlanReport:
    """Check cfg's layout on `nodes` x `gpus_per_node` GPUs of `gpu_mem_gb` GiB and estimate
    per-GPU memory (see the module docstring for every formula). Never raises for a layout that
    does not fit or does not divide: the report lists the errors and the nearest layout that fits."""
    if nodes < 1 or gpus_per_node < 1 or gpu_mem_gb <= 0:
        raise ConfigError(f"plan: nodes={nodes}, gpus_per_node={gpus_per_node} and gpu_mem_gb={gpu_mem_gb} "
                          f"must be positive")
    shape, source = load_model_shape(cfg.model)
    p = cfg.parallel
    layout = Layout(p.tp, p.pp, p.ep, p.cp, cfg.model.recompute_activations)
    gpu_mem, overhead = gpu_mem_gb * GIB, overhead_gb * GIB
    report = PlanReport(cfg.name, shape, source, nodes, gpus_per_node, gpu_mem, overhead, layout)
    world = report.world

    errors, worst, share, train_peak, rollout_peak, fits = _evaluate(
        cfg, shape, layout, nodes, gpus_per_node, gpu_mem, overhead)
    report.errors += errors
    report.memory, report.sglang = worst, share
    report.train_peak, report.rollout_peak, report.fits = train_peak, rollout_peak, fits

    r = cfg.rollout
    if shape.num_heads % r.engine_tp:
        report.errors.append(f"rollout.engine_tp={r.engine_tp} must divide the attention heads "
                             f"(num_attention_heads={shape.num_heads}) for SGLang")
        report.fits = False
    if r.placement == "colocated" and world % r.engine_tp:
        report.errors.append(f"rollout.engine_tp={r.engine_tp} must divide the world size {world} "
                             f"when engines are colocated")
        report.fits = False
    if share.pool_tokens < share.seq_len:
        report.errors.append(
            f"SGLang's share ({r.sglang_mem_fraction:.2f} of {gpu_mem_gb:g} GiB) holds the weights at "
            f"engine_tp={r.engine_tp} ({share.weights / GIB:.1f} GiB) but not the KV cache of one "
            f"{share.seq_len}-token sequence: raise rollout.engine_tp or rollout.sglang_mem_fraction")
    if layout.tp > gpus_per_node:
        report.warnings.append(f"tp={layout.tp} spans nodes (gpus_per_node={gpus_per_node}): TP traffic then "
                               f"crosses the network; keep tp <= gpus_per_node")
    if not p.sequence_parallel and layout.tp > 1:
        report.warnings.append("parallel.sequence_parallel is off: norm and residual activations are "
                               "replicated over TP (turn it on for GPU runs)")
    if share.requested_seqs > share.full_seqs_fit and share.pool_tokens >= share.seq_len:
        report.warnings.append(
            f"SGLang holds {share.full_seqs_fit} full-length sequences per engine at once; the "
            f"{share.requested_seqs} requested per round queue (fine when most responses are short)")
    report.sync = WeightSync(2.0 * shape.total_params(), share.num_engines, 2.0 * shape.total_params() / r.engine_tp,
                             math.ceil(2.0 * shape.total_params() / (r.weight_bucket_mb * 2**20)))
    if suggest and not report.fits:
        report.suggestion = suggest_layout(cfg, shape, layout, nodes, gpus_per_node, gpu_mem, overhead)
    return report


# --------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_report(report: PlanReport) -> str:
    """The plan as text for a terminal (see `dapo-megatron plan`)."""
    s, lay, out = report.shape, report.layout, []
    total = s.total_params()
    kind = (f"MoE, {s.num_experts} experts, {s.experts_per_token} active, {s.active_params() / 1e9:.1f} B active"
            if s.num_experts else "dense")
    out.append(f"plan for {report.config_name}: {s.architecture}, {total / 1e9:.2f} B parameters ({kind}); "
               f"shape from {report.shape_source}")
    out.append(f"cluster: {report.nodes} node{'s' if report.nodes != 1 else ''} x {report.gpus_per_node} GPUs "
               f"= {report.world} GPUs, "
               f"{report.gpu_mem / GIB:g} GiB each")
    out.append(f"layout: {lay}, dp={report.dp if not report.errors or report.memory else '-'}")
    for e in report.errors:
        out.append(f"  ERROR: {e}")
    for w in report.warnings:
        out.append(f"  warning: {w}")
    m = report.memory
    if m is not None:
        world = report.world
        dp_dense = world // (lay.tp * lay.pp)
        out.append(f"per GPU, pipeline stage {m.stage + 1} of {lay.pp} (the fullest):")
        out.append(f"  parameters   {_gib(m.params)}  {m.param_count:,} ({m.dense_params:,} dense, "
                   f"{m.expert_params:,} expert; vocab padded to {s.padded_vocab(lay.tp):,})")
        out.append(f"  gradients    {_gib(m.grads)}  fp32 main grads (Megatron DDP)")
        shard = f"dense over {dp_dense}" + (f", experts over {world // (lay.tp * lay.ep * lay.pp)}"
                                            if m.expert_params else "")
        out.append(f"  optimizer    {_gib(m.optimizer)}  fp32 master + Adam m, v, sharded {shard}")
        if m.ref_params:
            out.append(f"  reference    {_gib(m.ref_params)}  bf16 reference model (algo.kl_coef > 0)")
        out.append(f"  activations  {_gib(m.activations)}  recompute {'on' if lay.recompute else 'off'} "
                   f"(on: {m.activations_recompute / GIB:.2f}, off: {m.activations_no_recompute / GIB:.2f} GiB)")
        out.append(f"  overhead     {_gib(report.overhead)}  CUDA context, NCCL, fragmentation (estimate)")
        out.append(f"  training peak{_gib(report.train_peak)}  of {report.gpu_mem / GIB:g} GiB")
    sh = report.sglang
    if sh is not None:
        where = "colocated with training" if sh.colocated else "on its own GPUs"
        out.append(f"SGLang ({where}): engine_tp={sh.engine_tp}, {sh.num_engines} engines, "
                   f"{_gib(sh.reserved).strip()} per GPU")
        out.append(f"  weights {sh.weights / GIB:.2f} GiB + KV pool {sh.kv_pool / GIB:.2f} GiB per GPU = "
                   f"{sh.pool_tokens:,} tokens per engine = {sh.full_seqs_fit} sequences of {sh.seq_len:,} tokens")
        out.append(f"  requested {sh.requested_seqs:,} sequences per engine per round; KV for all at once: "
                   f"{sh.kv_needed / GIB:,.0f} GiB per GPU")
        if sh.colocated and m is not None:
            out.append(f"  rollout peak {report.rollout_peak / GIB:.2f} GiB (resident training state + SGLang + overhead)")
    if report.sync is not None:
        y = report.sync
        out.append(f"weight sync per step: {y.model_bytes / GIB:.1f} GiB of bf16 weights to each of {y.num_engines} "
                   f"engines ({y.per_gpu_bytes / GIB:.2f} GiB per GPU, {y.total_bytes / GIB:,.0f} GiB in all), "
                   f"{y.buckets} buckets of {y.model_bytes / y.buckets / 2**20:.0f} MiB or less")
    out.append("verdict: " + ("FITS" if report.fits else "DOES NOT FIT"))
    sg = report.suggestion
    if sg is not None:
        where = "on this cluster" if sg.nodes == report.nodes else f"needs {sg.nodes} nodes"
        out.append(f"nearest layout that fits ({where}): {sg.layout} (training peak {sg.train_peak / GIB:.1f}, "
                   f"rollout peak {sg.rollout_peak / GIB:.1f} GiB)")
        out.append(f"  overrides: parallel.tp={sg.layout.tp} parallel.pp={sg.layout.pp} parallel.ep={sg.layout.ep} "
                   f"model.recompute_activations={str(sg.layout.recompute).lower()}"
                   + (f" parallel.nodes={sg.nodes}" if sg.nodes != report.nodes else ""))
    elif not report.fits:
        out.append("no tp/pp/ep layout fits within 64x the nodes: lower trainer.max_tokens_per_microbatch or "
                   "rollout.sglang_mem_fraction, or raise rollout.engine_tp")
    return "\n".join(line for line in out if line)


__all__ = ["ModelShape", "Layout", "PlanReport", "StageMemory", "SglangShare", "WeightSync", "Suggestion",
           "load_model_shape", "layout_errors", "stage_memory", "sglang_share", "suggest_layout", "plan",
           "format_report"]
