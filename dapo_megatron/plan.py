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
  The last stage adds the log-prob pass (policy/logprobs.py streams the softmax in 16 MiB
  fp32 chunks, so the logits dominate): the bf16 vocab-parallel logits 2*V_pad/t per token,
  kept for the backward, plus their bf16 gradient there, 4*V_pad/t*T in all; above
  trainer.logits_chunk_mb (B) the log-probs run in sequence chunks with the output layer
  recomputed (policy/chunked_logits.py): one chunk's logits and gradient, 2*B, plus with
  sequence parallelism the hidden states gathered over TP, 2*h*T.
  T = trainer.max_tokens_per_microbatch / c: a packed micro-batch (the default,
  trainer.sequence_packing) is one row of at most that many tokens split over the c CP ranks
  (each sequence in 2c chunks, policy/context_parallel.py); a padded one holds n rows of
  the longest length L with n*L within the same budget, so the bound is the same.
SGLang share (colocated): --mem-fraction-static is a fraction of the memory *free when the
  server starts* (sglang 0.5.23 srt/mem_cache/kv_cache_configurator.py), so SGLang gets
  rollout.sglang_mem_fraction * (GPU - overhead - training state still resident) for its weights
  (2 B per parameter / engine_tp) and its KV pool; KV costs 2 (K and V) * L * max(k/engine_tp, 1)
  * d * 2 B per token per GPU (SGLang replicates KV heads when engine_tp > k). The requested
  concurrency is rollout.gen_batch_size * G sequences of max_prompt_length + max_response_length
  tokens spread over the engines (dapo_megatron.resolve lays them out); what does not fit in the
  pool waits in SGLang's queue.
