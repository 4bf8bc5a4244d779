"""Giving freed heap memory back to the operating system after a burst.

A flood of connections (an attack on the agent port, a crowd of clients) makes OpenSSL
and CPython allocate tens of KiB per connection. Freed, that memory stays in glibc's
heap, fragmented, and the process keeps its peak size for good. `malloc_trim(0)`
returns the free pages; it costs a few milliseconds, so it runs once a burst is over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("tcpgc")

_trim = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def release_free_memory() -> None:
    """Collect cycles, then hand free heap pages back to the OS (glibc only)."""
    gc.collect()
    if _trim is not None:
        _trim(0)


class BurstTrimmer:
    """Calls `release_free_memory` once a burst of `threshold` closed connections is
    over (`idle()` says none is pending), at most once per `interval` seconds."""

    def __init__(self, threshold: int = 64) -> None:
        self.threshold = threshold
        self._closed = 0

    def closed(self, still_pending: int) -> None:
        self._closed += 1
        if still_pending == 0 and self._closed >= self.threshold:
            self._closed = 0
            release_free_memory()
