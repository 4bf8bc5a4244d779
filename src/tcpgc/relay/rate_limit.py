"""Bandwidth limits on relays: token buckets, the buckets a relay answers to, and the
pause they impose on one direction's source.

A `TokenBucket` holds up to a burst of bytes and refills at its rate. A relay takes
the bytes it has moved *after* moving them, which may take the bucket below zero (a
debt); the relay then stops reading that direction's source until the debt is paid.
So a reader is never asked how much it may read (the copy engines cannot say: a socket
read returns what it returns), and the rate over time is the bucket's. Buckets are
shared: one per service and direction, one per client connection, one per agent; a
relay waits for the slowest of its buckets.

Time is a parameter (`now`), so the buckets are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tcpgc.task_set import NO_CONTEXT

#: A bucket holds this much time's worth of bytes: enough for TCP to keep a steady
#: flow between pauses, too little to let a client exceed its rate visibly.
BURST_SECONDS = 0.05
#: ... and at least this much, so a slow limit still lets a few full segments go at once.
MIN_BURST = 16 * 1024


class TokenBucket:
    """A rate in bits per second, as bytes that may be moved now (negative: owed)."""

    __slots__ = ("bits_per_s", "bytes_per_s", "burst", "level", "stamp")

    def __init__(self, bits_per_s: float, now: float | None = None) -> None:
        self.level = float("inf")  # a new bucket is full (reconfigure caps it)
        self.reconfigure(bits_per_s)
        self.stamp = time.monotonic() if now is None else now

    def reconfigure(self, bits_per_s: float) -> None:
        """A new rate from now on (a reload); what is held or owed stays, within the
        new burst."""
        if bits_per_s <= 0:
            raise ValueError(f"a rate must be positive, got {bits_per_s}")
        self.bits_per_s = float(bits_per_s)
        self.bytes_per_s = bits_per_s / 8
        self.burst = max(self.bytes_per_s * BURST_SECONDS, MIN_BURST)
        self.level = min(self.level, self.burst)

    def take(self, n: int, now: float) -> float:
        """Count `n` bytes moved at `now`; the seconds to wait before moving more
        (0.0: none)."""
        level = self.level + (now - self.stamp) * self.bytes_per_s
        if level > self.burst:
            level = self.burst
        level -= n
        self.level = level
        self.stamp = now
        return 0.0 if level >= 0 else -level / self.bytes_per_s


def admit(buckets: Sequence[TokenBucket], n: int, now: float) -> bool:
    """Whether `n` bytes of a datagram fit in every bucket now; if so they are taken.
    A datagram over the rate is dropped, not delayed (policing, where a stream is
    paused): it is never taken in part, and never puts a bucket in debt."""
    for bucket in buckets:
        level = bucket.level + (now - bucket.stamp) * bucket.bytes_per_s
        if min(level, bucket.burst) < n:
            return False
    for bucket in buckets:
        bucket.take(n, now)
    return True


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The buckets a relay answers to, per direction: `up` for what the client (the
    plain side `a`) sends, `down` for what it receives. `+` combines two sets (a
    service's, a client's, an agent's). `on_limited` is called each time a direction
    pauses for them (a metric)."""

    up: tuple[TokenBucket, ...] = field(default=())
    down: tuple[TokenBucket, ...] = field(default=())
    on_limited: Callable[[], None] | None = None

    @classmethod
    def of(cls, bits_per_s: float) -> RateLimits:
        """One bucket each way, of the same rate."""
        return cls((TokenBucket(bits_per_s),), (TokenBucket(bits_per_s),))

    def __add__(self, other: RateLimits | None) -> RateLimits:
        if other is None:
            return self
        on_limited = self.on_limited if self.on_limited is not None else other.on_limited
        return RateLimits(self.up + other.up, self.down + other.down, on_limited)

    def __radd__(self, other: RateLimits | None) -> RateLimits:
        return self if other is None else other + self

    def __bool__(self) -> bool:
        return bool(self.up or self.down)

    def throttle(self, up: bool, pause: Callable[[], None], resume: Callable[[], None]) -> Throttle:
        """The throttle of one direction (`up`: a to b), pausing and resuming its source."""
        return Throttle(self.up if up else self.down, pause, resume, self.on_limited)

    def reconfigure(self, bits_per_s: float) -> None:
        """Every bucket to this rate (a service's limit changed on reload)."""
        for bucket in self.up + self.down:
            bucket.reconfigure(bits_per_s)


def combine(*limits: RateLimits | None) -> RateLimits | None:
    """The limits together, or None if there are none (an unlimited relay)."""
    out = RateLimits()
    for one in limits:
        out = out + one
    return out or None


#: The longest a paused source waits before its buckets are looked at again.
MAX_WAIT = 0.5


class Throttle:
    """One direction of a limited relay: after it moves bytes (`moved`), its source is
    paused for as long as the slowest bucket says. Back-pressure, which pauses the same
    source, goes through `block`/`unblock` so that neither lifts the other's pause.

    `pause` and `resume` act on the source; `on_limited` is told each time a pause
    begins (a metric)."""

    __slots__ = ("buckets", "pause", "resume", "on_limited", "timer", "blocked", "stopped")

    def __init__(
        self,
        buckets: Sequence[TokenBucket],
        pause: Callable[[], None],
        resume: Callable[[], None],
        on_limited: Callable[[], None] | None = None,
    ) -> None:
        self.buckets = tuple(buckets)
        self.pause = pause
        self.resume = resume
        self.on_limited = on_limited
        self.timer: asyncio.TimerHandle | None = None
        self.blocked = False
        self.stopped = False

    @property
    def waiting(self) -> bool:
        """The source is paused for the rate."""
        return self.timer is not None

    def smallest_burst(self) -> int:
        return int(min((bucket.burst for bucket in self.buckets), default=MIN_BURST))

    def moved(self, n: int) -> None:
        if not self.buckets or self.stopped:
            return
        now = time.monotonic()
        delay = max(bucket.take(n, now) for bucket in self.buckets)
        if delay <= 0:
            return
        if self.timer is None:
            self.pause()
            if self.on_limited is not None:
                self.on_limited()
        else:
            self.timer.cancel()  # more was owed since: wait for all of it
        self._wait(delay)

    def _wait(self, delay: float) -> None:
        # Looked at again at least every MAX_WAIT: a limit a reload raises or lifts
        # frees the source then, not after what the old rate made it owe.
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(min(delay, MAX_WAIT), self._due, context=NO_CONTEXT)

    def _due(self) -> None:
        self.timer = None
        if self.stopped:
            return
        delay = max(bucket.take(0, time.monotonic()) for bucket in self.buckets)
        if delay > 0:
            self._wait(delay)
        elif not self.blocked:
            self.resume()

    def block(self) -> None:
        """Back-pressure: the destination is full."""
        self.blocked = True
        self.pause()

    def unblock(self) -> None:
        self.blocked = False
        if self.timer is None and not self.stopped:
            self.resume()

    def stop(self) -> None:
        """The relay is over: no more resumes (its links may serve someone else)."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
