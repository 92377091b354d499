"""Policy checkpoints with megatron.core.dist_checkpointing: reshardable.

This module writes and reads one checkpoint directory; where checkpoints live, which is the
newest, atomic publishing and keep-last are the controller's (controller/checkpoint.py).

A checkpoint holds, under these top-level keys of the sharded state dict:
    model        the GPTModel's ``sharded_state_dict()`` with prefix '' (the dict key only
                 groups; the tensor keys are megatron's, e.g. ``decoder.layers.0...``,
                 exactly what tools/convert_hf.py (dapo_megatron/convert_hf.py) writes, so a
                 converted HF checkpoint loads as initial weights without the optimizer)
    optimizer    the distributed optimizer state, "fully_reshardable" format
    scheduler    the lr/wd schedule (OptimizerParamScheduler.state_dict)
    step         completed rollout steps
    extra_state  an opaque, picklable dict from the controller (data position, ...)
    layout       tp/pp/ep/dp it was written under
    rng          per-rank RNG states (python, numpy, torch, CUDA, megatron's TP tracker)

Model and optimizer tensors reload under any TP/PP/DP layout (megatron reshards them);
RNG states are per rank and restored only when the layout is unchanged.

A checkpoint can be written in every state a run can be in: before the first optimizer
step (DAPO drops every group when the data is too hard at first), in fp32 or bf16, with or
without the distributed optimizer (``_fresh_optimizer_state`` works around megatron-core
0.16.1 needing optimizer state that torch creates only at the first step). A write that raises
removes the directory it created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from dapo_megatron.policy.finite import check_finite
from dapo_megatron.policy.optimizer import load_schedule_state
from dapo_megatron.convert.spec_keys import extra_state_from_model

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "write_checkpoint"]

# Reshardable across TP/PP/DP; no per-chained-optimizer key prefix, so the keys do not
# depend on how megatron splits dense and expert parameters into optimizers.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                   "chained_optim_avoid_prefix": True}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(chunk):
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _model_state(model_chunks) -> dict:
    if len(model_chunks) != 1:
        raise NotImplementedError("checkpoints support one model chunk per rank (no virtual "
                                  "pipeline stages)")
    return _unwrap(model_chunks[0]).sharded_state_dict()


def _rng_object(data=None):
    """This rank's RNG states as a ShardedObject indexed by (pp, tp, ep) rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(),
             ps.get_tensor_model_parallel_world_size(),
             ps.get_expert_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_expert_model_parallel_rank())
    return ShardedObject("rng_state", data, shape, offset,
                         replica_id=ps.get_expert_data_parallel_rank())


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


