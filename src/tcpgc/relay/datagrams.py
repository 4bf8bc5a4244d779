"""The datagram engine: one UDP flow over a reusable data connection.

`DatagramRelay` is `tcpgc.relay.chunked_copy.ChunkedCopyRelay` for datagrams. Its
plain side `a` is a flow's UDP end (on the LL, a client address on the service's
socket; on the agent, the flow's own socket connected to the server), which hands it
each datagram it reads (`send_up`); each goes into data connection `b` as one chunk
(`tcpgc.protocol.datagrams`), and each chunk that comes back goes to `a` as one datagram.

Lossy by design, and bounded: what one loop turn reads goes into `b` in one write (one
TLS record for a burst of datagrams, not one each); while `b`'s write buffer is full
(its transport paused us), datagrams are dropped and counted, never queued without
limit, so a slow leg costs this flow datagrams and nothing else.

The flow ends when it has been idle (no datagram either way) for its idle timeout, or
when the peer ends it with the end marker: either node's end is the other's. Once both
ends have crossed, the data connection is handed to `on_idle` to serve the next client
or flow, as after a TCP client. Anything else (`b` closing before the end marker, a
malformed chunk, `close()`) ends the flow and drops `b`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END
from tcpgc.protocol.datagrams import MAX_DATAGRAM, DatagramDecoder
from tcpgc.relay.rate_limit import RateLimits, admit
from tcpgc.relay.result import ByteCounter, Completion, RelayResult
from tcpgc.transport.link import Link
from tcpgc.transport.link_handlers import Ignoring

#: How long a flow that ended waits for the peer's end marker before it drops the data
#: connection instead of reusing it.
END_WAIT = 10.0
_header = struct.Struct(">I").pack  # a chunk's header (`tcpgc.protocol.chunks`)
#: Bytes of datagrams gathered in one loop turn before they are written out at once.
FLUSH_AT = 256 * 1024


class DatagramEnd(Protocol):
    """A flow's UDP side."""

    @property
    def peer(self) -> str:
        """The client (LL) or server (agent) address, for logs and the status page."""

    def send(self, payload: bytes) -> None:
        """Send one datagram to it; OSError if it cannot be sent now."""

    def abort(self) -> None:
        """The flow is over: let go of what the UDP side holds for it."""


@dataclass(frozen=True, slots=True)
class FlowCounters:
    """The metrics a flow feeds: datagrams and bytes each way (up: from `a`, into the
    data connection), and drops by reason."""

    datagrams_up: ByteCounter | None = None
    datagrams_down: ByteCounter | None = None
    bytes_up: ByteCounter | None = None
    bytes_down: ByteCounter | None = None
    drop: Callable[[str], None] | None = None


class _DataSide:
    """Handler of the data connection: whole datagrams from it go to the UDP side."""

    __slots__ = ("relay", "decoder")

    def __init__(self, relay: DatagramRelay) -> None:
        self.relay = relay
        self.decoder = DatagramDecoder()

    def on_data(self, data: bytes) -> None:
        relay = self.relay
        try:
            datagrams = self.decoder.feed(data)
        except ProtocolError as exc:
            relay.fail(f"error: {exc}")
            return
        if datagrams and not relay.ended:
            relay.deliver(datagrams)
        if self.decoder.ended:
            relay.got_end = True
            relay.leftover = self.decoder.leftover
            relay.finish(f"ended by {relay.peer_node}")

    def on_eof(self) -> None:
        self.relay.fail("data connection closed mid-flow")

    def on_lost(self, exc: BaseException | None) -> None:
        self.relay.fail("data connection lost" if exc is None else f"error: {exc}")

    def on_pause(self) -> None:
        self.relay.congested = True

    def on_resume(self) -> None:
        self.relay.congested = False


