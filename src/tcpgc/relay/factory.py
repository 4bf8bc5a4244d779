"""The one way to start a relay: picks the engine before building it.

Four engines, copy or splice × raw or chunked:

- `copy.CopyRelay` and `chunked_copy.ChunkedCopyRelay` move bytes through Python. They
  are the portable path: TLS links, systems without splice(2) (macOS, BSD), and any
  run with `TCPGC_NO_SPLICE` set (to compare the two, or to rule splice out).
- `splice.SpliceRelay` and `chunked_splice.ChunkedSpliceRelay` move them with splice(2)
  and never read the payload into Python: plain TCP links on Linux only.

The splice engines import Linux-only names (`fcntl`, `os.splice`), so they are imported
here only when first needed, and only if that import works: this module imports
everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from tcpgc.relay.chunked_copy import ChunkedCopyRelay
from tcpgc.relay.copy import CopyRelay
from tcpgc.relay.rate_limit import RateLimits
from tcpgc.relay.result import AnyRelay, ByteCounter
from tcpgc.transport.link import Link
from tcpgc.transport.socket_handover import can_hand_over, can_lend

__all__ = ["splice_available", "start_chunked_relay", "start_relay"]


@functools.cache
def _system_can_splice() -> bool:
    try:
        from tcpgc.relay import splice
    except ImportError:  # no fcntl: not a Unix
        return False
    return splice.AVAILABLE


def splice_available() -> bool:
    """Whether the splice engines may be used: the system has splice(2) and
    `TCPGC_NO_SPLICE` is not set (read at each call, as the relays are started)."""
    return not os.environ.get("TCPGC_NO_SPLICE") and _system_can_splice()


def start_relay(
    a: Link,
    b: Link,
    count_a_to_b: ByteCounter | None = None,
    count_b_to_a: ByteCounter | None = None,
    on_first_b_to_a: Callable[[], None] | None = None,
    limits: RateLimits | None = None,
) -> AnyRelay:
    """Relay `a` <-> `b` with the fastest engine the two links allow: splice(2) when
    both are plain TCP and can hand their sockets over, the copy engine otherwise.
    `on_first_b_to_a` is called once the first bytes from `b` have been moved on, by an
    engine that does not pass them through `b`'s protocol (splice). `limits`: the
    rate limits `a` -> `b` (up) and `b` -> `a` (down) answer to; None for none."""
    if splice_available() and can_hand_over(a) and can_hand_over(b):
        from tcpgc.relay.splice import SpliceRelay

        return SpliceRelay(a, b, count_a_to_b, count_b_to_a, on_first_b_to_a, limits)
    return CopyRelay(a, b, count_a_to_b, count_b_to_a, limits)


def start_chunked_relay(
    a: Link,
    b: Link,
    count_a_to_b: ByteCounter | None = None,
    count_b_to_a: ByteCounter | None = None,
    on_idle: Callable[[Link], None] | None = None,
    limits: RateLimits | None = None,
) -> AnyRelay:
    """Relay plain link `a` over data link `b`, which carries the chunked stream and is
    handed to `on_idle` once both directions ended: with splice(2) when `a` can hand
    its socket over and `b` can lend its own (both plain TCP), through Python otherwise
    (a TLS data connection)."""
    if splice_available() and can_hand_over(a) and can_lend(b):
        from tcpgc.relay.chunked_splice import ChunkedSpliceRelay

        relay = ChunkedSpliceRelay(a, b, count_a_to_b, count_b_to_a, on_idle, limits)
        if relay.start():
            return relay
        # Out of descriptors for a socket's duplicate: both links are as they were.
    return ChunkedCopyRelay(a, b, count_a_to_b, count_b_to_a, on_idle=on_idle, limits=limits)
