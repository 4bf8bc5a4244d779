"""The splice engine: a zero-copy relay for plain TCP, socket → pipe → socket with
splice(2) (Linux). The one module, with `tcpgc.relay.chunked_splice`, that imports
Linux-only names (`fcntl`, `os.splice`); `tcpgc.relay.factory` loads it only where they
exist.

The bytes never enter Python: each direction splices from its source socket into a
pipe and from the pipe into its destination, driven by the event loop's readiness
callbacks. Back-pressure is the pipe itself: while the destination cannot take more,
the pipe stays full and the source is not read. A pipe is taken from a shared pool only
while bytes are in flight and returned as soon as it is empty, so idle connections hold
no pipe file descriptors.

Under rate limits each direction is a `LimitedDirection`: it splices at most its
smallest bucket's burst per call and stops reading its source while the buckets are
owed (see `tcpgc.relay.rate_limit`); unlimited directions are untouched.

Only for links without TLS (`--insecure-plaintext`, classic mode, and the client and
server legs); TLS records have to be decrypted in user space anyway.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import Callable
from typing import cast

from tcpgc.protocol.chunks import chunk_header
from tcpgc.relay.rate_limit import RateLimits, Throttle
from tcpgc.relay.result import RESET_ERRNOS, ByteCounter, ByteTally, Completion, RelayResult
from tcpgc.transport.link import Link
from tcpgc.transport.socket_handover import hand_over
from tcpgc.transport.socket_transport import reset_on_close

#: Whether this system has what the engine needs (Linux; os.splice since Python 3.10).
AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")

#: Bytes moved per splice call and the pipe size. Measured on loopback with iperf3:
#: 64 KiB pipes gave 4.7 Gbit/s, 1 MiB 11-19 Gbit/s, larger no better. A pipe is held
#: only while its bytes are in flight, so the size costs nothing for idle connections.
CHUNK = 1024 * 1024
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def _pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 64 * 1024


class PipePool:
    """Idle pipes, reused across connections and directions."""

    def __init__(self, keep: int = 64) -> None:
        self._idle: list[tuple[int, int]] = []
        self._keep = keep
        self.in_use = 0
        self.size = CHUNK

    def take(self) -> tuple[int, int]:
        self.in_use += 1
        if self._idle:
            return self._idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:
            # Above this user's limit: the system's maximum, from now on.
            self.size = min(self.size, _pipe_max_size())
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
            except OSError:
                pass  # a default 64 KiB pipe still works, with more wake-ups
        return r, w

    def give_back(self, pipe: tuple[int, int]) -> None:
        self.in_use -= 1
        if len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


PIPES = PipePool()


class SpliceDirection(ByteTally):
    """src → pipe → dst, for one direction of the relay, counting what it moves. The
    chunked splice engine (`tcpgc.relay.chunked_splice`) derives its two directions
    from it."""

    #: Each batch goes out as a chunk (`tcpgc.protocol.chunks`): see `tcpgc.relay.chunked_splice`.
    chunked = False
    #: Bytes spliced from the source per call.
    chunk = CHUNK

    def __init__(
        self,
        relay: SpliceRelay,
        src: socket.socket,
        dst: socket.socket,
        prefix: bytes,
        eof: bool,
        a_to_b: bool,
        counter: ByteCounter | None,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(relay.result, a_to_b, counter)
        #: Called once, before this direction's first bytes are counted (classic mode's
        #: agent learns so that its LL has paired it with a client).
        self.on_first = on_first
        self.relay = relay
        self.src = src
        self.dst = dst
        self.prefix = prefix  # bytes read before the relay began, sent first
        self.header = b""  # a chunk header due before the prefix or the pipe (not counted)
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        self.eof = eof  # src has ended
        self.done = False  # EOF delivered to dst
        self.reading = False
        self.writing = False

    def add(self, n: int) -> None:
        if self.on_first is not None:
            on_first, self.on_first = self.on_first, None
            on_first()
        super().add(n)

    def start(self) -> None:
        if self.header or self.prefix or self.eof:
            self._flush()
        else:
            self._read_on()

    # readiness plumbing: one reader and one writer callback per fd is what asyncio allows,
    # and the two directions use opposite roles of each socket.
    def _read_on(self) -> None:
        if not self.reading and not self.eof and not self.relay.finished:
            self.reading = True
            self.relay.loop.add_reader(self.src.fileno(), self._readable)

    def _read_off(self) -> None:
        if self.reading:
            self.reading = False
            fd = self.src.fileno()
            if fd != -1:  # -1: closed under us (a lent socket whose link was closed)
                self.relay.loop.remove_reader(fd)

    def _write_on(self) -> None:
        if not self.writing:
            self.writing = True
            self.relay.loop.add_writer(self.dst.fileno(), self._flush)

    def _write_off(self) -> None:
        if self.writing:
            self.writing = False
            fd = self.dst.fileno()
            if fd != -1:
                self.relay.loop.remove_writer(fd)

    def _readable(self) -> None:
        if self.pipe is None:
            self.pipe = PIPES.take()
        try:
            n = os.splice(self.src.fileno(), self.pipe[1], self.chunk, flags=SPLICE_FLAGS)
        except BlockingIOError:
            self._release_if_empty()
            return
        except OSError as exc:
            self.relay.failed(exc, reset=exc.errno in RESET_ERRNOS)
            return
        if n == 0:
            self.eof = True
            self._read_off()
        else:
            self.in_pipe += n
            if self.chunked:
                self.header = chunk_header(n)
        self._flush()

    def _flush(self) -> None:
        try:
            if self.header:
                # Held back (MSG_MORE) when its chunk follows: header and bytes then
                # leave in one segment, and the peer wakes once for both.
                more = socket.MSG_MORE if self.prefix or self.in_pipe else 0
                sent = self.dst.send(self.header, more)
                self.header = self.header[sent:]
                if self.header:
                    raise BlockingIOError
            if self.prefix:
                sent = self.dst.send(self.prefix)
                self.add(sent)
                self.prefix = self.prefix[sent:]
            while self.in_pipe and not self.prefix:
                assert self.pipe is not None
                n = os.splice(self.pipe[0], self.dst.fileno(), self.in_pipe, flags=SPLICE_FLAGS)
                self.in_pipe -= n
                self.add(n)
        except BlockingIOError:
            pass
        except OSError as exc:
            self.relay.failed(exc, reset=exc.errno in RESET_ERRNOS)
            return
        if self.header or self.prefix or self.in_pipe:
            # dst is full: stop reading src until it drains (back-pressure).
            self._read_off()
            self._write_on()
            return
        self._write_off()
        self._release_if_empty()
        if self.eof:
            self._deliver_eof()
        else:
            self._read_on()

    def _release_if_empty(self) -> None:
        if self.pipe is not None and self.in_pipe == 0:
            PIPES.give_back(self.pipe)
            self.pipe = None

    def _deliver_eof(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.relay.direction_done()

    def stop(self) -> None:
        self._read_off()
        self._write_off()
        if self.pipe is not None:
            # Bytes still in the pipe are dropped with it: close it, never reuse it.
            PIPES.in_use -= 1
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


class LimitedDirection(SpliceDirection):
    """A direction under rate limits (`limit` is called once, before `start`)."""

    throttle: Throttle

    def limit(self, limits: RateLimits, up: bool) -> None:
        self.throttle = limits.throttle(up, self._read_off, self._resume)

    @property
    def chunk(self) -> int:  # type: ignore[override]
        # At most a burst per call: a 1 MiB splice would be a 1 MiB burst.
        return min(CHUNK, self.throttle.smallest_burst())

    def add(self, n: int) -> None:
        super().add(n)
        self.throttle.moved(n)

    def _read_on(self) -> None:
        if not self.throttle.waiting:
            super()._read_on()

    def _resume(self) -> None:
        if not (self.header or self.prefix or self.in_pipe):  # else once dst drains
            super()._read_on()

    def stop(self) -> None:
        self.throttle.stop()
        super().stop()


class SpliceRelay(Completion):
    """Same interface as `tcpgc.relay.copy.CopyRelay`, moving bytes with splice(2).
    Both links must be able to hand their socket over (`socket_handover.can_hand_over`)."""

    def __init__(
        self,
        a: Link,
        b: Link,
        count_a_to_b: ByteCounter | None = None,
        count_b_to_a: ByteCounter | None = None,
        on_first_b_to_a: Callable[[], None] | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self._init_relay(a, b)
        handed_a = hand_over(a)
        try:
            handed_b = hand_over(b)
        except BaseException:  # no descriptor for b's duplicate: a's socket is ours now
            if handed_a is not None:
                handed_a[0].close()
            raise
        assert handed_a is not None and handed_b is not None
        self._sa, prefix_a, eof_a = handed_a
        self._sb, prefix_b, eof_b = handed_b
        kind = SpliceDirection if limits is None else LimitedDirection
        self._directions: tuple[SpliceDirection, ...] = (
            kind(self, self._sa, self._sb, prefix_a, eof_a, True, count_a_to_b),
            kind(self, self._sb, self._sa, prefix_b, eof_b, False, count_b_to_a, on_first_b_to_a),
        )
        if limits is not None:
            for direction in self._directions:
                cast(LimitedDirection, direction).limit(limits, direction.a_to_b)
        for direction in self._directions:
            direction.start()

    def _init_relay(self, a: Link, b: Link) -> None:
        self.a = a
        self.b = b
        self.loop = asyncio.get_running_loop()
        self.result = RelayResult()
        self._init_completion()
        self.finished = False

    def direction_done(self) -> None:
        if all(d.done for d in self._directions):
            self._finish("closed")

    def failed(self, exc: OSError, reset: bool) -> None:
        self._finish("reset" if reset else f"error: {exc.strerror or exc}", reset=reset)

    def close(self) -> None:
        """End both directions now (e.g. idle timeout)."""
        self._finish(self.result.ended if self.result.ended != "closed" else "closed early")

    def _finish(self, ended: str, reset: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        if self.result.ended == "closed":
            self.result.ended = ended
        for direction in self._directions:
            direction.stop()
        self._close_sockets(reset)
        self._settle()

    def _close_sockets(self, reset: bool) -> None:
        close_socket(self._sa, reset)
        close_socket(self._sb, reset)


def close_socket(sock: socket.socket, reset: bool) -> None:
    """Close a socket the engine took; with a TCP RST if `reset`, so each peer sees the
    reset the other side saw."""
    if reset:
        reset_on_close(sock)
    sock.close()
