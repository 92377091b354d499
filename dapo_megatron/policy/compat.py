"""CPU execution layer for megatron-core 0.16.1.

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths.
``enable_cpu_execution()`` works around exactly those, so the same GPTModel, DDP,
distributed optimizer and pipeline schedules run on CPU under gloo (tests, the embedded
default). It is idempotent, does nothing when ``torch.cuda.is_available()`` is True, and
each patch names the upstream line it works around (paths relative to megatron/core/).

What the layer does NOT do (the model builder handles these through TransformerConfig, see
``dapo_megatron.policy.model``): the MoE alltoall token dispatcher uses CUDA streams, so MoE
on CPU uses ``moe_token_dispatcher_type="allgather"``; sequence parallelism is off on CPU
(the torch norm refuses it at TP>1); the default causal mask is built with device="cuda"
(megatron/core/transformer/utils.py:35), which the device redirect below turns into CPU,
but callers should pass explicit attention masks anyway.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import threading

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ENABLED = False
_THREAD = threading.local()  # the device-redirect mode is per thread (torch keeps the stack in TLS)


def cpu_execution_enabled() -> bool:
    """True once ``enable_cpu_execution()`` has switched the layer on in this process."""
    return _ENABLED


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device means "cuda:N" to torch factories; with no GPU it can only come from
    # torch.cuda.current_device() (patched to 0 below).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects device='cuda' (or an int device) in any torch call to the CPU.

    Works around factory calls such as ``torch.empty(..., device=torch.cuda.current_device())``
    (e.g. transformer/dot_product_attention.py:123, tensor_parallel/layers.py weight
    allocation, distributed/param_and_grad_buffer.py) and ``torch.ones(..., device="cuda")``
    (transformer/utils.py:35, get_default_causal_mask), plus ``tensor.cuda()`` /
    ``tensor.to("cuda")`` calls in the schedules and DDP.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _cuda_tensor_type_names():
    """Make ``tensor.type()`` report 'torch.cuda.*Tensor' names for CPU tensors.

    Works around the type checks in optimizer/distrib_optimizer.py:361,420,582,
    optimizer/optimizer.py:671,690 and optimizer/clip_grads.py:167, which accept only
    'torch.cuda.FloatTensor' / 'torch.cuda.HalfTensor' / 'torch.cuda.BFloat16Tensor'.
    Only active while those functions run.
    """
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if self.device.type == "cpu" and name.startswith("torch.") and "cuda" not in name:
                # fp64 parameters (model.params_dtype=fp64, a CPU mode) take the fp32 path:
                # the optimizer keeps them as their own main params and the CPU fallbacks of
                # the fused kernels are dtype-generic.
                return "torch.cuda." + name[len("torch."):].replace("Double", "Float")
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_tensor_type_names():
            return fn(*args, **kwargs)

    wrapper._dapo_cpu_wrapped = True
    return wrapper


def _wrap_attr(owner, name):
    fn = getattr(owner, name)
    if isinstance(fn, staticmethod):  # pragma: no cover - accessed through the class
        fn = fn.__func__
    if getattr(fn, "_dapo_cpu_wrapped", False):
        return
    raw = owner.__dict__.get(name)
    if isinstance(raw, staticmethod):
        setattr(owner, name, staticmethod(_with_cuda_type_names(raw.__func__)))
    elif isinstance(raw, classmethod):
        setattr(owner, name, classmethod(_with_cuda_type_names(raw.__func__)))
    else:
        setattr(owner, name, _with_cuda_type_names(fn))


class _CpuRngStateChangeFilter(logging.Filter):
    """The TP RNG tracker's fork() warns when the CPU RNG moved inside a fork
    (tensor_parallel/random.py:263). On CPU the tracked "CUDA" state *is* the CPU state,
    so the warning is expected there and only there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_cuda_runtime():
    # torch.cuda.current_device() raises without a GPU; it is called for device ids all over
    # megatron/core (e.g. tensor_parallel/layers.py, distributed/param_and_grad_buffer.py,
    # transformer/dot_product_attention.py:123). 0 is then redirected to CPU by the mode.
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda device: None
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.device_count = lambda: 0

    # CUDA RNG state calls of the tensor-parallel RNG tracker
    # (tensor_parallel/random.py:55 _get_cuda_rng_state, :72 _set_cuda_rng_state,
    # :235-238 CudaRNGStatesTracker.add, :390 model_parallel_cuda_manual_seed). On CPU the
    # tracked state is the CPU generator's, so fork() really switches the stream used by
    # dropout/init inside TP regions, as it does on GPU.
    from megatron.core.tensor_parallel import random as tp_random

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all (left untouched, a
        # lazy no-op without CUDA) and would recurse.
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = set_rng_state
    torch.cuda.manual_seed = manual_seed
    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    logging.getLogger(tp_random.__name__).addFilter(_CpuRngStateChangeFilter())


def _patch_module_cuda():
    # Module.cuda() (called by megatron training glue, e.g. model.cuda(current_device) in
    # get_model / Float16Module users) must be a no-op rather than fail without a GPU.
    def module_cuda(self, device=None):
        return self

    torch.nn.Module.cuda = module_cuda


def _patch_moe_utils():
    # transformer/moe/moe_utils.py:34 imports te_general_gemm only when Transformer Engine
    # imports; without TE the name is undefined and RouterGatingLinearFunction.forward
    # (moe_utils.py:1192) raises NameError. None selects its torch.mm fallback.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_optimizer_type_checks():
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    _wrap_attr(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups")
    _wrap_attr(distrib_optimizer.DistributedOptimizer, "__init__")
    _wrap_attr(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    wrapped = clip_grads.clip_grad_by_total_norm_fp32
    if not getattr(wrapped, "_dapo_cpu_wrapped", False):
        wrapped = _with_cuda_type_names(wrapped)
        clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    # optimizer.py imports the function by name.
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = wrapped


def _patch_rope():
    # Not a CUDA workaround: upstream's unfused RoPE (models/common/embeddings/rope_utils.py,
    # the path without TE) redoes its frequency work for every layer's q and k and copies the
    # activations twice; policy/rope_cpu.py computes the same values, bit for bit, without that.
    from dapo_megatron.policy import rope_cpu

    rope_cpu.install()


def enable_cpu_execution() -> bool:
    """Switch on the CPU execution layer if there is no GPU; returns whether it is on.

    Idempotent. With CUDA available it changes nothing and returns False.
    """
    global _ENABLED
    if not _ENABLED:
        if torch.cuda.is_available():
            return False
        _patch_cuda_runtime()
        _patch_module_cuda()
        _patch_moe_utils()
        _patch_optimizer_type_checks()
        _patch_rope()
        _ENABLED = True
        logger.info("megatron CPU execution layer enabled (no CUDA device)")
    # The device-redirect mode stays pushed for the life of the thread. torch keeps the mode
    # stack per thread, so a thread that runs megatron code (e.g. a Ray actor's executor
    # thread) must call this function itself; a second call in the same thread is a no-op.
    if not getattr(_THREAD, "mode", None):
        _THREAD.mode = _CudaToCpuMode()
        _THREAD.mode.__enter__()
    return True


class _EagerJitFuser(importlib.abc.MetaPathFinder):
    """Runs megatron/core/jit.py as it is, then, without CUDA, its own ``disable_jit_fuser()``,
    before any module can decorate with ``jit_fuser`` (megatron.core's package init imports the
    fusions, each taking ``jit_fuser`` from that module as it loads). One-shot: it leaves
    meta_path when it has found the module. CUDA is asked only then, when megatron loads."""

    def find_spec(self, name, path=None, target=None):
        if name != "megatron.core.jit":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if not torch.cuda.is_available():
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def eager_jit_fusers_without_cuda() -> None:
    """Without CUDA, let megatron's ``@jit_fuser`` functions run eagerly (call before the
    first ``import megatron``; a no-op after it, or with CUDA).

    megatron/core/jit.py makes ``jit_fuser`` ``torch.compile`` on torch >= 2.2, and decorating
    its fused elementwise kernels while megatron.core loads imports torch._dynamo and
    torch._inductor: 1.8 of the 3.5 s that ``import megatron.core`` takes here, in every
    policy rank and test process. On CPU those kernels are either unused (the bias/activation
    fusions are off, policy/model.py) or tiny, and eager runs them the same maths without a
    C++ toolchain. On a GPU nothing changes: the fusions compile as megatron intends."""
    if "megatron.core.jit" in sys.modules:
        return
    if not any(isinstance(finder, _EagerJitFuser) for finder in sys.meta_path):
        sys.meta_path.insert(0, _EagerJitFuser())


__all__ = ["enable_cpu_execution", "cpu_execution_enabled", "eager_jit_fusers_without_cuda"]