@contextlib.contextmanager
def _in_process_write_results():
    """Collect a synchronous save's write results in a plain in-process queue.

    megatron's torch_dist writer hands its results back through a module-global queue that
    it creates, on first use, as ``mp.get_context("spawn").Manager().Queue()``
    (dist_checkpointing/strategies/filesystem_async.py, ``_get_write_results_queue``): a
    Manager *server process*, made for async saves whose writer runs elsewhere. Our saves are
    synchronous (strategies/base.py, ``AsyncSaveShardedStrategy.save`` ->
    ``AsyncRequest.execute_sync``): ``write_preloaded_data_multiproc`` runs in this process,
    gathers its forked writers' results and puts them on that queue, and
    ``retrieve_write_results`` reads them back here. So the server only cost the first save
    about 2 s to spawn, and it outlived a rank killed with SIGKILL (one idle ~300 MB process per
    killed rank, nobody to end it). A ``queue.Queue`` does the same job in-process. Megatron's
    own global is put back afterwards, so an async save elsewhere still gets its Manager."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def write_checkpoint(path: str, step: int, model_chunks, optimizer, scheduler, *,
                     extra_state: dict | None = None) -> str:
    """Collectively write a checkpoint straight into ``path`` (created if missing; must be
    empty). The caller owns atomicity: the controller publishes it (controller/checkpoint.py).
    ``extra_state`` must be equal on every rank."""
    from megatron.core import dist_checkpointing

    created = False
    if _rank() == 0:
        created = not os.path.exists(path)
        os.makedirs(path, exist_ok=True)
        if os.listdir(path):
            raise FileExistsError(f"checkpoint directory {path!r} is not empty; pass a new one")
    _barrier()
    try:
        check_finite(model_chunks, optimizer, when=f"saving step {step}")  # issue 23
        model_state = _model_state(model_chunks)
        with _fresh_optimizer_state(optimizer):
            state = {
                "model": model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, is_loading=False,
                                                          metadata=_OPTIM_METADATA),
                "scheduler": scheduler.state_dict(),
                "step": int(step),
                "extra_state": extra_state or {},
                "layout": _layout(),
                "rng": _rng_object(_rng_state()),
            }
            with _in_process_write_results():
                dist_checkpointing.save(state, path, content_metadata=dict(_OPTIM_METADATA))
    except BaseException:
        # Leave nothing half-written behind (the caller's previous checkpoint stays newest).
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    _barrier()
    return path


def load_checkpoint(path: str, model_chunks, optimizer=None, scheduler=None) -> dict:
    """Load the checkpoint directory ``path`` into the model
    and, when given, the optimizer and scheduler; returns ``{"step", "extra_state",
    "layout"}``. A model-only checkpoint (e.g. converted from HF) needs optimizer=None.
    """
    from megatron.core import dist_checkpointing

    resolved = path
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"no checkpoint at {path!r}: expected a dist_checkpointing "
                                "directory (with metadata.json), e.g. <checkpoint.dir>/step_000012 "
                                "or the output of tools/convert_hf.py")
    common = dist_checkpointing.load_common_state_dict(resolved)
    model_state = _model_state(model_chunks)
    extra_state_from_model(model_state, resolved)  # TE metadata a converted checkpoint lacks
    request = {"model": model_state}
    if optimizer is not None:
        if not _has_optimizer(resolved):
            raise ValueError(f"{resolved} holds no optimizer state (a converted or model-only "
                             "checkpoint?); load it with load_optimizer=False")
        _ensure_torch_adam_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True,
                                                            metadata=_OPTIM_METADATA)
    same_layout = common.get("layout") == _layout()
    if same_layout and "layout" in common:
        request["rng"] = _rng_object()
    loaded = dist_checkpointing.load(request, resolved)
    _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
        if scheduler is not None and "scheduler" in common:
            load_schedule_state(scheduler, common["scheduler"])  # the config's schedule wins
    check_finite(model_chunks, optimizer, when=f"loading {resolved}")  # issue 23
    if "rng" in request:
        _set_rng_state(loaded["rng"])
    elif "layout" in common:
        logger.warning("checkpoint %s was written under layout %s, now %s: RNG states are not "
                       "restored (they are per rank)", resolved, common["layout"], _layout())
    logger.info("loaded checkpoint %s (step %s)", resolved, common.get("step"))
    return {"step": common.get("step", 0), "extra_state": common.get("extra_state") or {},
            "layout": common.get("layout")}


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _fill_empty_state(sub) -> list:
    """Give every parameter of ``sub``'s inner optimizer that has no state yet the state
    a first update would start from; returns those parameters.

    Without Apex/TE (the CPU path) megatron's DistributedOptimizer.state_dict() reads a
    per-parameter "step" (optimizer/distrib_optimizer.py, state_dict: ``assert
    len(steps) == 1``) and get_parameter_state_dp_zero copies "exp_avg"/"exp_avg_sq";
    torch creates all three only at the first step. Zeros (step 0) are what torch starts
    from (torch/optim/adam.py, _init_group). Other inner optimizers (TE/Apex FusedAdam) get
    megatron's own ``init_state_fn`` (optimizer/__init__.py, _get_megatron_optimizer_based_on_param_groups).
    """
    inner = getattr(sub, "optimizer", None)
    if inner is None:
        return []
    empty = [p for g in inner.param_groups for p in g["params"] if len(inner.state.get(p, ())) == 0]
    if not empty:
        return []
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        for param in empty:
            inner.state[param].update(
                step=torch.zeros((), dtype=torch.float32),
                exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format))
    elif getattr(sub, "init_state_fn", None) is not None:
        sub.init_state_fn(inner, getattr(sub, "config", None))
    return empty


def _ensure_torch_adam_state(optimizer) -> None:
    """Before a load: a never-stepped optimizer must describe the state it wants to load
    (see ``_fill_empty_state``); the checkpoint then overwrites the zeros."""
    for sub in _sub_optimizers(optimizer):
        _fill_empty_state(sub)


@contextlib.contextmanager
def _fresh_optimizer_state(optimizer):
    """Save before the first optimizer step: state exists only while the checkpoint is
    written, so the next update still starts exactly as a fresh optimizer's would."""
    added = [(getattr(sub, "optimizer", None), _fill_empty_state(sub))
             for sub in _sub_optimizers(optimizer)]
    try:
        yield
    finally:
        for inner, params in added:
            for param in params:
                inner.state.pop(param, None)


