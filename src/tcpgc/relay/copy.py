"""The copy engine: bytes between two links through Python, until both directions are
done. The portable path: TLS links, systems without splice(2) (macOS, BSD), and
`TCPGC_NO_SPLICE=1`.

The relay is two mirrored halves. Each half forwards what one side reads to the other:
data as data, EOF as a half-close (the other direction keeps flowing), a reset as a
reset. When a side's outgoing buffer passes its high-water mark, the side feeding it
stops reading until it drains, so a slow reader slows its writer instead of growing
our memory. Both links close once each direction has seen its EOF.
"""

from __future__ import annotations

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


class CopyRelay(Completion):
    """Relay `a` <-> `b`; `await relay.done` (or set `on_done`) for the result."""

    def __init__(
        self,
        a: Link,
        b: Link,
        count_a_to_b: ByteCounter | None = None,
        count_b_to_a: ByteCounter | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self.result = RelayResult()
        self._lost = 0
        self._init_completion()
        a.attach(_Half(self, a, b, True, count_a_to_b))
        b.attach(_Half(self, b, a, False, count_b_to_a))

    def side_lost(self) -> None:
        self._lost += 1
        if self._lost == 2:
            self._settle()

    def close(self) -> None:
        """End both directions now (e.g. idle timeout)."""
        self.a.close()
        self.b.close()
