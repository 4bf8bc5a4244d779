"""The nodes' log set-up: line formats, and lines written once per loop turn."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest

from loops import LOOPS, loop_turns, run_on
from tcpgc.ops.logs import JsonFormatter, TextFormatter, TurnFlushedHandler


def _record(message: str, created: float) -> logging.LogRecord:
    record = logging.LogRecord("tcpgc.ll", logging.INFO, "", 0, message, (), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000)
    return record


def test_text_lines_are_those_of_loggings_default_formatter() -> None:
    ours = TextFormatter()
    stdlib = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1)) + 0.625
    # Within a second (its text cached), across seconds and minutes.
    for created in (start, start + 0.25, start + 1, start + 61.125, start + 3600):
        record = _record("client done", created)
        assert ours.format(record) == stdlib.format(record)
    assert ours.format(_record("x", start)).startswith("2026-01-02 03:04:05,625 INFO tcpgc.ll: x")


def test_json_lines_carry_utc_time_with_milliseconds() -> None:
    created = 1_767_323_045.25  # 2026-01-02T03:04:05.250Z
    entry = json.loads(JsonFormatter().format(_record("client done", created)))
    assert entry == {
        "time": "2026-01-02T03:04:05.250Z",
        "level": "info",
        "logger": "tcpgc.ll",
        "message": "client done",
    }


def _handler() -> tuple[TurnFlushedHandler, io.BytesIO]:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(io.BufferedWriter(raw, 64 * 1024), encoding="utf-8")  # type: ignore[arg-type]
    handler = TurnFlushedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler, raw


@pytest.mark.parametrize("loop_name", LOOPS)
def test_lines_logged_in_one_turn_are_written_together_at_the_next(loop_name: str) -> None:
    async def main() -> None:
        handler, raw = _handler()
        for i in range(3):
            handler.handle(_record(f"line {i}", time.time()))
        assert raw.getvalue() == b""  # still in the buffer during this turn
        await loop_turns(2)
        assert raw.getvalue() == b"line 0\nline 1\nline 2\n"

    run_on(loop_name, main, 10)


def test_without_a_running_loop_each_line_is_written_at_once() -> None:
    handler, raw = _handler()
    handler.handle(_record("starting", time.time()))
    assert raw.getvalue() == b"starting\n"


def test_a_flush_still_due_when_the_loop_stops_is_done_at_close() -> None:
    handler, raw = _handler()

    async def log_and_stop() -> None:
        handler.handle(_record("last words", time.time()))

    asyncio.run(log_and_stop())  # the loop closes before its next turn
    handler.handle(_record("after", time.time()))  # no loop: written at once, in order
    assert raw.getvalue() == b"last words\nafter\n"
    handler.close()
    assert raw.getvalue() == b"last words\nafter\n"
