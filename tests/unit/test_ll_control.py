"""The driver of an agent's control session (`tcpgc.ll.control.ControlDriver`) on a real
event loop, over a stand-in link: it passes bytes both ways, hands events on, arms the
session's deadlines as loop timers, and stops reading a peer that reads nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from tcpgc.ll.control import ControlDriver
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.ll_session import Event, LLControlSession, OpenRefused, SessionEnded
from tcpgc.protocol.messages import Message, Open, OpenFailed, Ping, Pong, encode

HEARTBEAT = 0.05


class StandInLink:
    """What the driver uses of a Link: its handler slot, writes, reading paused."""

    def __init__(self) -> None:
        self.handler: Any = None
        self.written = bytearray()
        self.reading_paused = False

    def attach(self, handler: Any) -> None:
        self.handler = handler

    def write(self, data: bytes, prefix: bytes = b"") -> None:
        self.written += prefix + data

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def sent(self) -> list[Message]:
        decoder = FrameDecoder()
        decoder.receive_data(bytes(self.written))
        out = []
        while (message := decoder.next_message()) is not None:
            out.append(message)
        return out


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _driver(received: bytes = b"") -> tuple[StandInLink, ControlDriver, list[Event]]:
    link = StandInLink()
    session = LLControlSession(
        agent_id="a1", peer="192.0.2.1:9", heartbeat=HEARTBEAT,
        now=asyncio.get_running_loop().time(), received=received,
    )  # fmt: skip
    events: list[Event] = []
    driver = ControlDriver(link, session, events.append)  # type: ignore[arg-type]
    assert link.handler is driver
    return link, driver, events


def test_bytes_both_ways_and_events_handed_on() -> None:
    async def scenario() -> None:
        link, driver, events = _driver(received=encode(Ping(1)))
        assert link.sent() == [Pong(1)]  # what was read past the handshake is served
        driver.on_data(encode(OpenFailed(b"\x01" * 16, "server down")))
        assert events == [OpenRefused(b"\x01" * 16, "agent could not serve it: server down")]
        driver.offer(Open(b"\x02" * 16, "web"))
        assert link.sent()[-1] == Open(b"\x02" * 16, "web")
        driver.on_eof()
        assert isinstance(events[-1], SessionEnded) and not events[-1].warning
        driver.stop()

    asyncio.run(scenario())


def test_pings_then_silence_ends_the_session() -> None:
    async def scenario() -> None:
        link, driver, events = _driver()
        await _until(lambda: bool(events))
        pings = [m for m in link.sent() if isinstance(m, Ping)]
        # Two on time; a loop slowed by a busy machine may have fit in only one.
        assert pings in ([Ping(0)], [Ping(0), Ping(1)])
        [ended] = events
        assert isinstance(ended, SessionEnded) and ended.by_heartbeat
        assert "silent for 0 s" in ended.reason
        assert driver._timer is None  # nothing left to wake

    asyncio.run(scenario())


def test_a_peer_that_reads_nothing_is_not_read_and_dropped_as_such() -> None:
    async def scenario() -> None:
        link, driver, events = _driver()
        driver.on_pause()
        assert link.reading_paused
        await _until(lambda: bool(events))
        [ended] = events
        assert isinstance(ended, SessionEnded) and "reads nothing we send" in ended.reason

    asyncio.run(scenario())


def test_reading_resumes_with_the_peer() -> None:
    async def scenario() -> None:
        link, driver, _ = _driver()
        driver.on_pause()
        driver.on_resume()
        assert not link.reading_paused and not driver.session.write_blocked
        driver.stop()

    asyncio.run(scenario())


def test_no_new_timer_for_every_message() -> None:
    async def scenario() -> None:
        link, driver, events = _driver()
        timer = driver._timer
        assert timer is not None
        for token in range(100):
            driver.on_data(encode(Ping(token)))
        assert driver._timer is timer
        assert len(link.sent()) == 100 and not events
        driver.stop()

    asyncio.run(scenario())


def test_a_deadline_already_past_on_uvloop() -> None:
    """uvloop's `call_at` for a time already past returns a plain Handle (no `when()`):
    the driver must still re-arm and fire, as it does when a flood delays the loop."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed here")

    async def scenario() -> None:
        link = StandInLink()
        session = LLControlSession(
            agent_id="a1", peer="192.0.2.1:9", heartbeat=HEARTBEAT,
            now=asyncio.get_running_loop().time() - 10,  # every deadline already past
        )  # fmt: skip
        events: list[Event] = []
        driver = ControlDriver(link, session, events.append)  # type: ignore[arg-type]
        driver.on_data(encode(Ping(1)))  # re-arms against the timer set for the past
        assert Pong(1) in link.sent()
        await _until(lambda: bool(events))
        [ended] = events
        assert isinstance(ended, SessionEnded) and ended.by_heartbeat

    uvloop.run(scenario())
