"""algo/ is pure torch: importing it must not pull in Ray or Megatron (DESIGN.md layout)."""

import subprocess
import sys


def test_algo_imports_neither_ray_nor_megatron():
    code = (
        "import sys, dapo_megatron.algo as algo\n"
        "heavy = ('ray', 'megatron', 'transformer_engine', 'sglang')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
        "assert all(hasattr(algo, name) for name in algo.__all__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
