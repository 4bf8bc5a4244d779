"""Giving freed heap memory back to the operating system after a burst.

A flood of connections (an attack on the agent port, a crowd of clients) makes OpenSSL
and CPython allocate tens of KiB per connection. Freed, that memory stays in glibc's
heap, fragmented, and the process keeps its peak size for good. `malloc_trim(0)`
returns the free pages; it costs a few milliseconds, so it runs once a burst is over.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger("tcpgc")

_trim = None
_mallopt = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
    _mallopt = _libc.mallopt
    _mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _mallopt.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: nothing to do
    pass

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Free memory glibc may keep at the top of the heap between two allocations.
TRIM_THRESHOLD = 4 << 20
#: Blocks above this size are mapped on their own; everything a relay allocates is below.
MMAP_THRESHOLD = 1 << 20


def tune_allocator() -> None:
    """Fix glibc's trim and mmap thresholds (for a node process, at start).

    A TLS relay allocates and frees blocks of up to a few hundred KiB per socket read.
    With glibc's default thresholds each free shrinks the heap and the next allocation
    grows it again: about three `brk` calls per read, each followed by page faults on
    fresh pages. That churn cost half of a TLS stream's throughput (3.2 against 6.6
    Gbit/s in one measurement). Free pages are still handed back, by `malloc_trim`
    below, once they have stayed free."""
    if _mallopt is not None:
        _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_free_memory() -> None:
    """Collect cycles, then hand free heap pages back to the OS (glibc only)."""
    gc.collect()
    if _trim is not None:
        _trim(0)


class BurstTrimmer:
    """Releases memory once a burst of failed connections (an attack on the agent port)
    is over: after `threshold` failures, one `release_free_memory` a second later,
    when no handshake is pending. Legitimate traffic never triggers it."""

    def __init__(self, pending: Callable[[], int], threshold: int = 64, delay: float = 1.0):
        self._pending = pending
        self.threshold = threshold
        self.delay = delay
        self._failures = 0
        self._scheduled: asyncio.TimerHandle | None = None

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self.threshold and self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_later(self.delay, self._run)

    def _run(self) -> None:
        self._scheduled = None
        if self._pending():  # still under way: look again later
            self._scheduled = asyncio.get_running_loop().call_later(self.delay, self._run)
            return
        self._failures = 0
        release_free_memory()

    def cancel(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None


#: How often a node hands free heap pages back even without a burst: long-lived nodes
#: otherwise creep up by fragmentation (about 1 MB a minute under a steady mix of short
#: and bulk TLS connections, measured by the soak benchmark).
TRIM_INTERVAL = 60.0


async def trim_periodically(interval: float = TRIM_INTERVAL) -> None:
    while True:
        await asyncio.sleep(interval)
        if _trim is not None:
            _trim(0)
