"""Keep freed weight buckets from lingering in this process (glibc only), without taxing compute.

glibc serves allocations above its mmap threshold with mmap and gives them back to the OS on
free; smaller ones come from the heap and stay in it once freed. The threshold starts at
128 KiB and rises with every freed mmapped chunk, up to 32 MiB (malloc/malloc.c,
DEFAULT_MMAP_THRESHOLD_MAX on 64-bit). So per-tensor temporaries of a weight sync or a
conversion (MiB-sized shards, one bucket after another) end up in the heap and inflate the
process's peak RSS.

A low threshold fixes that, but it must not stay on while the process computes: every
activation above it then costs an mmap, page faults on first touch and a munmap. On the tiny
default that made the policy's train step 1.7x slower and the engine's generation 1.3x slower.
So the low threshold is scoped: ``returned_to_os()`` (or ``bucket_phase``/``steady_state`` for
sessions that span calls) holds it for a bucket phase and on exit sets the steady state, a fixed 32 MiB
threshold (what glibc's dynamic rule reaches anyway) with a matching trim threshold, and trims
the heap (malloc_trim). ``limit_malloc_retention`` keeps it for a whole process that does
nothing else (the converter's ranks). Best effort: no-ops where mallopt is unavailable.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
LOW_THRESHOLD = 1 << 20
STEADY_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX (64-bit)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def _set(threshold: int, trim: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    # Setting either disables glibc's dynamic rule (malloc.c, mallopt: no_dyn_threshold).
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))


def limit_malloc_retention(threshold: int = LOW_THRESHOLD) -> None:
    """For the whole process: allocations above ``threshold`` are mmapped and go back to the OS
    when freed. Only for processes that move weights and compute nothing else."""
    _set(threshold, 2 * threshold)


def bucket_phase() -> None:
    """Start a bucket phase: freed tensors above 1 MiB go straight back to the OS. The heap is
    trimmed first: a request is served from a free heap chunk that fits before mmap is tried
    (malloc.c, _int_malloc), so what the compute phase left free would otherwise take buckets in."""
    if _set(LOW_THRESHOLD, 2 * LOW_THRESHOLD):
        _libc().malloc_trim(0)


def steady_state() -> None:
    """The steady-state thresholds (also a process's start), and the heap trimmed of what a
    bucket phase freed into it."""
    if _set(STEADY_THRESHOLD, 2 * STEADY_THRESHOLD):
        _libc().malloc_trim(0)


@contextlib.contextmanager
def returned_to_os():
    """A bucket phase around the block (a weight push, a load of buckets)."""
    bucket_phase()
    try:
        yield
    finally:
        steady_state()
