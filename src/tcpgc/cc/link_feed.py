"""The asyncio side of a sans-I/O core on a link: every byte read goes into the core at
once, whatever the core answers is written at once, and its events wait for the
driver, which also keeps the core's deadline.

Reading stops while the peer does not read what we send: every PING read makes a PONG
written, and a peer that sends and never reads would otherwise make us buffer answers
without limit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from tcpgc.transport.link import Link

E = TypeVar("E")


class LinkFeed(Generic[E]):
    """The handler of a link whose bytes a core reads (`receive`, b"" at the end) and
    whose answers it takes (`take_output`)."""

    def __init__(
        self, link: Link, receive: Callable[[bytes], list[E]], take_output: Callable[[], bytes]
    ) -> None:
        self.link = link
        self._receive = receive
        self._take_output = take_output
        self._events: list[E] = []
        self._wakeup = asyncio.Event()
        #: The peer closed its side (as a clean end of stream, not a loss).
        self.eof = False
        self._ended = False
        link.attach(self)

    def flush(self) -> None:
        """Write what the core has to send."""
        out = self._take_output()
        if out:
            self.link.write(out)

    async def events(self, deadline: float | None) -> list[E]:
        """The core's events so far, waiting for some until `deadline` (loop time); an
        empty list when the deadline came first: the caller's turn to run the timer."""
        if not self._events:
            self._wakeup.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wakeup.wait()
            except TimeoutError:
                return []
        events, self._events = self._events, []
        return events

    def _feed(self, data: bytes) -> None:
        self._events += self._receive(data)
        self.flush()
        if self._events:
            self._wakeup.set()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._feed(b"")

    # LinkHandler
    def on_data(self, data: bytes) -> None:
        self._feed(data)

    def on_eof(self) -> None:
        self.eof = True
        self._end()

    def on_lost(self, exc: BaseException | None) -> None:
        self._end()

    def on_pause(self) -> None:
        self.link.pause_reading()

    def on_resume(self) -> None:
        self.link.resume_reading()