@contextlib.contextmanager
def _per_param_step_hidden(inner):
    """Temporarily take torch Adam's per-parameter "step" out of its state.

    Each parameter gets its own copy back: megatron's load_state_dict assigns one shared
    step tensor to every parameter (distrib_optimizer.py, "Native PyTorch state dict
    requires step"), and torch's Adam increments steps in place, so a shared tensor would
    advance once per parameter per update and corrupt the bias correction.
    """
    saved = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
    try:
        yield
    finally:
        for p, step in saved.items():
            inner.state[p]["step"] = step.detach().clone()


def _load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict`` for fully-reshardable distributed-optimizer state.

    Works around megatron-core 0.16.1 with torch's Adam (no Apex/TE, the CPU path): the
    distributed optimizer first loads torch's state, which adds a per-parameter "step",
    then copies the parameter state over every key of that state
    (optimizer/distrib_optimizer.py, _set_main_param_and_optimizer_states) while the
    checkpoint's tensors have no "step": KeyError. Here the parameter state is loaded
    separately with "step" hidden; the step itself comes from the param groups as usual.
    """
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(subs) == 1 else [v for _, v in sorted(state.items())]
    if len(states) != len(subs):
        raise RuntimeError(f"checkpoint holds {len(states)} optimizer states, the model "
                           f"{len(subs)} (dense/expert split changed?)")
    for sub, sub_state in zip(subs, states):
        param_state = sub_state.pop("param_state", None)
        kind = sub_state.pop("param_state_sharding_type", None)
        _restore_zero_step(sub, sub_state)
        sub.load_state_dict(sub_state)
        if param_state is None:
            continue
        if kind != "fully_reshardable":
            raise ValueError(f"optimizer state in format {kind!r}; this trainer writes and "
                             "reads 'fully_reshardable'")
        with _per_param_step_hidden(sub.optimizer):
            sub.load_parameter_state_from_fully_reshardable(param_state)


def _restore_zero_step(sub, sub_state: dict) -> None:
    """Put back the step of a never-stepped optimizer that the non-distributed optimizers
    drop at save (optimizer/optimizer.py, sharded_state_dict: ``if step:`` skips a step
    of 0), without which torch's Adam refuses the state (``KeyError: 'step'``)."""
    if not isinstance(getattr(sub, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW)):
        return
    inner_state = (sub_state.get("optimizer") or sub_state).get("state")
    if not isinstance(inner_state, dict) or "common_step" in inner_state:
        return
    if any(isinstance(v, dict) and "step" not in v for v in inner_state.values()):
        inner_state["common_step"] = torch.zeros((), dtype=torch.float32)


def _has_optimizer(resolved: str) -> bool:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(resolved)
    return any(key.startswith("optimizer.") for key in metadata)
