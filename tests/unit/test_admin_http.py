"""The admin endpoint's HTTP exchange without sockets: request bytes in (in pieces, as
reads return them), the request head or a refusal with its status out, and the
response bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpgc.errors import BadRequest, ConnectionClosed
from tcpgc.ops.admin_http import (
    MAX_HEAD,
    MAX_HEADERS,
    MAX_LINE,
    HttpExchange,
    RequestHead,
    Response,
)


def receive(exchange: HttpExchange, data: bytes, step: int = 7) -> RequestHead | None:
    """Feeds `data` in reads of at most `step` bytes (and of at most what the exchange
    wants); the request once complete, else None."""
    offset = 0
    while offset < len(data):
        piece = data[offset : offset + min(step, exchange.wanted())]
        offset += len(piece)
        request = exchange.receive(piece)
        if request is not None:
            return request
    return None


def refusal(data: bytes, *, eof: bool = False) -> BadRequest:
    """The refusal of `data`, checked to be answered with its status and message."""
    exchange = HttpExchange()
    with pytest.raises(BadRequest) as caught:
        receive(exchange, data, step=4096)
        if eof:
            exchange.receive(b"")
    refused = caught.value
    status, headers, body = split(exchange.respond(Response(refused.status, f"{refused}\n")))
    assert status.startswith(f"HTTP/1.1 {refused.status} ") and not status.endswith(" Error")
    assert body == f"{refused}\n".encode() and headers["Connection"] == "close"
    return refused


def split(reply: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_a_request_read_in_pieces_and_its_response() -> None:
    exchange = HttpExchange()
    request = receive(
        exchange,
        b"GET /status.json?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9181\r\nX-A: 1\r\nX-A: 2\r\n\r\n",
        step=1,
    )
    assert request == RequestHead("GET", "/status.json?x=1", {"host": "127.0.0.1:9181", "x-a": "2"})
    status, headers, body = split(
        exchange.respond(Response(200, "{}", "application/json", {"X-Extra": "yes"}))
    )
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == "2" and body == b"{}"
    assert headers["Connection"] == "close"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"].startswith("tcpgc/")
    assert headers["X-Extra"] == "yes"


def test_head_gets_the_head_only() -> None:
    exchange = HttpExchange()
    assert receive(exchange, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n") is not None
    reply = exchange.respond(Response(200, "ok\n"))
    assert reply.endswith(b"\r\n\r\n")
    status, headers, body = split(reply)
    assert (status, headers["Content-Length"], body) == ("HTTP/1.1 200 OK", "3", b"")


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_a_request_without_host_is_served(version: bytes) -> None:
    """HTTP/1.1 requires Host and h11 enforces it; this endpoint serves such requests
    as it always has (no browser sends one), and reports no Host."""
    exchange = HttpExchange()
    request = receive(exchange, b"HEAD /metrics HTTP/" + version + b"\r\nAccept: */*\r\n\r\n")
    assert request == RequestHead("HEAD", "/metrics", {"accept": "*/*"})
    assert exchange.respond(Response(200, "body")).endswith(b"\r\n\r\n")  # still a HEAD


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS spoken to plain HTTP
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"HEAD / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET /" + b"a" * MAX_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * MAX_LINE + b"\r\n\r\n", 431),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS))
            + b"\r\n",
            431,
        ),
    ],
    ids=[
        "garbage",
        "tls",
        "space-before-colon",
        "two-hosts",
        "header-without-colon",
        "http-2",
        "transfer-encoding",
        "long-request-line",
        "long-header-line",
        "too-many-headers",
    ],
)
def test_refusals_and_their_status(data: bytes, status: int) -> None:
    refused = refusal(data)
    assert refused.status == status, refused
    # The message is ours, never the client's bytes.
    assert "\n" not in str(refused) and "garbage" not in str(refused)


def test_the_most_headers_allowed_are_taken() -> None:
    fields = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS - 1))
    request = receive(HttpExchange(), b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert request is not None and len(request.headers) == MAX_HEADERS


def test_a_head_is_read_only_up_to_its_limit() -> None:
    """An endless head: no more than MAX_HEAD + 1 bytes are ever asked for, then 431."""
    exchange = HttpExchange()
    taken = b"GET / HTTP/1.1\r\n"
    exchange.receive(taken)
    fed = len(taken)
    with pytest.raises(BadRequest) as caught:
        while True:
            piece = b"X-Filler: yyyyyyyyyyyyyyyyyyyy\r\n"[: exchange.wanted()]
            assert piece, "asked for nothing"
            fed += len(piece)
            exchange.receive(piece)
    assert caught.value.status == 431
    assert fed == MAX_HEAD + 1
    status, headers, body = split(exchange.respond(Response(431, f"{caught.value}\n")))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert body == b"request head too large\n"


def test_end_of_stream_mid_head_is_a_bad_request() -> None:
    assert refusal(b"GET /healthz HTTP/1.1\r\nHost: 127", eof=True).status == 400


def test_end_of_stream_before_any_byte_is_no_request() -> None:
    with pytest.raises(ConnectionClosed):
        HttpExchange().receive(b"")


def test_a_request_still_incomplete_can_be_answered() -> None:
    """A head that does not arrive in time gets a 408 through the same exchange."""
    exchange = HttpExchange()
    assert receive(exchange, b"GET /healthz HTTP/1.1\r\nHost: 1") is None
    status, _, body = split(exchange.respond(Response(408, "late\n")))
    assert (status, body) == ("HTTP/1.1 408 Request Timeout", b"late\n")


_HEADS = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda method, target, version, fields: (
            b"%s %s HTTP/%s\r\n%s\r\n" % (method, target, version, b"".join(fields))
        ),
        st.sampled_from([b"GET", b"HEAD", b"POST", b"G T", b""]),
        st.sampled_from([b"/", b"/healthz?x=1", b"http://h/", b"", b"/\x00"]),
        st.sampled_from([b"1.1", b"1.0", b"2.0", b"1.10", b"x"]),
        st.lists(
            st.sampled_from(
                [
                    b"Host: h\r\n",
                    b"Host:\r\n",
                    b"X: y\r\n",
                    b" fold\r\n",
                    b"bad\r\n",
                    b"Content-Length: 5\r\n",
                    b"Transfer-Encoding: chunked\r\n",
                    b"\n",
                ]
            ),
            max_size=6,
        ),
    ),
)


@given(_HEADS, st.integers(min_value=1, max_value=64))
def test_any_bytes_give_a_request_or_a_refusal_and_an_answer(data: bytes, step: int) -> None:
    """Whatever the client sends, in whatever pieces: a request head, a BadRequest with
    a status this endpoint can answer, or (nothing sent) ConnectionClosed; and the
    answer always serializes."""
    exchange = HttpExchange()
    try:
        request = receive(exchange, data, step)
        if request is None:
            exchange.receive(b"")  # end of stream: an incomplete head is refused
            raise AssertionError("end of stream gave no refusal")
        status = 200
    except BadRequest as exc:
        status = exc.status
        assert status in (400, 431, 501, 505), exc
    except ConnectionClosed:
        assert data == b""
        return
    reply = exchange.respond(Response(status, "body\n"))
    assert reply.startswith(b"HTTP/1.1 %d " % status)
