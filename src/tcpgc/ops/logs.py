"""Log set-up: readable lines by default, one JSON object per line for log shippers.

A node logs one line per client (as an access log does), so the per-line cost counts:
records carry no caller, thread or process details (no format here uses them), the
timestamp text is made once a second, and lines are written in one `write` per event
loop turn instead of one per line.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO


class _SecondCache:
    """The timestamp text of the current second, made once a second."""

    def __init__(self, convert: Callable[[float], time.struct_time], fmt: str) -> None:
        self._convert = convert
        self._fmt = fmt
        self._second = -1
        self._text = ""

    def text(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self._fmt, self._convert(created))
        return self._text


class TextFormatter(logging.Formatter):
    """`2026-01-02 03:04:05,678 INFO tcpgc.ll.node: message`, as logging's default time."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._seconds = _SecondCache(self.converter, "%Y-%m-%d %H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return f"{self._seconds.text(record.created)},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """`{"time": ..., "level": ..., "logger": ..., "message": ...}` per line."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache(time.gmtime, "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": f"{self._seconds.text(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TurnFlushedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines into a buffer that goes out once per event loop turn (at once when
    no loop runs, and at exit): under load one `write` carries many lines. A line waits
    at most until the loop's next turn."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_due = False

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (starting, stopping, another thread): now
            self._flush_now()
            return
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        super().flush()

    def close(self) -> None:
        self._flush_now()
        super().close()


def setup_logging(level: str, fmt: str) -> None:
    # What no format here uses, records need not gather (the logging HOWTO's
    # "Optimization" section): the caller's file and line, thread, process.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # stderr itself is line-buffered: a buffer of our own on its descriptor instead.
    stream = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(sys.stderr.fileno(), "w", closefd=False), 64 * 1024),
        encoding=sys.stderr.encoding or "utf-8",
        errors="backslashreplace",
    )
    handler = TurnFlushedHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