Colocated timeline (as in verl and slime): SGLang's memory is released while Megatron trains.
  Megatron's weights, grads and optimizer stay resident through rollout unless trainer.offload
  moves them to host (then also before the engines start, so SGLang's fraction sees the memory).
  Two peaks must fit: training = static + activations + overhead; rollout = resident static +
  SGLang share + overhead.
  `overhead_gb` (default 5 GiB) covers the CUDA context, NCCL buffers and allocator fragmentation:
  an estimate, not a measurement.
Weight sync per step: every engine receives the whole model as bf16 HF tensors (2 B per parameter),
  in buckets of rollout.weight_bucket_mb.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

from dapo_megatron.config import ConfigError, DapoConfig
from dapo_megatron.convert.arch import ModelArgs
from dapo_megatron.resolve import engine_layout, layout_errors

GIB = 2**30


# --------------------------------------------------------------------------- model sizes
# The shape itself is the model builder's `ModelArgs`, read once by dapo_megatron.resolve.


def layer_params(args: ModelArgs, moe: bool) -> tuple[int, int]:
    """(dense, expert) parameters of one whole layer, no parallelism."""
    h, d, a, k = args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads
    dense = 2 * h + h * (a + 2 * k) * d + a * d * h
    dense += (a + 2 * k) * d if args.qkv_bias else 0
    dense += 2 * d if args.qk_norm else 0
    if moe:
        return dense + h * args.num_experts, args.num_experts * 3 * h * args.moe_ffn_hidden_size
    return dense + 3 * h * args.ffn_hidden_size, 0


def _moe_layers(args: ModelArgs) -> list[bool]:
    return [args.is_moe_layer(i) for i in range(args.num_layers)]


def total_params(args: ModelArgs) -> int:
    """Parameters of the HF model (unpadded vocabulary)."""
    emb = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    return emb + args.hidden_size + sum(sum(layer_params(args, m)) for m in _moe_layers(args))


def active_params(args: ModelArgs) -> int:
    """Parameters used per token (MoE: K of E experts)."""
    if not args.is_moe:
        return total_params(args)
    routed = args.moe_top_k * 3 * args.hidden_size * args.moe_ffn_hidden_size
    return total_params(args) - sum(layer_params(args, True)[1] - routed for m in _moe_layers(args) if m)


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


def _errors(cfg: DapoConfig, args: ModelArgs, layout: Layout, nodes: int, gpus_per_node: int) -> list[str]:
    """The one layout check (dapo_megatron.resolve.layout_errors) for a layout the planner tries."""
    errors = layout_errors(args, layout.tp, layout.pp, layout.ep, layout.cp, nodes * gpus_per_node, cfg.rollout)
    try:
        engine_layout(_on_cluster(cfg, nodes, gpus_per_node))
    except ConfigError as e:
        errors.append(str(e))
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
    logits: float = 0.0  # the log-prob pass's share of the activations (last stage)
    logits_chunked: bool = False  # log-probs in sequence chunks (trainer.logits_chunk_mb)
    tokens: float = 0.0  # per micro-batch on one GPU: trainer.max_tokens_per_microbatch / cp

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


def _layer_activation_bytes(args: ModelArgs, t: int, sp: bool, moe: bool) -> tuple[float, float]:
    """(full, recompute-kept) activation bytes per token for one layer on one TP rank."""
    h, d = args.hidden_size, args.head_dim
    a_local = args.num_heads / t
    k_local = max(args.num_kv_heads / t, 1.0)  # k < t: each rank computes one KV head
    seq_split = t if sp else 1
    act = 8 * h / seq_split
    act += 2 * (a_local + 2 * k_local) * d + 2 * a_local * d + 4 * a_local
    if args.qk_norm:
        act += 2 * (a_local + k_local) * d
    if moe:
        act += 4 * args.num_experts / seq_split
        act += args.moe_top_k * (2 * h + 6 * args.moe_ffn_hidden_size / t)
    else:
        act += 6 * args.ffn_hidden_size / t
    return act, 2 * h / seq_split


def logprob_bytes(cfg: DapoConfig, args: ModelArgs, t: int, tokens: float, sp: bool) -> tuple[float, bool]:
    """(bytes, chunked) of the log-prob pass over `tokens` tokens on one TP rank (module
    docstring): whole bf16 logits and their gradient, or one chunk's under the bound."""
    whole = 2 * args.padded_vocab_size(t) / t * tokens
    bound = cfg.trainer.logits_chunk_mb * 2**20
    if bound and whole > bound:
        return 2 * bound + (2 * args.hidden_size * tokens if sp else 0), True
    return 2 * whole, False


def stage_memory(cfg: DapoConfig, args: ModelArgs, layout: Layout, world: int, stage: int) -> StageMemory:
    t, p, e = layout.tp, layout.pp, layout.ep
    sp = cfg.parallel.sequence_parallel and t > 1
    per_stage = args.num_layers // p
    layers = _moe_layers(args)[stage * per_stage : (stage + 1) * per_stage]
    first, last = stage == 0, stage == p - 1

    dense = expert = 0
    for moe in layers:
        d_full, e_full = layer_params(args, moe)
        norms = 2 * args.hidden_size + (2 * args.head_dim if args.qk_norm else 0)
        router = args.hidden_size * args.num_experts if moe else 0
        dense += (d_full - norms - router) // t + norms + router  # norms and router are replicated
        expert += e_full // e // t
    emb = args.padded_vocab_size(t) * args.hidden_size // t
    if first:
        dense += emb
    if last:
        dense += args.hidden_size  # final norm
        if not args.tie_word_embeddings or p > 1:
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
        layer_full, layer_kept = _layer_activation_bytes(args, t, sp, moe)
        full += layer_full
        kept += layer_kept
        biggest = max(biggest, layer_full)
    no_rc = in_flight * full * tokens
    rc = in_flight * kept * tokens + biggest * tokens
    logits, chunked = logprob_bytes(cfg, args, t, tokens, sp) if last else (0.0, False)
    no_rc += logits
    rc += logits
    return StageMemory(stage, dense, expert, pb * (dense + expert), gb * (dense + expert), optimizer, ref,
                       rc if layout.recompute else no_rc, no_rc, rc, logits, chunked, tokens)


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


def sglang_share(cfg: DapoConfig, args: ModelArgs, world: int, gpu_mem: float, in_use: float = 0.0) -> SglangShare:
    """SGLang's memory per GPU. --mem-fraction-static is a fraction of the memory free when the
    server starts (sglang 0.5.23 srt/mem_cache/kv_cache_configurator.py), not of the GPU:
    `in_use` is what the GPU already holds then (colocated: the training state, unless
    trainer.offload moved it to host before the engines started, and the overhead)."""
    r, a = cfg.rollout, cfg.algo
    etp = r.engine_tp
    try:
        engines = len(engine_layout(_on_cluster(cfg, world // cfg.parallel.gpus_per_node, cfg.parallel.gpus_per_node)))
    except ConfigError:
        engines = 1  # the layout error is reported by _errors
    reserved = r.sglang_mem_fraction * max(gpu_mem - in_use, 0.0)
    weights = 2 * total_params(args) / etp
    kv_per_token = 2 * args.num_layers * max(args.num_kv_heads / etp, 1.0) * args.head_dim * 2
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
    args: ModelArgs
    args_source: str
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


def _evaluate(cfg: DapoConfig, args: ModelArgs, layout: Layout, nodes: int, gpus_per_node: int,
              gpu_mem: float, overhead: float) -> tuple[list[str], Optional[StageMemory], SglangShare, float, float, bool]:
    """(errors, fullest stage, SGLang share, training peak, rollout peak, fits) for one layout."""
    world = nodes * gpus_per_node
    errors = _errors(cfg, args, layout, nodes, gpus_per_node)
    if errors:
        return errors, None, sglang_share(cfg, args, world, gpu_mem, overhead), 0.0, 0.0, False
    dp = world // (layout.tp * layout.pp * layout.cp)
    if cfg.trainer.mini_batch_size * cfg.algo.group_size < dp:
        errors.append(f"a mini-batch of {cfg.trainer.mini_batch_size}x{cfg.algo.group_size} responses cannot "
                      f"feed dp={dp} data-parallel ranks (raise trainer.mini_batch_size or model parallelism)")
        return errors, None, sglang_share(cfg, args, world, gpu_mem, overhead), 0.0, 0.0, False
    stages = [stage_memory(cfg, args, layout, world, s) for s in range(layout.pp)]
    colocated = cfg.rollout.placement == "colocated"
    # What stays on the GPU outside training: the training state, unless offloaded to host.
    resident = 0.0 if cfg.trainer.offload else max(m.static for m in stages)
    share = sglang_share(cfg, args, world, gpu_mem, overhead + (resident if colocated else 0.0))
    worst = max(stages, key=lambda m: max(m.static + m.activations, m.static + share.reserved))
    train_peak = max(m.static + m.activations for m in stages) + overhead
    rollout_peak = resident + overhead + (share.reserved if colocated else 0.0)
    sglang_ok = share.pool_tokens >= share.seq_len
    fits = train_peak <= gpu_mem and rollout_peak <= gpu_mem and sglang_ok
    return errors, worst, share, train_peak, rollout_peak, fits


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def suggest_layout(cfg: DapoConfig, args: ModelArgs, current: Layout, nodes: int, gpus_per_node: int,
                   gpu_mem: float, overhead: float, max_nodes_factor: int = 64) -> Optional[Suggestion]:
    """The fitting layout nearest to `current` (TP kept within a node), searching this node count
    first, then twice as many nodes, and so on up to `max_nodes_factor` times as many.

    CP (1, 2, 4, 8; packed rows only, the trainer refuses cp > 1 on padded rows) is searched
    like TP, PP and EP: each doubling or halving is one step. At equal steps the layout that
    changes cp least wins: CP divides only the activations (and its attention has not yet
    run on a GPU here, README "Context parallelism"), where PP and TP also divide the weights."""
    tps = _divisors(gpus_per_node)
    pps = _divisors(args.num_layers)
    eps = _divisors(args.num_experts) if args.num_experts else [1]
    cps = sorted({current.cp, 1, 2, 4, 8}) if cfg.trainer.sequence_packing else [current.cp]
    recomputes = sorted({current.recompute, True})

    def distance(lay: Layout) -> tuple:
        steps = sum(abs(math.log2(new / old)) for new, old in
                    ((lay.tp, current.tp), (lay.pp, current.pp), (lay.ep, current.ep),
                     (lay.cp, current.cp)))
        return (steps + (lay.recompute != current.recompute), abs(math.log2(lay.cp / current.cp)),
                lay.tp * lay.pp, lay.ep)

    n = nodes
    while n <= nodes * max_nodes_factor:
        found = []
        for t, p, e, c, rc in itertools.product(tps, pps, eps, cps, recomputes):
            lay = Layout(t, p, e, c, rc)
            _, _, _, tpk, rpk, fits = _evaluate(cfg, args, lay, n, gpus_per_node, gpu_mem, overhead)
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
    cfg = _on_cluster(cfg, nodes, gpus_per_node)
    args, source = _shape(cfg)
    p = cfg.parallel
    layout = Layout(p.tp, p.pp, p.ep, p.cp, cfg.model.recompute_activations)
    gpu_mem, overhead = gpu_mem_gb * GIB, overhead_gb * GIB
    report = PlanReport(cfg.name, args, source, nodes, gpus_per_node, gpu_mem, overhead, layout)
    world = report.world

    errors, worst, share, train_peak, rollout_peak, fits = _evaluate(
        cfg, args, layout, nodes, gpus_per_node, gpu_mem, overhead)
    report.errors += errors
    report.memory, report.sglang = worst, share
    report.train_peak, report.rollout_peak, report.fits = train_peak, rollout_peak, fits

    r = cfg.rollout
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
    report.sync = WeightSync(2.0 * total_params(args), share.num_engines, 2.0 * total_params(args) / r.engine_tp,
                             math.ceil(2.0 * total_params(args) / (r.weight_bucket_mb * 2**20)))
    if suggest and not report.fits:
        report.suggestion = suggest_layout(cfg, args, layout, nodes, gpus_per_node, gpu_mem, overhead)
    return report


def _on_cluster(cfg: DapoConfig, nodes: int, gpus_per_node: int) -> DapoConfig:
    """cfg as it would run on `nodes` x `gpus_per_node` (what the trainer would then start)."""
    import copy

    out = copy.deepcopy(cfg)
    out.parallel.nodes, out.parallel.gpus_per_node = nodes, gpus_per_node
    return out


def _shape(cfg: DapoConfig) -> tuple[ModelArgs, str]:
    """The model's ModelArgs as resolve() reads them; the planner needs the vocab."""
    from dapo_megatron.convert.arch import model_args_from_hf
    from dapo_megatron.resolve import read_hf_config

    hf, source = read_hf_config(cfg)
    if not hf.get("vocab_size"):
        raise ConfigError(f"{source}: vocab_size is 0 (the tokenizer's size); set model.vocab_size for planning")
    try:
        return model_args_from_hf(hf), source
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


# --------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_report(report: PlanReport) -> str:
    """The plan as text for a terminal (see `dapo-megatron plan`)."""
    s, lay, out = report.args, report.layout, []
    total = total_params(s)
    kind = (f"MoE, {s.num_experts} experts, {s.moe_top_k} active, {active_params(s) / 1e9:.1f} B active"
            if s.num_experts else "dense")
    out.append(f"plan for {report.config_name}: {s.family}, {total / 1e9:.2f} B parameters ({kind}); "
               f"shape from {report.args_source}")
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
                   f"{m.expert_params:,} expert; vocab padded to {s.padded_vocab_size(lay.tp):,})")
        out.append(f"  gradients    {_gib(m.grads)}  fp32 main grads (Megatron DDP)")
        shard = f"dense over {dp_dense}" + (f", experts over {world // (lay.tp * lay.ep * lay.pp)}"
                                            if m.expert_params else "")
        out.append(f"  optimizer    {_gib(m.optimizer)}  fp32 master + Adam m, v, sharded {shard}")
        if m.ref_params:
            out.append(f"  reference    {_gib(m.ref_params)}  bf16 reference model (algo.kl_coef > 0)")
        out.append(f"  activations  {_gib(m.activations)}  recompute {'on' if lay.recompute else 'off'} "
                   f"(on: {m.activations_recompute / GIB:.2f}, off: {m.activations_no_recompute / GIB:.2f} GiB), "
                   f"{m.tokens:,.0f} tokens per micro-batch per GPU (cp={lay.cp})")
        if m.logits:
            out.append(f"    of which log-probs {m.logits / GIB:.2f} GiB ("
                       + ("in sequence chunks, trainer.logits_chunk_mb" if m.logits_chunked
                          else "whole logits and their gradient") + ")")
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
                   f"parallel.cp={sg.layout.cp} model.recompute_activations={str(sg.layout.recompute).lower()}"
                   + (f" parallel.nodes={sg.nodes}" if sg.nodes != report.nodes else ""))
    elif not report.fits:
        out.append("no tp/pp/ep/cp layout fits within 64x the nodes: lower trainer.max_tokens_per_microbatch or "
                   "rollout.sglang_mem_fraction, or raise rollout.engine_tp")
    return "\n".join(line for line in out if line)


__all__ = ["Layout", "PlanReport", "StageMemory", "SglangShare", "WeightSync", "Suggestion",
           "layer_params", "total_params", "active_params", "logprob_bytes", "stage_memory", "sglang_share", "suggest_layout", "plan",
           "format_report"]
