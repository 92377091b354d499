"""policy/compat.py, eager_jit_fusers_without_cuda: on a machine without CUDA, importing the
policy package before megatron leaves megatron's ``@jit_fuser`` kernels as plain functions
(no torch.compile, so no torch._dynamo import) with the same results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROBE = r"""
import json, sys
import torch
import dapo_megatron.policy  # installs the hook before megatron loads
import megatron.core
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
x = torch.linspace(-3, 3, 24, dtype=torch.float64).reshape(2, 12)
out = fused_bias_swiglu.swiglu(x)
print(json.dumps({
    "fuser_is_noop": jit.jit_fuser is jit.noop_decorator,
    "swiglu_is_plain": not hasattr(fused_bias_swiglu.swiglu, "__wrapped__"),  # torch.compile wraps
    "dynamo": "torch._dynamo" in sys.modules,
    "hook_left": any(type(f).__name__ == "_EagerJitFuser" for f in sys.meta_path),
    "swiglu": out.tolist(),
}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the hook only acts without CUDA")
def test_megatron_jit_fusers_run_eagerly_without_cuda():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fuser_is_noop"] and got["swiglu_is_plain"]
    assert not got["dynamo"]  # nothing loaded torch.compile's machinery
    assert not got["hook_left"]  # one-shot
    # megatron's swiglu (fusions/fused_bias_swiglu.py): silu(first half) * second half
    x = torch.linspace(-3, 3, 24, dtype=torch.float64).reshape(2, 12)
    a, b = torch.chunk(x, 2, dim=-1)
    torch.testing.assert_close(torch.tensor(got["swiglu"], dtype=torch.float64),
                               torch.nn.functional.silu(a) * b, rtol=0, atol=1e-15)
