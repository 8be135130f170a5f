"""How much memory a process holds, for tests that bound it (psutil reads /proc)."""

import psutil


def rss_bytes(pid: int) -> int:
    """The resident memory of a running process, in bytes."""
    return int(psutil.Process(pid).memory_info().rss)
