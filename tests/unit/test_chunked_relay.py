"""ChunkedCopyRelay's bookkeeping with stand-in links: pause state, end markers and EOFs
around the moment a data connection is handed to its next client. The bytes themselves
are checked through real nodes in test_reuse.py."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tcpgc.protocol.chunks import END, chunk_header
from tcpgc.protocol.replay_window import ReplayWindow
from tcpgc.relay.chunked_copy import ChunkedCopyRelay


class StandIn:
    """The part of `tcpgc.transport.link.Link` the relay uses, recording what is done to it."""

    def __init__(self, fills: bool = False) -> None:
        self.handler: Any = None
        self.paused = False
        self.events: list[object] = []
        self.fills = fills  # every write fills its buffer: the writer is paused
        self.got_eof = False
        self.is_closed = False
        self.detached: tuple[bytes, bool] | None = None

    def attach(self, handler: Any) -> None:
        self.handler = handler
        self.detached = None

    def move_to_socket(self) -> bool:
        return False  # no socket behind a stand-in

    def detach(self, leftover: bytes = b"", eof: bool = False) -> None:
        self.handler = None
        self.detached = (leftover, eof)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: bytes | memoryview, prefix: bytes = b"") -> None:
        if prefix:
            self.events.append(prefix)
        self.events.append(bytes(data))
        if self.fills and self.handler is not None:
            self.handler.on_pause()

    def write_eof(self) -> None:
        self.events.append("EOF")

    def close(self) -> None:
        self.events.append("CLOSE")

    def reset(self) -> None:
        self.events.append("RST")

    def abort(self) -> None:
        self.events.append("ABORT")


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test body in a fresh event loop (the relay makes futures)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def relay(a: StandIn, b: StandIn, idle: list[Any]) -> ChunkedCopyRelay:
    return ChunkedCopyRelay(a, b, on_idle=idle.append)  # type: ignore[arg-type]


@in_loop
async def test_late_resume_of_a_finished_client_does_not_unpause_the_next() -> None:
    client1, data = StandIn(fills=True), StandIn()
    idle: list[Any] = []
    relay(client1, data, idle)
    old_handler = client1.handler
    client1.handler.on_data(b"request")
    client1.handler.on_eof()
    data.handler.on_data(chunk_header(5) + b"hello" + END + b"POOL")
    assert idle == [data]
    assert not data.paused, "the data connection must be handed on reading"
    assert data.detached == (b"POOL", False)
    assert client1.events == [b"hello", "EOF", "CLOSE"]

    client2 = StandIn(fills=True)
    relay(client2, data, [])
    data.handler.on_data(chunk_header(3) + b"abc")  # client 2 is slow: data paused
    assert data.paused
    # Client 1's write buffer drains at last: its link tells its handler.
    assert client1.handler is not old_handler
    client1.handler.on_resume()
    assert data.paused, "client 1's late drain must not unpause client 2's reader"


@in_loop
async def test_eof_after_the_peers_end_but_before_ours_resets_both() -> None:
    server, data = StandIn(), StandIn()
    idle: list[Any] = []
    r = relay(server, data, idle)
    data.handler.on_data(chunk_header(2) + b"hi" + END)  # the LL's direction ended
    assert server.events == [b"hi", "EOF"]
    data.handler.on_eof()  # the LL closed before our direction ended
    assert r.done.done() and idle == []
    assert server.events[-1] == "RST" and data.events[-1] == "RST"


@in_loop
async def test_connection_that_saw_eof_is_not_reused() -> None:
    client, data = StandIn(), StandIn()
    idle: list[Any] = []
    relay(client, data, idle)
    client.handler.on_eof()
    data.got_eof = True  # EOF arrived together with the end marker
    data.handler.on_data(END)
    assert idle == []
    assert data.events[-1] == "CLOSE"


@in_loop
async def test_clean_end_reuses_without_reset() -> None:
    client, data = StandIn(), StandIn()
    idle: list[Any] = []
    r = relay(client, data, idle)
    client.handler.on_data(b"x" * 2000)
    client.handler.on_eof()
    data.handler.on_data(END)
    assert idle == [data] and r.result.ended == "closed"
    assert data.events == [chunk_header(2000), b"x" * 2000, END]
    assert "RST" not in client.events


@in_loop
async def test_on_done_set_after_the_end_is_still_called_once() -> None:
    """A relay can end while it is built (its link was already lost); the node sets
    `on_done` only afterwards, and must still hear of the end."""
    r = relay(StandIn(), StandIn(), [])
    r.fail("the client reset before its relay began", reset=True)
    calls: list[Any] = []
    r.on_done = calls.append
    await asyncio.sleep(0)
    assert calls == [r.result] and r.done.done()


@in_loop
async def test_on_done_set_before_the_end_is_called_once_at_the_end() -> None:
    r = relay(StandIn(), StandIn(), [])
    calls: list[Any] = []
    r.on_done = calls.append
    await asyncio.sleep(0)
    assert calls == []
    r.fail("closed", reset=False)
    r.fail("closed again", reset=False)
    await asyncio.sleep(0)
    assert calls == [r.result]


@pytest.mark.parametrize("jump", [2**31, 2**63])
def test_replay_window_takes_huge_jumps_at_once(jump: int) -> None:
    window = ReplayWindow()
    assert window.accept(5)
    assert window.accept(jump)
    assert not window.accept(jump)
    assert not window.accept(5)
    assert window.accept(jump - 1)
