"""Drives one agent's control session (`tcpgc.protocol.ll_session.LLControlSession`)
over its link: bytes read go in with the loop's time, bytes to send go out, and a
timer wakes the session at the deadline it asks for. Every decision is the session's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tcpgc.protocol.ll_session import Event, LLControlSession
from tcpgc.protocol.messages import Open
from tcpgc.transport.link import Link


class ControlDriver:
    """The handler of a control link after its handshake (a `LinkHandler`).

    Reading stops while the agent does not read what we send (the link's write buffer
    is past its high-water mark): every PING we read makes a PONG we write, and a peer
    that sends and never reads would otherwise make us buffer answers without limit.
    Its session then tells that apart from silence when the deadline passes."""

    def __init__(
        self, link: Link, session: LLControlSession, on_event: Callable[[Event], None]
    ) -> None:
        self.link = link
        self.session = session
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.Handle | None = None
        #: When `_timer` is due. Kept here: uvloop's `call_at` for a time already past
        #: returns a plain Handle, which has no `when()`.
        self._timer_at = 0.0
        #: The link was reset or failed (rather than closed by the agent): see
        #: `LLResumes.agent_let_go`.
        self.broken = False
        link.attach(self)  # replays what was read past the handshake
        self._after()

    # LinkHandler
    def on_data(self, data: bytes) -> None:
        self.session.receive_data(data, self._loop.time())
        self._after()

    def on_eof(self) -> None:
        self.session.receive_data(b"", self._loop.time())
        self._after()

    def on_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not self.link.got_eof:
            self.broken = True  # reset or failed: the network, not the agent letting go
        self.on_eof()

    def on_pause(self) -> None:
        self.session.write_blocked = True
        self.link.pause_reading()

    def on_resume(self) -> None:
        self.session.write_blocked = False
        self.link.resume_reading()

    def offer(self, open_message: Open) -> None:
        """Send OPEN: a client waits for this agent."""
        self.session.offer(open_message)
        self._after()

    def stop(self) -> None:
        """No more timers: the session is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _after(self) -> None:
        """Send what the session has to send, hand its events on, arm its timer."""
        data = self.session.data_to_send()
        if data:
            self.link.write(data)
        while (event := self.session.next_event()) is not None:
            self._on_event(event)
        deadline = self.session.next_deadline()
        if deadline is None:
            self.stop()
        elif self._timer is None or deadline < self._timer_at:
            # A timer due earlier than needed stays: it wakes the session, which does
            # nothing yet and asks again. No new timer for every message read.
            self.stop()
            self._timer = self._loop.call_at(deadline, self._fire)
            self._timer_at = deadline

    def _fire(self) -> None:
        assert self._timer is not None
        # The loop may run a timer up to its clock resolution early: it is due.
        now = max(self._loop.time(), self._timer_at)
        self._timer = None
        self.session.handle_timer(now)
        self._after()
