"""One request and its response on an admin connection, as bytes: HTTP/1.1 through h11
(sans-I/O, as the protocol core), within this endpoint's limits. No I/O here: the admin
server reads with `HttpExchange.wanted`, hands what it read to `receive`, and writes
what `respond` returns.

One request per connection: every response says `Connection: close`, so a connection
open is always one waiting on its client (for a request, or to take the reply), which
is what the admin server's connection cap counts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import h11

from tcpgc import __version__
from tcpgc.errors import BadRequest, ConnectionClosed

#: A request line or one header line longer than this is refused (431): the requests
#: this endpoint serves are a few hundred bytes; browsers send a few KiB of headers.
MAX_LINE = 8192
#: The whole request head (request line and headers, with their line ends) at most.
MAX_HEAD = 32768
#: Header lines at most.
MAX_HEADERS = 100

TEXT = "text/plain; charset=utf-8"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_REFUSALS = {431: "request head too large", 501: "request not supported"}

# Where a request head ends: h11's own test for the blank line.
_HEAD_END = re.compile(rb"\n\r?\n")


@dataclass(frozen=True)
class RequestHead:
    """What the admin endpoint reads of a request: method, target and headers (names
    lower-cased; of a repeated header the last one; no Host: no "host")."""

    method: str
    target: str
    headers: dict[str, str]


@dataclass
class Response:
    """A complete response: status, body and the headers beyond the common ones."""

    status: int
    body: bytes | str
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)

    def body_bytes(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


class HttpExchange:
    """The one request of a connection and its response. `receive` raises `BadRequest`
    (with the status to answer) for a request this endpoint refuses, and
    `ConnectionClosed` if the client closed before sending anything."""

    def __init__(self) -> None:
        self._conn = _connection()
        self._head = bytearray()
        self._method = ""

    def wanted(self) -> int:
        """How many bytes to read next at most. The head is read only up to one byte
        past MAX_HEAD: h11 then refuses it (431) if it is still incomplete."""
        return MAX_HEAD + 1 - len(self._head)

    def receive(self, data: bytes) -> RequestHead | None:
        """Takes bytes read (b"" at end of stream); the request once its head is
        complete, else None (read more)."""
        self._head += data
        self._conn.receive_data(data)
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            reparsed = self._with_empty_host()
            if reparsed is None:
                # h11 may have taken the request line before refusing the head (an
                # unknown Transfer-Encoding): answer through one that knows no request.
                self._conn = _connection()
                raise _bad_request(exc) from None
            return self._checked(reparsed, host_added=True)
        if isinstance(event, h11.ConnectionClosed):
            raise ConnectionClosed("the client closed before sending a request")
        if not isinstance(event, h11.Request):
            return None  # NEED_DATA: the head is not complete yet
        return self._checked(event, host_added=False)

    def respond(self, response: Response) -> bytes:
        """The bytes of `response`: its body only if the request was not HEAD."""
        body = response.body_bytes()
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Server", f"tcpgc/{__version__}"),
            *response.headers.items(),
            ("Connection", "close"),
        ]
        reason = _REASONS.get(response.status, "Error").encode()
        out = self._conn.send(
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        )
        if self._method != "HEAD":
            out += self._conn.send(h11.Data(data=body))
        return out + self._conn.send(h11.EndOfMessage())

    def _with_empty_host(self) -> h11.Request | None:
        """The request, if h11 refused it only for lacking a Host header.

        RFC 9112 has servers refuse an HTTP/1.1 request without Host, and h11 does; this
        endpoint has always served them (curl -H 'Host:', HTTP/1.0 habits), and no
        browser sends one, so it is no rebinding. The complete head is parsed again with
        an empty Host added after its last header: adding a line there mends no other
        fault, so if that parses, the missing Host was the only one. The response then
        goes out through that second parse, which knows the request (HEAD or not)."""
        end = _HEAD_END.search(self._head)
        if end is None:
            return None
        cut = end.start() + 1
        conn = _connection()
        conn.receive_data(bytes(self._head[:cut]) + b"Host:\r\n" + bytes(self._head[cut:]))
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if not isinstance(event, h11.Request):
            return None
        self._conn = conn
        return event

    def _checked(self, request: h11.Request, *, host_added: bool) -> RequestHead:
        self._method = request.method.decode("ascii")
        if request.http_version not in (b"1.0", b"1.1"):
            raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1")
        request_line = len(request.method) + len(b" ") + len(request.target) + len(b" HTTP/1.1")
        header_lines = [len(name) + len(b": ") + len(value) for name, value in request.headers]
        too_long = max([request_line, *header_lines]) > MAX_LINE
        if too_long or len(header_lines) - host_added > MAX_HEADERS:
            raise BadRequest(431, "request head too large")
        # Header values are ASCII in practice; latin-1 maps any byte without failing.
        headers = {name.decode("ascii"): value.decode("latin-1") for name, value in request.headers}
        if host_added:
            del headers["host"]
        return RequestHead(self._method, request.target.decode("latin-1"), headers)


def _connection() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)


def _bad_request(exc: h11.RemoteProtocolError) -> BadRequest:
    """h11's refusal as ours, with h11's status: 400, 431 for a head too large, 501 for
    a Transfer-Encoding it does not know. Its message quotes the client's bytes, which
    do not go back into a response."""
    status = exc.error_status_hint
    return BadRequest(status, _REFUSALS.get(status, "malformed request head"))
