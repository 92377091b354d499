"""Parallel initialisation: torch.distributed + megatron ``parallel_state`` + RNG seeds.

Works under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment)
and inside Ray actors (pass rank, world size and the master address explicitly). The data
parallel size is derived: ``dp = world_size / (tp * pp * cp)``.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dapo_megatron.policy.compat import enable_cpu_execution

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """The layout this process took part in; ``dp`` is derived."""

    tp: int
    pp: int
    ep: int
    cp: int
    dp: int
    world_size: int
    rank: int


_LAYOUT: ParallelLayout | None = None


def check_layout(world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1) -> int:
    """Validate a layout for ``world_size`` ranks and return the derived DP size."""
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep), ("cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel size {name}={value!r} must be a positive integer")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = "
            f"{model_parallel}; choose sizes whose product divides the number of ranks"
        )
    dp = world_size // model_parallel
    # Experts are laid out over tp(expert tensor parallel = tp) * ep * pp ranks.
    if world_size % (tp * ep * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tp*ep*pp = {tp}*{ep}*{pp} = "
            f"{tp * ep * pp} (expert parallel layout); lower ep or change tp/pp"
        )
    return dp


def _ray_assigned_gpus() -> list:
    """GPU ids Ray gave this worker ([] outside Ray or without GPUs)."""
    ray = sys.modules.get("ray")  # imported by the worker itself when we are in one
    if ray is None or not ray.is_initialized():
        return []
    try:
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - not a worker (driver) or an old Ray
        return []


def _cuda_failure() -> str:
    """Why CUDA is unusable here, in words (torch.cuda.is_available() only says False)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - the driver's own reason is the useful part
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    else:
        reason = f"{torch.cuda.device_count()} CUDA devices"
    return f"{reason} (CUDA_VISIBLE_DEVICES={visible!r})"


def resolve_device(device: str = "auto") -> bool:
    """Whether this process runs on CUDA, given ``trainer.device``; raises instead of
    falling back to the CPU layer and gloo when CUDA was asked for (issue 14, finding 10).

    ``cuda`` must mean CUDA. ``auto`` means CUDA when it works, and also must mean CUDA
    inside a Ray worker that was given GPUs (the GPU actor's CUDA failed to start).
    ``cpu`` where a GPU is visible only warns: the code paths key on
    ``torch.cuda.is_available()``, so a visible GPU is used (hide it to run on CPU).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device={device!r}: must be auto, cpu or cuda")
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        if device == "cpu":
            logger.warning("trainer.device=cpu but this process sees a CUDA device and will "
                           "use it; hide it (CUDA_VISIBLE_DEVICES=) to run on CPU")
        return True
    gpus = _ray_assigned_gpus()
    if device == "cuda" or gpus:
        asked = "trainer.device=cuda" if device == "cuda" else f"Ray assigned GPUs {gpus}"
        raise RuntimeError(
            f"{asked} but CUDA does not work in this process: {_cuda_failure()}. Refusing to "
            "fall back to CPU/gloo; fix the driver/visible devices or set trainer.device=cpu")
    return False


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    cp: int = 1,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | str | None = None,
    store_hosted: bool = False,
    backend: str | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    device: str = "auto",
) -> ParallelLayout:
    """Initialise torch.distributed (if needed), megatron's parallel groups and RNG seeds.

    Without CUDA the CPU execution layer is enabled first and the backend defaults to gloo;
    with CUDA it is nccl and the current device is set to LOCAL_RANK (or rank % #GPUs).
    ``device`` is ``trainer.device``: see ``resolve_device`` (cuda never falls back).
    Calling it again with the same sizes is a no-op; with other sizes, call
    ``destroy_parallel()`` first. ``store_hosted``: the rendezvous store at
    master_addr:master_port already listens (the driver opened it, ``ports.listening_store``),
    so every rank joins it as a client; otherwise rank 0 opens it there (torchrun's way).
    """
    from megatron.core import parallel_state, tensor_parallel

    on_gpu = resolve_device(device)
    if not on_gpu:
        enable_cpu_execution()
    backend = backend or ("nccl" if on_gpu else "gloo")
    if on_gpu and backend != "nccl":
        raise ValueError(f"init_parallel: backend={backend!r} on CUDA; megatron's GPU paths "
                         "need nccl")

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        world_size = (
            int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
        )
        addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = master_port or os.environ.get("MASTER_PORT")
        if port is None and world_size > 1:
            raise ValueError(
                "init_parallel: no master_port given and MASTER_PORT is unset; pass "
                "master_addr/master_port (Ray actors) or run under torchrun"
            )
        check_layout(world_size, tp, pp, ep, cp)
        if on_gpu:
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world_size == 1:
            # One rank meets nobody: an in-process store binds no port, so runs started side by
            # side cannot race for the one a free_port() answer named (EADDRINUSE at start-up).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        elif store_hosted:
            store = dist.TCPStore(addr, int(port), world_size, is_master=False, timeout=timeout)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                    world_size=world_size, timeout=timeout)
    else:
        got_rank, got_world = dist.get_rank(), dist.get_world_size()
        if rank is not None and int(rank) != got_rank:
            raise ValueError(f"init_parallel: rank={rank} but torch.distributed has {got_rank}")
        if world_size is not None and int(world_size) != got_world:
            raise ValueError(
                f"init_parallel: world_size={world_size} but torch.distributed has {got_world}"
            )
        rank, world_size = got_rank, got_world
        if on_gpu and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

    dp = check_layout(world_size, tp, pp, ep, cp)
    global _LAYOUT
    if parallel_state.model_parallel_is_initialized():
        if _LAYOUT is not None and (_LAYOUT.tp, _LAYOUT.pp, _LAYOUT.ep, _LAYOUT.cp) == (
            tp, pp, ep, cp
        ):
            return _LAYOUT
        raise RuntimeError(
            "megatron parallel state is already initialised with another layout; call "
            "destroy_parallel() first"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Same seed on every rank: the default stream is shared by the data-parallel replicas,
    # the TP stream is offset by the TP rank inside megatron (tensor_parallel/random.py).
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    _LAYOUT = ParallelLayout(tp=tp, pp=pp, ep=ep, cp=cp, dp=dp, world_size=world_size, rank=rank)
    logger.info("parallel layout %s (backend %s)", _LAYOUT, dist.get_backend())
    return _LAYOUT


def get_layout() -> ParallelLayout:
    """The layout set by ``init_parallel``; raises if it was not called."""
    if _LAYOUT is None:
        raise RuntimeError("init_parallel() has not been called in this process")
    return _LAYOUT


def destroy_parallel(destroy_process_group: bool = False) -> None:
    """Tear down megatron's parallel groups (and torch.distributed when asked)."""
    from megatron.core import parallel_state

    global _LAYOUT
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _LAYOUT = None
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "ParallelLayout", "check_layout", "destroy_parallel", "get_layout", "init_parallel",
    "resolve_device",
]
