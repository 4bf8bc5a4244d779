"""Reading one HTTP/1.1 request head for the admin endpoint, within fixed limits."""

from __future__ import annotations

import asyncio

from tcpgc.errors import BadRequest

#: A request line or one header line longer than this is refused (431): the requests
#: this endpoint serves are a few hundred bytes; browsers send a few KiB of headers.
MAX_LINE = 8192
#: The whole request head (request line and headers) at most.
MAX_HEAD = 32768
MAX_HEADERS = 100


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Method, request target and headers (lower-cased names) of one request."""
    line = await _read_line(reader)
    size = len(line)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1")
    headers: dict[str, str] = {}
    while True:
        line = await _read_line(reader)
        size += len(line)
        if size > MAX_HEAD or len(headers) >= MAX_HEADERS:
            raise BadRequest(431, "request head too large")
        if not line:
            return method, target, headers
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "request line or header line too long") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise BadRequest(400, "incomplete request head") from None
        raise
    # Header values are ASCII in practice; latin-1 maps any byte without failing.
    return raw.decode("latin-1").rstrip("\r\n")
