"""A node's resumable streams: which exist, which wait for a new data connection, for
how long, and how much they hold while they wait.

Both nodes keep one. A stream starts waiting when its data connection breaks
(`ResumableRelay.on_broken`); it stops when a new one is attached (`resumed`), or is
given up when its window passes or, oldest first, when the streams waiting hold more
than `memory_cap` bytes of retention in all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from tcpgc.metrics import Metrics
from tcpgc.relay.resumable import ResumableRelay
from tcpgc.task_set import NO_CONTEXT


def waiting_for(relay: object, now: float) -> float | None:
    """How long `relay` has waited for a resume (rounded for a status page), or None
    if it is not waiting (or cannot)."""
    since = getattr(relay, "waiting_since", None)
    return None if since is None else round(now - since, 1)


class ResumeTable:
    """The resumable streams of one node, by stream id."""

    def __init__(self, log: logging.Logger, metrics: Metrics, memory_cap: int) -> None:
        self._log = log
        self._metrics = metrics
        self.memory_cap = memory_cap
        self._live: dict[bytes, ResumableRelay] = {}
        #: Waiting streams in the order they began to wait, with their window's timer.
        self._waiting: dict[ResumableRelay, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[ResumableRelay]:
        return iter(list(self._live.values()))

    def add(self, relay: ResumableRelay) -> None:
        self._live[relay.stream_id] = relay

    def find(self, stream_id: bytes) -> ResumableRelay | None:
        return self._live.get(stream_id)

    def waiting(self) -> list[ResumableRelay]:
        return list(self._waiting)

    def held(self) -> int:
        """Bytes the waiting streams retain."""
        return sum(relay.out.kept for relay in self._waiting)

    def forget(self, relay: ResumableRelay) -> None:
        """`relay` is over: drop it (its node's `on_done`)."""
        if self._live.get(relay.stream_id) is relay:
            del self._live[relay.stream_id]
        self._stop_waiting(relay)

    def broken(self, relay: ResumableRelay, reason: str) -> None:
        """`relay` lost its data connection and waits for another (its `on_broken`)."""
        if relay in self._waiting:
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(relay.window, self._expire, relay, context=NO_CONTEXT)
        self._waiting[relay] = timer
        self._metrics.waiting.set(len(self._waiting))
        self._log.info(
            "%s waits up to %g s for its agent to resume (%s)", relay.label, relay.window, reason
        )
        self._enforce_cap()

    def resumed(self, relay: ResumableRelay, service: str, pause: float, replayed: int) -> None:
        self._stop_waiting(relay)
        self._metrics.child(self._metrics.resumed, service).inc()
        self._metrics.replayed.inc(replayed)
        self._log.info("%s resumed after %.2f s: %d bytes replayed", relay.label, pause, replayed)

    def refused(self, reason: str) -> None:
        self._metrics.child(self._metrics.resumes_failed, reason).inc()

    def give_up(self, relay: ResumableRelay, why: str, reason: str) -> None:
        """End a waiting stream for good: one log line, one count."""
        self._stop_waiting(relay)
        self._log.warning("%s %s: closing it", relay.label, why)
        self.refused(reason)
        relay.expire(why)

    def give_up_all(self, why: str) -> None:
        for relay in list(self._waiting):
            self.give_up(relay, why, "closed")

    def _expire(self, relay: ResumableRelay) -> None:
        if relay in self._waiting:
            self.give_up(relay, f"not resumed within {relay.window:g} s", "window")

    def _enforce_cap(self) -> None:
        held = self.held()
        while held > self.memory_cap and self._waiting:
            oldest = next(iter(self._waiting))
            held -= oldest.out.kept
            self.give_up(
                oldest,
                f"given up while waiting: streams waiting held over resume_memory "
                f"({self.memory_cap} bytes)",
                "memory",
            )

    def _stop_waiting(self, relay: ResumableRelay) -> None:
        timer = self._waiting.pop(relay, None)
        if timer is not None:
            timer.cancel()
            self._metrics.waiting.set(len(self._waiting))

    @staticmethod
    def pause_of(relay: ResumableRelay) -> float:
        """How long `relay` has been waiting."""
        since = relay.waiting_since
        return 0.0 if since is None else time.monotonic() - since
