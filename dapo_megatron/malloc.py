"""Keep freed tensor memory from lingering in this process (glibc only)."""


def limit_malloc_retention(threshold: int = 1 << 20) -> None:
    """Serve allocations above ``threshold`` with mmap so freed tensors go back to the OS.

    glibc raises its mmap threshold dynamically (up to 32 MB) after large frees, after which
    freed per-tensor temporaries (conversion shards, weight-sync buckets) stay in the heap and
    inflate the process's peak RSS. Best effort: a no-op where mallopt is unavailable.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it disables the dynamic rule
    except (OSError, AttributeError):
        pass
