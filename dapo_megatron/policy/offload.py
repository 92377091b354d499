"""Free the training state's GPU memory during rollout (colocated SGLang) and bring it back.

``offload_to_cpu`` moves, for every DDP-wrapped chunk, the contiguous parameter and
gradient buffers (megatron's ``_ParamAndGradBuffer.offload_to_cpu``: params copied to
pinned host memory, grad storage released), and the optimizer's state and main params
(``MegatronOptimizer.offload_to_cpu``). ``reload_to_gpu`` reverses both; gradients come
back zeroed, which is what the next train step expects. Parameters outside the DDP buffers
(none for megatron's GPTModel under DDP) stay where they are.

On CPU both are no-ops: there is no device memory to give back.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["offload_to_cpu", "reload_to_gpu"]


def _buffers(model_chunks):
    for chunk in model_chunks:
        # DistributedDataParallel keeps dense and expert-parallel buffers separately.
        yield from getattr(chunk, "buffers", [])
        yield from getattr(chunk, "expert_parallel_buffers", [])


def offload_to_cpu(model_chunks, optimizer) -> None:
    """Move params, grads and optimizer state of ``model_chunks`` off the GPU."""
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for buffer in _buffers(model_chunks):
        buffer.offload_to_cpu(move_params=True, move_grads=True)
    optimizer.offload_to_cpu()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    logger.info("offloaded training state: %.2f GiB -> %.2f GiB allocated on GPU",
                before / 2**30, torch.cuda.memory_allocated() / 2**30)


def reload_to_gpu(model_chunks, optimizer) -> None:
    """Bring back what ``offload_to_cpu`` moved (no-op on CPU)."""
    if not torch.cuda.is_available():
        return
    for buffer in _buffers(model_chunks):
        buffer.reload_from_cpu(move_params=True, move_grads=True)
    optimizer.restore_from_cpu()
    torch.cuda.synchronize()
