"""The copy engine: bytes between two links through Python, until both directions are
done. The portable path: TLS links, systems without splice(2) (macOS, BSD), and
`TCPGC_NO_SPLICE=1`.

The relay is two mirrored halves. Each half forwards what one side reads to the other:
data as data, EOF as a half-close (the other direction keeps flowing), a reset as a
reset. When a side's outgoing buffer passes its high-water mark, the side feeding it
stops reading until it drains, so a slow reader slows its writer instead of growing
our memory. Both links close once each direction has seen its EOF.

Under rate limits (`tcpgc.relay.rate_limit`) each half is a `_LimitedHalf`: after it
forwards bytes, its source may pause for the rate, and back-pressure goes through the
same throttle so that neither lifts the other's pause. An unlimited relay pays nothing.
"""

from __future__ import annotations

from tcpgc.relay.rate_limit import RateLimits, Throttle
from tcpgc.relay.result import ByteCounter, ByteTally, Completion, RelayResult, is_reset
from tcpgc.transport.link import Link


class _Half(ByteTally):
    """Handler of `src`: forwards to `dst`, counting what it forwards."""

    __slots__ = ("relay", "src", "dst")

    def __init__(
        self, relay: CopyRelay, src: Link, dst: Link, a_to_b: bool, counter: ByteCounter | None
    ) -> None:
        super().__init__(relay.result, a_to_b, counter)
        self.relay = relay
        self.src = src
        self.dst = dst

    def on_data(self, data: bytes) -> None:
        self.add(len(data))
        self.dst.write(data)

    def on_eof(self) -> None:
        self.dst.write_eof()
        if self.dst.got_eof:
            # Both directions ended: close both once what is queued has been sent.
            self.src.close()
            self.dst.close()

    def on_lost(self, exc: BaseException | None) -> None:
        result = self.relay.result
        first = result.ended == "closed"  # the first explanation is the one to keep
        if is_reset(exc):
            if first:
                result.ended = "reset"
            self.dst.reset()
        else:
            if first and not (self.src.got_eof and self.dst.got_eof):
                result.ended = "closed early" if exc is None else f"error: {exc}"
            self.dst.close()
        self.relay.side_lost()

    def on_pause(self) -> None:
        # src cannot take more: stop reading what is written into it.
        self.dst.pause_reading()

    def on_resume(self) -> None:
        self.dst.resume_reading()


class _LimitedHalf(_Half):
    """A half under rate limits: `throttle` pauses its source, `other` is the half of
    the opposite direction (whose source back-pressure from ours pauses)."""

    __slots__ = ("throttle", "other")

    throttle: Throttle
    other: _LimitedHalf

    def add(self, n: int) -> None:
        super().add(n)
        self.throttle.moved(n)

    def on_pause(self) -> None:
        self.other.throttle.block()

    def on_resume(self) -> None:
        self.other.throttle.unblock()


class CopyRelay(Completion):
    """Relay `a` <-> `b`; `await relay.done` (or set `on_done`) for the result."""

    def __init__(
        self,
        a: Link,
        b: Link,
        count_a_to_b: ByteCounter | None = None,
        count_b_to_a: ByteCounter | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self.result = RelayResult()
        self._lost = 0
        self._init_completion()
        self._throttles: tuple[Throttle, ...] = ()
        if limits is None:
            a.attach(_Half(self, a, b, True, count_a_to_b))
            b.attach(_Half(self, b, a, False, count_b_to_a))
            return
        up = _LimitedHalf(self, a, b, True, count_a_to_b)
        down = _LimitedHalf(self, b, a, False, count_b_to_a)
        up.throttle = limits.throttle(True, a.pause_reading, a.resume_reading)
        down.throttle = limits.throttle(False, b.pause_reading, b.resume_reading)
        up.other, down.other = down, up
        self._throttles = (up.throttle, down.throttle)
        a.attach(up)
        b.attach(down)

    def side_lost(self) -> None:
        self._lost += 1
        if self._lost == 2:
            for throttle in self._throttles:
                throttle.stop()
            self._settle()

    def close(self) -> None:
        """End both directions now (e.g. idle timeout)."""
        self.a.close()
        self.b.close()
