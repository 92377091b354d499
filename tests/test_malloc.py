"""malloc.py: a bucket phase mmaps MiB-sized tensors (back to the OS when freed), the steady state
serves them from the heap (no page-fault tax on activations). Observed through glibc's own
accounting (mallinfo2: hblkhd = bytes in mmapped chunks), in a fresh process so no other test's
thresholds leak in."""

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, torch
from dapo_megatron import malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_by(nbytes):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    grew = libc.mallinfo2().hblkhd - before
    del t
    return grew

# Sizes grow so no free heap chunk left by an earlier probe can take a later one (glibc serves
# a fitting free chunk before it considers mmap).
malloc.steady_state()
steady = mmapped_by(4 << 20)
with malloc.returned_to_os():
    phase = mmapped_by(8 << 20)
after = mmapped_by(16 << 20)
big = mmapped_by(64 << 20)  # above the steady threshold: still mmapped
print(steady, phase, after, big)
"""


def test_bucket_phase_mmaps_and_steady_state_uses_the_heap():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    steady, phase, after, big = map(int, out.stdout.split())
    assert steady == 0, "steady state must serve a 4 MiB tensor from the heap"
    assert phase >= 8 << 20, "a bucket phase must mmap an 8 MiB tensor"
    assert after == 0, "leaving the phase must restore the steady state (16 MiB from the heap)"
    assert big >= 64 << 20
