"""Import SGLang 0.5.23's own pieces on a CPU-only machine, or say why not.

CI installs ``sglang==0.5.23`` with ``--no-deps`` plus the pure-Python modules its request,
serializer and weight-updater modules import (README test command). One gap remains:
sglang's model-config registry (srt/configs/__init__.py, reached from
srt/disaggregation/utils.py, which the weight updater imports) loads two image-model
helpers that import torchvision at module level, and PyPI has no CPU torchvision build for
torch 2.13.0 (its Linux wheels need libc10_cuda.so). Where torchvision does not import,
``load()`` serves ``torchvision.*`` as inert modules whose names are placeholder classes
that no code under test calls; transformers is asked first (its answer is cached) so it
keeps treating torchvision as absent.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

SGLANG_VERSION = "0.5.23"
_state: dict = {}


class _Inert(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (), {})


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Inert(name, (), {})
        setattr(self, name, value)
        return value


class _InertTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA-only wheel raises RuntimeError, not ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def load() -> str | None:
    """Import the sglang pieces the contract tests use; None, or why they cannot run."""
    if "reason" in _state:
        return _state["reason"]
    reason = None
    try:
        from importlib.metadata import version

        got = version("sglang")
        if got != SGLANG_VERSION:
            reason = f"sglang {got} is installed; the contract is written against {SGLANG_VERSION}"
    except Exception:  # noqa: BLE001
        reason = f"sglang is not installed (pip install --no-deps sglang=={SGLANG_VERSION}, see README)"
    if reason is None:
        if not _torchvision_imports():
            from transformers.utils import import_utils

            import_utils.is_torchvision_available()  # cached as False before the stand-in
            sys.meta_path.insert(0, _InertTorchvision())
        try:
            for name in ("sglang.srt.managers.io_struct", "sglang.srt.entrypoints.api_contract",
                         "sglang.srt.sampling.sampling_params", "sglang.srt.utils.patch_torch",
                         "sglang.srt.weight_sync.tensor_bucket",
                         "sglang.srt.managers.scheduler_components.weight_updater"):
                importlib.import_module(name)
        except Exception as err:  # noqa: BLE001
            reason = f"sglang {SGLANG_VERSION} does not import here: {type(err).__name__}: {err}"
    _state["reason"] = reason
    return reason
