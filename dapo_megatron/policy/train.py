"""The Megatron policy trainer: log-probs, the DAPO update, checkpoints, offload.

``PolicyTrainer`` is what one training rank runs (a Ray actor or a torchrun process). Every
rank is given the same whole ``PolicyBatch``; the trainer picks its data-parallel share.

One ``train_step(batch)``:
  1. ``_prepare``, the one place that decides what the update compares against: pi_old
     recomputed by the current policy (forward only, for the rows after the first update's:
     that update runs on the same weights and takes its own log-probs; skipped when the
     engine's log-probs are pi_old and uncorrected, the first update's forward then giving
     the mismatch), the
     train/inference mismatch against the engine's log-probs (``mismatch/*``), pi_old replaced by the engine's when
     ``rollout.old_logprobs=engine``, the rollout correction's per-token weights folded into
     the advantages (``algo.rollout_correction``), and the frozen reference's log-probs
     when ``algo.kl_coef > 0`` (reference.py); for a MoE model the experts the update
     runs on (``algo.routing_replay``, routing_replay.py);
  2. the batch is cut into ``num_mini_batches`` mini-batches; each is split over DP ranks
     and into token-budget micro-batches (microbatch.py), run through megatron's
     ``get_forward_backward_func`` (1F1B under pipeline parallelism) with the loss of
     ``algo.loss`` from ``dapo_megatron.algo``, and applied by one optimizer update.

The loss normaliser is global: ``loss_scale_tokens`` is the mini-batch's response-token
count summed over its micro-batches and DP ranks (one all-reduce). Megatron then scales
each micro-batch loss by ``1 / num_microbatches`` (pipeline_parallel/schedules.py,
forward_step_calc_loss) and DDP averages gradients over DP ranks (gradient_scaling_factor
``1 / dp``, distributed/distributed_data_parallel.py); the loss handed to megatron is
multiplied by ``num_microbatches * dp`` to undo both, so the reduced gradient is exactly
the gradient of the global token-mean loss, however the batch is split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from functools import partial

import torch
import torch.distributed as dist

from dapo_megatron import dtypes
from dapo_megatron.algo import (
    POLICY_METRIC_REDUCTIONS,
    aggregate_loss,
    correction_weights,
    finish_metrics,
    loss_scale_counts,
    masked_mean,
    metric_partials,
    mismatch_metrics,
    policy_loss,
    resolve_agg,
)
from dapo_megatron.policy.logprobs import broadcast_from_last_pipeline_stage
from dapo_megatron.policy.microbatch import (
    MicroBatch,
    PolicyBatch,
    collate,
    plan_microbatches,
    split_mini_batches,
)
from dapo_megatron.policy.optimizer import build_optimizer, optimizer_step
from dapo_megatron.policy.packing import micro_logprobs, packed_width

logger = logging.getLogger(__name__)

__all__ = ["PolicyBatch", "PolicyTrainer"]

# Metrics of the trainer itself, reduced like POLICY_METRIC_REDUCTIONS' entries:
# entropy and log-prob of the response tokens under the policy being updated.
_EXTRA_REDUCTIONS = {"entropy": "token_mean", "logprob_mean": "token_mean"}
_REDUCTIONS = {**POLICY_METRIC_REDUCTIONS, **_EXTRA_REDUCTIONS}


def _ps():
    from megatron.core import parallel_state

    return parallel_state


class PolicyTrainer:
    """A Megatron GPT policy on this rank, with its optimizer and schedule.

    Args:
        hf_config: HF-style model config (dict or transformers config) for ``build_model``.
        parallel: ``dapo_megatron.config.ParallelConfig`` (tp, pp, ep, cp,
            use_distributed_optimizer, sequence_parallel).
        optim: ``OptimizerConfig`` (lr, warmup_steps in rollout steps, decay, wd, clip).
        algo: ``AlgoConfig`` (eps_low/high, clip_ratio_c, loss_agg, kl_coef, kl_estimator,
            entropy_coef).
        trainer: ``TrainerConfig`` (max_tokens_per_microbatch, train/mini batch sizes,
            max_steps, seed).
        rollout: ``RolloutConfig`` or None (temperature, old_logprobs "policy"/"engine").
        rank, world_size, master_addr, master_port, store_hosted: for ``init_parallel`` inside
            Ray actors (None: torchrun's environment, or an already initialised process group).
        hf_state_dict: HF-named full tensors (or a lazy reader) to initialise the weights.
        params_dtype: None: bf16 on GPU, fp32 on CPU.
        fixed_micro_batch_size: instead of the token budget, this many rows per micro-batch
            in batch order (naive padded batching: the benchmark's baseline).
        model_overrides: extra keyword arguments for ``build_model`` (e.g. fp8, recompute).
    """

    def __init__(self, hf_config, *, parallel, optim, algo, trainer, rollout=None,
                 rank=None, world_size=None, master_addr=None, master_port=None, store_hosted=False,
                 hf_state_dict=None, params_dtype=None, fixed_micro_batch_size=None,
                 **model_overrides):
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.utils import get_model_config

        from dapo_megatron.policy.model import build_model
        from dapo_megatron.policy.parallel import init_parallel

        # Packed rows by default (packing.py); padded rows with trainer.sequence_packing=false.
        self.sequence_packing = trainer.sequence_packing
        if parallel.cp > 1 and not self.sequence_packing:
            raise ValueError(f"parallel.cp={parallel.cp} splits packed rows: set "
                             "trainer.sequence_packing=true (or use cp=1)")
        self.cp_size = parallel.cp
        self.algo, self.trainer_cfg = algo, trainer
        self.loss_agg = resolve_agg(algo.loss, algo.loss_agg)
        # Dr. GRPO's constant normaliser is the generation budget L_max.
        self.norm_len = (algo.max_response_length if self.loss_agg == "seq-mean-token-sum-norm"
                         else None)
        self.fixed_micro_batch_size = fixed_micro_batch_size
        self.temperature = float(getattr(rollout, "temperature", 1.0) or 1.0)
        self.old_logprobs_source = getattr(rollout, "old_logprobs", "policy")
        self.layout = init_parallel(parallel.tp, parallel.pp, parallel.ep, parallel.cp,
                                    rank=rank, world_size=world_size, master_addr=master_addr,
                                    master_port=master_port, store_hosted=store_hosted, seed=trainer.seed,
                                    device=getattr(trainer, "device", "auto"))
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else \
            torch.device("cpu")
        self.params_dtype = _resolve_dtype(params_dtype, self.on_gpu)
        # Gradients reduce in fp32, or in fp64 for fp64 params (the optimizer assigns the
        # buffer to param.grad, which must have the parameter's dtype).
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=self.params_dtype != torch.float64, overlap_grad_reduce=False,
            average_in_collective=False, use_distributed_optimizer=parallel.use_distributed_optimizer)
        overrides = dict(model_overrides)
        overrides.setdefault("sequence_parallel", parallel.sequence_parallel and self.on_gpu)
        is_moe = bool(_model_args(hf_config).is_moe)
        # Micro-batches differ in shape. Pipeline p2p then has to exchange shapes first
        # (variable_seq_lengths), which TransformerConfig refuses with the allgather MoE
        # dispatcher (transformer_config.py, __post_init__), the default type even for dense
        # models. Dense models name alltoall (unused without experts); MoE on CPU must keep
        # allgather (alltoall needs CUDA streams) and runs every micro-batch at one shape.
        self.uniform_shapes = is_moe and not self.on_gpu
        if parallel.pp > 1 and not self.uniform_shapes:
            overrides.setdefault("variable_seq_lengths", True)
            if not is_moe:
                overrides.setdefault("moe_token_dispatcher_type", "alltoall")
        # deallocate_pipeline_outputs frees sent activations under PP (megatron-LM's default)
        # and makes the schedules call the C++ autograd engine directly (schedules.py,
        # custom_backward). On CPU that matters: torch.autograd.backward() would be routed
        # through the CPU layer's TorchFunctionMode, which is inactive while its handler runs,
        # so factory calls with device=cuda inside backward (the MoE allgather dispatcher's
        # tensor_parallel/mappings.py, _gather_along_first_dim) would escape the redirect.
        overrides.setdefault("deallocate_pipeline_outputs", True)
        self.routing = _routing_replay(hf_config, algo, overrides)
        self.model = build_model(hf_config, params_dtype=self.params_dtype, wrap_ddp=ddp_config,
                                 pipeline_dtype=self.params_dtype, **overrides)
        if hf_state_dict is not None:
            from dapo_megatron.convert import load_hf_state_dict

            load_hf_state_dict(self.model, hf_state_dict)
            for chunk in self.model:  # start every DP replica from the same weights
                chunk.broadcast_params()
        self.reference = None
        if algo.kl_coef > 0:
            from dapo_megatron.policy.reference import ReferencePolicy

            self.reference = ReferencePolicy(
                build_model(hf_config, params_dtype=self.params_dtype, wrap_ddp=False,
                            pipeline_dtype=self.params_dtype, **overrides),
                offload=algo.reference_offload)
            self.reference.copy_from(self.model)
        self._defer_output_layers(self.model)
        if self.reference is not None:
            self._defer_output_layers(self.reference.model)
        self.vocab_size = self.model[0].model_args.vocab_size
        self.model_config = get_model_config(self.model[0])
        num_mini = max(1, trainer.num_mini_batches)
        self.num_mini_batches = num_mini
        self.optimizer, self.scheduler = build_optimizer(
            self.model, optim, total_updates=max(1, trainer.max_steps) * num_mini,
            warmup_updates=optim.warmup_steps * num_mini,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
            params_dtype=self.params_dtype)
        cfg = self.model_config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = self.optimizer.scale_loss
        cfg.no_sync_func = self.model[0].no_sync if len(self.model) == 1 else \
            [m.no_sync for m in self.model]
        self.pad_multiple = parallel.tp if cfg.sequence_parallel else 1
        if overrides.get("fp8"):
            self.pad_multiple = self.pad_multiple * 16  # TE fp8 GEMMs want dims % 16 == 0
        # CP: every sequence in 2 * cp equal chunks, each rank's share a multiple of the above.
        self.seq_align = 2 * parallel.cp if parallel.cp > 1 else 1
        self.row_align = self.pad_multiple * parallel.cp
        self.step = 0  # completed train_step calls (rollout steps)
        self._lr_override: float | None = None

    def _defer_output_layers(self, chunks) -> None:
        """Log-probs in sequence chunks above trainer.logits_chunk_mb (chunked_logits.py)."""
        from dapo_megatron.policy.chunked_logits import defer_output_layer
        from dapo_megatron.policy.model import unwrap

        bound = self.trainer_cfg.logits_chunk_mb * 2**20
        for chunk in chunks:
            defer_output_layer(unwrap(chunk), bound)

    @classmethod
    def from_config(cls, cfg, hf_config, *, rank=None, world_size=None, master_addr=None,
                    master_port=None, store_hosted=False) -> PolicyTrainer:
        """Build from the run's ``DapoConfig`` and initialise the weights, layout-independently:

        1. ``cfg.model.load``: a converted Megatron checkpoint (model weights only);
        2. else ``cfg.model.hf_dir`` holding ``*.safetensors``: the HF weights;
        3. else (from scratch): an HF model built by transformers from ``hf_config`` after
           ``torch.manual_seed(cfg.trainer.seed)``, so every layout starts identical.
        """
        m = cfg.model
        overrides = {}
        if m.fp8:
            overrides.update(fp8=m.fp8, fp8_recipe=m.fp8_recipe)
        if m.recompute_activations:
            overrides["recompute"] = True
        hf_state = None
        if not m.load:
            hf_state = _initial_hf_weights(m.hf_dir, hf_config, cfg.trainer.seed)
        trainer = cls(hf_config, parallel=cfg.parallel, optim=cfg.optimizer, algo=cfg.algo,
                      trainer=cfg.trainer, rollout=cfg.rollout, rank=rank, world_size=world_size,
                      master_addr=master_addr, master_port=master_port, store_hosted=store_hosted,
                      hf_state_dict=hf_state,
                      params_dtype=m.params_dtype, **overrides)
        if m.load:
            from dapo_megatron.policy.checkpoint import load_checkpoint

            load_checkpoint(m.load, trainer.model)
            if trainer.reference is not None:
                trainer.reference.copy_from(trainer.model)
        return trainer

    @contextlib.contextmanager
    def temporary_lr(self, lr: float):
        """Run updates at a constant ``lr`` (e.g. a warm start); the schedule is untouched
        and resumes where it was afterwards."""
        previous, self._lr_override = self._lr_override, float(lr)
        try:
            yield self
        finally:
            self._lr_override = previous
            self.scheduler.step(increment=0)  # put the schedule's lr back

    # ----- data layout -------------------------------------------------------------------

    @property
    def dp_rank(self) -> int:
        return _ps().get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return _ps().get_data_parallel_world_size()

    def _enter(self) -> None:
        """Per-call setup: the CPU layer's device redirect is per thread, and a Ray actor
        may call from another thread than the one that built the trainer."""
        if not self.on_gpu:
            from dapo_megatron.policy.compat import enable_cpu_execution

            enable_cpu_execution()

    def _micro_batches(self, batch: PolicyBatch):
        """This DP rank's micro-batches of ``batch`` and the plan they come from."""
        packed = self.sequence_packing and not self.fixed_micro_batch_size
        align = dict(packed=True, seq_align=self.seq_align) if packed else {}
        if self.fixed_micro_batch_size:
            plan = plan_microbatches(batch.seq_lens, self.dp_size,
                                     micro_batch_size=self.fixed_micro_batch_size)
        else:
            plan = plan_microbatches(batch.seq_lens, self.dp_size,
                                     self.trainer_cfg.max_tokens_per_microbatch,
                                     row_align=self.row_align, **align)
        shape = {}
        if self.uniform_shapes and packed:
            lens = batch.seq_lens.tolist()
            shape = dict(min_width=max(packed_width([lens[i] for i in m], self.seq_align,
                                                    self.row_align)
                                       for per in plan.per_rank for m in per))
        elif self.uniform_shapes:
            shape = dict(min_rows=max(len(m) for per in plan.per_rank for m in per),
                         min_width=int(batch.seq_lens.max()))
        micro = [collate(batch, rows, self.row_align if packed else self.pad_multiple,
                         **shape, **align)
                 for rows in plan.per_rank[self.dp_rank]]
        return micro, plan

    def _run(self, micro: list[MicroBatch], loss_func, forward_only: bool, model=None):
        """Megatron forward(/backward) of ``model`` (default: the policy) over this rank's
        micro-batches; returns what the last pipeline stage's ``loss_func`` reported (empty
        elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from dapo_megatron.policy.packing import model_inputs
        from dapo_megatron.policy.routing_replay import pack_routes

        device = self.device

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids, positions, mask, packed_seq_params = model_inputs(mb, model, device)
            if self.routing is not None:
                self.routing.before_forward(model, pack_routes(mb.routed_experts, mb.packed))
            output = model(ids, positions, mask, packed_seq_params=packed_seq_params)
            if self.routing is not None:
                self.routing.after_forward(model, mb.rows, mb.seq_lens, mb.forward_shape[1], layout=mb.packed)
            return output, partial(loss_func, mb)

        max_rows = max(mb.forward_shape[0] for mb in micro)
        max_len = max(mb.forward_shape[1] for mb in micro) // self.cp_size
        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro), model=model or self.model,
                num_microbatches=len(micro), seq_length=max_len, micro_batch_size=max_rows,
                forward_only=forward_only)
        finally:
            if self.routing is not None:
                self.routing.end_pass(model or self.model)

    # ----- log-probs ---------------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(self, batch: PolicyBatch, *, with_entropy: bool = False, model=None):
        """Log-probs (and entropy) of every token of ``batch`` under the current weights
        (or under ``model``, chunks of the same layout, e.g. the frozen reference). A MoE
        model routes ``batch.routed_experts`` where given (routing_replay.py).

        Returns:
            ``logprobs``, or ``(logprobs, entropy)`` with ``with_entropy``: fp32 CPU
            ``[batch, seq]`` on every rank, aligned with ``batch.input_ids`` (column t scores
            token t given tokens < t; column 0 and padding are 0).
        """
        self._enter()
        micro, _ = self._micro_batches(batch)

        def loss_func(mb, logits):
            lp, ent = micro_logprobs(mb, logits, vocab_size=self.vocab_size,
                                     temperature=self.temperature)
            return logits.new_zeros(()), {"rows": mb.rows, "lp": lp, "ent": ent}

        records = self._run(micro, loss_func, forward_only=True, model=model)
        lp, ent = self._assemble(records, batch)
        return (lp, ent) if with_entropy else lp

    def _assemble(self, records: list[dict], batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``lp`` / ``ent`` of micro-batch records (last pipeline stage, this DP rank's
        rows) -> fp32 CPU ``[batch, seq]`` log-probs and entropy on every rank. Collective."""
        shape = tuple(batch.input_ids.shape)
        out = torch.zeros((2,) + shape, dtype=torch.float32, device=self.device)
        for record in records:
            if not record["rows"]:
                continue
            rows = torch.as_tensor(record["rows"], device=self.device)
            n, width = len(rows), record["lp"].shape[1]  # filler rows come after the real
            width = min(width, shape[1])
            out[0, rows, :width] = record["lp"][:n, :width].float()
            if record.get("ent") is not None:
                out[1, rows, :width] = record["ent"][:n, :width].float()
        ps = _ps()
        if ps.is_pipeline_last_stage() and self.dp_size > 1:
            dist.all_reduce(out, group=ps.get_data_parallel_group())  # rows are disjoint
        out = broadcast_from_last_pipeline_stage(out, out.shape, device=self.device)
        valid = torch.arange(shape[1])[None, :] < batch.seq_lens[:, None]
        out = out.cpu() * valid
        return out[0], out[1]

    # ----- training ----------------------------------------------------------------------

    def _global_counts(self, micro: list[MicroBatch]) -> tuple[float, float]:
        """Response tokens and scored sequences of this mini-batch over all DP ranks."""
        local = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in micro:
            tokens, seqs = loss_scale_counts(mb.response_mask)
            local[0] += float(tokens)
            local[1] += float(seqs)
        if self.dp_size > 1:
            dist.all_reduce(local, group=_ps().get_data_parallel_group())
        return float(local[0]), float(local[1])

    def _loss_func(self, scale_tokens, scale_seqs, grad_multiplier, capture, own_old,
                   mb: MicroBatch, logits):
        algo = self.algo
        lp, ent = micro_logprobs(mb, logits, vocab_size=self.vocab_size,
                                 temperature=self.temperature, with_entropy=True)
        mask = mb.response_mask.to(logits.device)
        # ``own_old``: this update runs on the weights pi_old was to be computed with, so its
        # own log-probs are pi_old (the ratio is exactly 1).
        old = lp.detach() if own_old else mb.old_logprobs.to(logits.device)
        ref = None if mb.ref_logprobs is None else mb.ref_logprobs.to(logits.device)
        scales = dict(loss_scale_tokens=scale_tokens, loss_scale_seqs=scale_seqs,
                      norm_len=self.norm_len)
        eps_low, eps_high = ((algo.gspo_eps_low, algo.gspo_eps_high) if algo.loss == "gspo"
                             else (algo.eps_low, algo.eps_high))
        loss, metrics = policy_loss(
            lp, old, mb.advantages.to(logits.device), mask,
            eps_low=eps_low, eps_high=eps_high, agg=self.loss_agg,
            clip_ratio_c=algo.clip_ratio_c, ref_logprobs=ref, kl_coef=algo.kl_coef,
            kl_kind=algo.kl_estimator, loss_type=algo.loss, **scales)
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * aggregate_loss(ent, mask, self.loss_agg, **scales)
        with torch.no_grad():
            count = mask.sum().clamp(min=1)
            metrics["entropy"] = (ent * mask).sum() / count
            metrics["logprob_mean"] = (lp.detach() * mask).sum() / count
            if capture:  # popped before the reduction (_train_mini_batch)
                metrics["_capture"] = {"rows": mb.rows, "lp": lp.detach()}
        return loss * grad_multiplier, metrics

    def _train_mini_batch(self, batch: PolicyBatch, capture: bool = False, own_old: bool = False):
        """One optimizer update on ``batch``. Returns the reduced metrics, the optimizer's
        result, the layout, and with ``capture`` the ``[batch, seq]`` log-probs of the
        update's own forward (the weights before the update), else None. With ``own_old``
        those log-probs are also pi_old (``batch.old_logprobs`` is not read)."""
        micro, plan = self._micro_batches(batch)
        scale_tokens, scale_seqs = self._global_counts(micro)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        # Under CP the schedule multiplies the loss by cp (schedules.py,
        # forward_step_calc_loss) and DDP divides by dp * cp: the two cancel.
        loss_func = partial(self._loss_func, max(scale_tokens, 1.0), max(scale_seqs, 1.0),
                            float(len(micro) * self.dp_size), capture, own_old)
        records = self._run(micro, loss_func, forward_only=False)
        captured = [r.pop("_capture") for r in records if "_capture" in r]
        pre_update = self._assemble(captured, batch)[0] if capture else None
        result = optimizer_step(self.optimizer, self.scheduler, lr_override=self._lr_override)
        layout = {"real_tokens": sum(plan.real_tokens), "padded_tokens": sum(plan.padded_tokens),
                  "num_microbatches": plan.num_microbatches}
        return _reduce_metrics(records, self.device), result, layout, pre_update

    def _prepare(self, batch: PolicyBatch, first: slice | None = None
                 ) -> tuple[PolicyBatch, dict[str, float], str | None]:
        """What the update compares against, decided here only.

        pi_old: ``batch.old_logprobs`` if given, else recomputed by the policy. With the
        engine's log-probs present, the mismatch is measured against that pi_old
        (``mismatch/*``); then ``rollout.old_logprobs=engine`` swaps pi_old for the engine's,
        and ``algo.rollout_correction`` multiplies each token's advantage by its correction
        weight (``correction/*``). The reference's log-probs are added when the KL term is on.

        The first update's forward runs on the weights the old-log-prob pass would, so when
        nothing needs the policy's pi_old before it (no correction, no routing pass), part of
        the pass is left to that forward:
        - the engine's log-probs are pi_old: the pass is skipped, and ``train_step`` measures
          the mismatch on the first update's rows (returns "mismatch");
        - the policy's: with ``first`` (the first update's rows), the pass covers only the
          other rows; the first update takes its own log-probs as pi_old (the ratio is
          exactly 1, as on-policy PPO's first update has it), and ``train_step`` fills them
          in and measures the mismatch on every row after that update (returns "pi_old").
        Returns the batch to train on, the metrics of these steps, and what is left to the
        first update (None: nothing).
        """
        algo, metrics = self.algo, {}
        old, engine, mask = batch.old_logprobs, batch.engine_logprobs, batch.response_mask
        routes = None  # the experts the training passes replay (routing_replay.py)
        if self.routing is not None and (algo.routing_replay != "none"
                                         or batch.routed_experts is not None):
            t0 = time.perf_counter()
            computed, routes, routing_metrics = self._old_logprob_pass(batch)
            metrics.update(routing_metrics)
            if old is None:
                old = computed
                metrics["time/old_logprobs"] = time.perf_counter() - t0
        elif old is None and engine is not None and self.old_logprobs_source == "engine" \
                and algo.rollout_correction == "none":
            prepared = PolicyBatch(batch.input_ids, batch.seq_lens, mask, batch.advantages,
                                   old_logprobs=engine, engine_logprobs=engine,
                                   ref_logprobs=batch.ref_logprobs)
            return self._add_reference(prepared, metrics), metrics, "mismatch"
        elif old is None and algo.rollout_correction == "none" and first is not None:
            t0 = time.perf_counter()
            old = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
            later = torch.ones(batch.size, dtype=torch.bool)
            later[first] = False
            if later.any():
                rows = later.nonzero().squeeze(1)
                old[rows] = self.compute_logprobs(batch.select(rows.tolist()))
            metrics["time/old_logprobs"] = time.perf_counter() - t0
            prepared = PolicyBatch(batch.input_ids, batch.seq_lens, mask, batch.advantages,
                                   old_logprobs=old, engine_logprobs=engine,
                                   ref_logprobs=batch.ref_logprobs)
            return self._add_reference(prepared, metrics), metrics, "pi_old"
        elif old is None:
            t0 = time.perf_counter()
            old = self.compute_logprobs(batch)
            metrics["time/old_logprobs"] = time.perf_counter() - t0
        advantages = batch.advantages
        if engine is not None:
            band = dict(high=algo.correction_high, low=algo.correction_low)
            metrics.update({f"mismatch/{k}": v for k, v in
                            mismatch_metrics(old, engine, mask, **band).items()})
            if self.old_logprobs_source == "engine":
                old = engine
            if algo.rollout_correction != "none":
                weights = correction_weights(old, engine, mask, algo.rollout_correction, **band)
                per_token = advantages if advantages.dim() == 2 else advantages[:, None]
                # Every loss is linear in A at a fixed ratio: w * A weights the whole term.
                advantages = per_token * weights
                metrics["correction/weight_mean"] = float(masked_mean(weights, mask))
                metrics["correction/masked_frac"] = float(masked_mean((weights == 0).float(), mask))
        prepared = PolicyBatch(batch.input_ids, batch.seq_lens, mask, advantages,
                               old_logprobs=old, engine_logprobs=engine,
                               ref_logprobs=batch.ref_logprobs, routed_experts=routes)
        return self._add_reference(prepared, metrics), metrics, None

    def _add_reference(self, prepared: PolicyBatch, metrics: dict) -> PolicyBatch:
        """The frozen reference's log-probs, when the KL term is on and they are not given."""
        if prepared.ref_logprobs is None and self.reference is not None:
            t0 = time.perf_counter()
            with self.reference.onloaded() as model:  # on the experts the update uses
                prepared.ref_logprobs = self.compute_logprobs(prepared, model=model)
            metrics["time/ref_logprobs"] = time.perf_counter() - t0
        return prepared

    def _old_logprob_pass(self, batch: PolicyBatch):
        """The old-log-prob pass of a MoE model under ``algo.routing_replay``: r3 replays the
        engine's routing, none and r2 route freely; the routers' own choices are recorded
        and held against the engine's (``routing/*``). Returns (log-probs, the routes the
        training passes replay or None, metrics)."""
        from dapo_megatron.policy.routing_replay import ROUTE_DTYPE, routing_mismatch

        mode, engine_routes = self.algo.routing_replay, batch.routed_experts
        if mode == "r3" and engine_routes is None:
            raise ValueError("algo.routing_replay=r3 needs the engine's routed experts in the batch "
                             "(PolicyBatch.routed_experts; SamplingParams.return_routed_experts)")
        pass_batch = batch if mode == "r3" else dataclasses.replace(batch, routed_experts=None)
        with self.routing.recording(*batch.input_ids.shape) as recording:
            old = self.compute_logprobs(pass_batch)
        chosen = recording.gather(self.model_config.sequence_parallel)
        metrics = {}
        if engine_routes is not None:
            metrics = routing_mismatch(engine_routes, chosen, batch.response_mask,
                                       group=_ps().get_pipeline_model_parallel_group())
        routes = {"r3": engine_routes, "r2": chosen.to(ROUTE_DTYPE)}.get(mode)
        return old, routes, metrics

    def train_step(self, batch: PolicyBatch, single_update: bool = False) -> dict[str, float]:
        """One rollout step: ``_prepare`` (pi_old, mismatch, correction, reference), then
        ``num_mini_batches`` optimizer updates (one with ``single_update``).

        ``batch`` is the whole rollout batch (the same on every rank); see ``PolicyBatch``
        for shapes. Returns plain floats, identical on every rank: ``actor/*``, the loss
        terms, clip fractions, approx_kl (pi_old vs pi_theta), kl_loss (against the
        reference, when on), entropy and logprob_mean of the response tokens (means over
        the updates); grad_norm (mean of finite norms), grad_norm_max, lr (of the last
        update), skipped_steps (non-finite gradient norm), tokens, padded_tokens,
        padding_waste, microbatches (per DP rank, max), seconds, tokens_per_s; and from
        ``_prepare`` ``mismatch/*`` and ``correction/*`` (with engine log-probs; with
        the engine's as pi_old, ``mismatch/*`` covers the first update's tokens),
        ``routing/*`` (with the engine's routed experts) and ``time/old_logprobs``,
        ``time/ref_logprobs``.
        """
        self._enter()
        start = time.perf_counter()
        num_updates = 1 if single_update else min(self.num_mini_batches, max(1, batch.size))
        updates = split_mini_batches(batch.size, num_updates)
        batch, prepare_metrics, deferred = self._prepare(batch, first=updates[0])
        metrics: dict[str, float] = {}
        per_update, results, real, padded, n_micro = [], [], 0, 0, 0
        for k, rows in enumerate(updates):
            mini = batch.select(rows)
            capture = deferred is not None and k == 0
            reduced, result, layout, pre_update = self._train_mini_batch(
                mini, capture=capture, own_old=capture and deferred == "pi_old")
            if capture:
                if deferred == "pi_old":
                    batch.old_logprobs[rows] = pre_update
                    measured = batch  # every row's pi_old is known now
                else:
                    measured = dataclasses.replace(mini, old_logprobs=pre_update)
                if measured.engine_logprobs is not None:
                    band = dict(high=self.algo.correction_high, low=self.algo.correction_low)
                    prepare_metrics.update({f"mismatch/{name}": v for name, v in mismatch_metrics(
                        measured.old_logprobs, measured.engine_logprobs, measured.response_mask,
                        **band).items()})
            per_update.append(reduced)
            results.append(result)
            real += layout["real_tokens"]
            padded += layout["padded_tokens"]
            n_micro = max(n_micro, layout["num_microbatches"])
        self.step += 1
        for name in per_update[0]:  # a step reports the mean of its updates (max: the max)
            values = [m[name] for m in per_update]
            metrics[name] = max(values) if _REDUCTIONS[name] == "max" else sum(values) / len(values)
        norms = [r.grad_norm for r in results]
        finite = [g for g in norms if torch.isfinite(torch.tensor(g))]
        seconds = time.perf_counter() - start
        metrics.update(
            grad_norm=sum(finite) / len(finite) if finite else float("nan"),
            grad_norm_max=max(finite) if finite else float("nan"),
            lr=results[-1].lr, skipped_steps=float(sum(r.skipped for r in results)),
            updates=float(len(results)), tokens=float(real), padded_tokens=float(padded),
            padding_waste=1.0 - real / padded if padded else 0.0,
            microbatches=float(n_micro), seconds=seconds, tokens_per_s=real / seconds,
            step=float(self.step))
        return {**{f"actor/{k}": float(v) for k, v in metrics.items()}, **prepare_metrics}

    # ----- checkpoints, weights, memory --------------------------------------------------

    def save(self, path: str, extra_state: dict | None = None) -> str:
        """Collectively write model, optimizer, scheduler, step, RNG and ``extra_state``
        (e.g. the data position) into the directory ``path`` (created if missing, must be
        empty; the caller publishes it atomically: controller/checkpoint.py)."""
        from dapo_megatron.policy.checkpoint import write_checkpoint

        self._enter()
        return write_checkpoint(path, self.step, self.model, self.optimizer, self.scheduler,
                                extra_state=extra_state)

    def load(self, path: str, *, load_optimizer: bool = True) -> dict:
        """Restore a checkpoint written by ``save`` under any TP/PP/DP layout (or the newest
        under a root of ``step_*`` checkpoints); returns its ``extra_state``.
        ``load_optimizer=False`` loads the weights only (e.g. a converted HF checkpoint)."""
        from dapo_megatron.policy.checkpoint import load_checkpoint

        self._enter()
        state = load_checkpoint(path, self.model,
                                self.optimizer if load_optimizer else None,
                                self.scheduler if load_optimizer else None)
        if load_optimizer:
            self.step = int(state.get("step", self.step))
        return state.get("extra_state") or {}

    def export_weights(self, bucket_bytes: int):
        """This rank's share of the HF-named full weights, in buckets, for the weight sync.

        A collective generator (every rank must iterate it to the end): each rank that
        sources tensors (TP rank 0 of an owning PP stage / EP rank in the first data-parallel
        replica) yields lists of ``(hf_name, full tensor)``; other ranks yield nothing.
        """
        from dapo_megatron.convert.export import export_owned_buckets

        self._enter()
        return export_owned_buckets(self.model, bucket_bytes=bucket_bytes)

    def offload(self) -> None:
        """Move params, grads and optimizer state off the GPU (no-op on CPU)."""
        from dapo_megatron.policy.offload import offload_to_cpu

        offload_to_cpu(self.model, self.optimizer)

    def onload(self) -> None:
        """Bring back what ``offload`` moved (no-op on CPU)."""
        from dapo_megatron.policy.offload import reload_to_gpu

        reload_to_gpu(self.model, self.optimizer)


def _initial_hf_weights(hf_dir, hf_config, seed: int):
    """HF-named initial weights: a lazy reader of the safetensors under ``hf_dir`` (each rank
    reads only its shards), else a seeded random HF model (identical on every rank)."""
    import glob

    if hf_dir and glob.glob(os.path.join(hf_dir, "*.safetensors")):
        from dapo_megatron.convert.hf_io import SafetensorsReader

        return SafetensorsReader(hf_dir)
    from dapo_megatron.rollout.buckets import hub_state_dict
    from dapo_megatron.rollout.embedded import build_hf_model

    torch.manual_seed(seed)
    return hub_state_dict(build_hf_model(hf_config))


def _routing_replay(hf_config, algo, overrides: dict):
    """The routers' replay of a MoE model (policy/routing_replay.py; megatron-core's
    moe_enable_routing_replay on every router), None for a dense one, where
    ``algo.routing_replay`` other than none is refused."""
    args = _model_args(hf_config)
    mode = algo.routing_replay
    if not args.is_moe:
        if mode != "none":
            raise ValueError(f"algo.routing_replay={mode} replays MoE routing, but the model is "
                             "dense (no experts); set algo.routing_replay=none")
        return None
    from dapo_megatron.policy.routing_replay import RoutingReplay

    overrides.setdefault("moe_enable_routing_replay", True)
    return RoutingReplay(args.num_layers, args.moe_top_k)


def _model_args(hf_config):
    from dapo_megatron.convert import model_args_from_hf

    return model_args_from_hf(hf_config)


def _resolve_dtype(params_dtype, on_gpu: bool) -> torch.dtype:
    """ModelConfig.params_dtype ("auto", "fp32", "bf16") or a torch dtype -> torch dtype."""
    dtype = dtypes.params_dtype(params_dtype, on_gpu)
    if dtype == torch.float16:
        raise ValueError(f"params_dtype {params_dtype!r} is not supported by the trainer; use "
                         "'auto', 'fp32' or 'bf16'")
    return dtype


def _reduce_metrics(records: list[dict], device) -> dict[str, float]:
    """Combine micro-batch metrics over this rank's micro-batches, DP ranks and PP stages:
    the algo reduction (``reduce_policy_metrics``) with the all-reduce in the middle.

    Only the last pipeline stage has records; it reduces over DP and broadcasts to the
    other stages, so every rank returns the same floats.
    """
    ps = _ps()
    partials = metric_partials(records, _REDUCTIONS).to(device)
    sums, maxes = partials[: 3 * len(_REDUCTIONS)], partials[3 * len(_REDUCTIONS):]
    if ps.is_pipeline_last_stage() and ps.get_data_parallel_world_size() > 1:
        group = ps.get_data_parallel_group()
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    partials = broadcast_from_last_pipeline_stage(torch.cat([sums, maxes]), tuple(partials.shape),
                                                  dtype=torch.float64, device=device)
    return finish_metrics(partials, _REDUCTIONS)