class DatagramRelay(Completion):
    """Relay UDP side `a` <-> data connection `b`, one datagram per chunk. `done` (or
    `on_done`) says when the flow is over; the data connection may outlive it a little,
    until the peer's end marker comes."""

    __slots__ = (
        "a", "b", "result", "counters", "idle_timeout", "on_idle", "datagrams_up",
        "datagrams_down", "dropped", "congested", "ended", "sent_end", "got_end",
        "released", "leftover", "peer_node", "limits", "_out", "_out_bytes", "_timer",
        "_loop",
    )  # fmt: skip

    def __init__(
        self,
        a: DatagramEnd,
        b: Link,
        counters: FlowCounters,
        idle_timeout: float,
        on_idle: Callable[[Link], None] | None = None,
        peer_node: str = "the other node",
        limits: RateLimits | None = None,
    ) -> None:
        """The flow may be over when this returns (check `ended`): what `b` holds
        already (an end marker, a bad chunk, its EOF) is handled at once."""
        self.a = a
        self.limits = limits
        self.peer_node = peer_node  # who ends the flow with its end marker, for the log
        self.b = b
        self.result = RelayResult()
        self._init_completion()
        self.counters = counters
        self.idle_timeout = idle_timeout
        self.on_idle = on_idle
        self.datagrams_up = self.datagrams_down = self.dropped = 0
        self.congested = False  # b's write buffer is full: datagrams up are dropped
        self.ended = False  # the flow is over
        self.sent_end = self.got_end = False
        self.released = False  # b was handed on or dropped
        self.leftover = b""
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(
            idle_timeout, self._check_idle
        )
        b.move_to_socket()
        b.attach(_DataSide(self))  # last: it replays what b holds, which may end the flow

    # ---- datagrams -----------------------------------------------------------------------

    def send_up(self, payload: bytes) -> None:
        """A datagram from the UDP side: into the data connection, at the end of this
        loop turn with the others read in it; dropped (counted) if it cannot go. (Per
        datagram, only what must be: it is counted with the others as they are written.)"""
        if self.ended:
            return
        size = len(payload)
        if not size:
            self.drop("empty")  # the end marker's length: it cannot cross
            return
        if self.congested or size > MAX_DATAGRAM:
            self.drop("queue_full")
            return
        if self.limits is not None and not admit(self.limits.up, size, time.monotonic()):
            self.drop("rate_limited")
            return
        out = self._out
        if not out:
            self._loop.call_soon(self._flush)
        out.append(_header(size))
        out.append(payload)
        self._out_bytes += size
        if self._out_bytes >= FLUSH_AT:
            self._flush()

    def sent_ahead(self, size: int, up: bool = True) -> None:
        """Count a datagram moved before the relay began: behind OPEN (`up`, on the
        LL), or from there to the server (on the agent)."""
        c = self.counters
        if up:
            self.datagrams_up += 1
            self.result.bytes_a_to_b += size
            datagrams, counted = c.datagrams_up, c.bytes_up
        else:
            self.datagrams_down += 1
            self.result.bytes_b_to_a += size
            datagrams, counted = c.datagrams_down, c.bytes_down
        if datagrams is not None:
            datagrams.inc()
        if counted is not None:
            counted.inc(size)

    def _flush(self) -> None:
        out = self._out
        if not out or self.sent_end:
            return
        count, size = len(out) // 2, self._out_bytes
        self._out, self._out_bytes = [], 0
        self.b.write(b"".join(out))
        self.datagrams_up += count
        self.result.bytes_a_to_b += size
        self.result.last_activity = time.monotonic()
        c = self.counters
        if c.datagrams_up is not None:
            c.datagrams_up.inc(count)
        if c.bytes_up is not None:
            c.bytes_up.inc(size)

    def deliver(self, datagrams: list[bytes]) -> None:
        """Datagrams from the data connection, to the UDP side."""
        a, c = self.a, self.counters
        sent = size = 0
        limits = self.limits.down if self.limits is not None else ()
        now = time.monotonic()
        for payload in datagrams:
            if limits and not admit(limits, len(payload), now):
                self.drop("rate_limited")
                continue
            try:
                a.send(payload)
            except OSError:  # its socket buffer is full, or the server refused it
                self.drop("send_failed")
                continue
            sent += 1
            size += len(payload)
        if not sent:
            return
        self.datagrams_down += sent
        self.result.bytes_b_to_a += size
        self.result.last_activity = now
        if c.datagrams_down is not None:
            c.datagrams_down.inc(sent)
        if c.bytes_down is not None:
            c.bytes_down.inc(size)

    def drop(self, reason: str) -> None:
        self.dropped += 1
        if self.counters.drop is not None:
            self.counters.drop(reason)

    # ---- the end -------------------------------------------------------------------------

    def _check_idle(self) -> None:
        self._timer = None
        if self.ended:
            return
        idle = time.monotonic() - self.result.last_activity
        if idle >= self.idle_timeout:
            self.finish(f"idle for {self.idle_timeout:g} s")
        else:
            self._timer = self._loop.call_later(self.idle_timeout - idle, self._check_idle)

    def finish(self, reason: str) -> None:
        """End the flow: the end marker goes to the peer, and the data connection is
        reused once the peer's has come."""
        if not self.ended:
            self.ended = True
            self.result.ended = reason
            self._cancel_timer()
            self._flush()
            self.b.write(END)
            self.sent_end = True
            self.a.abort()
            self._settle()
        if self.released:
            return
        if self.got_end:
            self._release()
        elif self._timer is None:
            self._timer = self._loop.call_later(END_WAIT, self._end_not_answered)

    def _end_not_answered(self) -> None:
        self._timer = None
        if not self.released:
            self.released = True
            self.b.abort()

    def _release(self) -> None:
        self.released = True
        self._cancel_timer()
        b = self.b
        b.resume_reading()
        b.detach(self.leftover, eof=b.got_eof)
        if self.on_idle is not None and not b.got_eof and not b.is_closed:
            self.on_idle(b)
        else:
            b.close()

    def fail(self, reason: str) -> None:
        """End the flow now and drop the data connection."""
        if self.released:
            return
        self.released = True
        self._cancel_timer()
        self.b.handler = Ignoring()
        self.b.abort()
        if not self.ended:
            self.ended = True
            if self.result.ended == "closed":  # a caller may have said why first
                self.result.ended = reason
            self.a.abort()
            self._settle()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """End the flow now (drain, revocation, a lost peer node)."""
        self.fail("closed")
