"""`tcpgc demo`: the seed's scenario on loopback, in one process.

A small web server plays the inside server, an LL and a CC (with a fresh identity in a
temporary state dir) carry the tunnel, and the page is fetched through it.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import logging
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tcpgc.cc.node import ConnectNode
from tcpgc.config import Address, CCConfig, LLConfig, ServiceListener
from tcpgc.errors import UsageError
from tcpgc.identity import load_identity
from tcpgc.ll.node import ListenNode

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>tcpgc demo</title></head>
<body><h1>Hello through the tunnel</h1>
<p>This page is served by a web server on the inside, reached through a tcpgc LL
(outside) and CC (inside) over TLS 1.3.</p></body></html>
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _start_web_server(root: Path) -> http.server.ThreadingHTTPServer:
    (root / "index.html").write_bytes(PAGE)
    handler = lambda *a: _Quiet(*a, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="demo web server", daemon=True).start()
    return server


def _fetch(url: str) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read(), time.perf_counter() - started


async def run_demo(once: bool) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="tcpgc-demo-") as tmp:
        root = Path(tmp)
        (root / "www").mkdir()
        web = _start_web_server(root / "www")
        try:
            return await _demo(root, web, once)
        finally:
            web.shutdown()
            web.server_close()


async def _demo(root: Path, web: http.server.ThreadingHTTPServer, once: bool) -> int:
    server = Address("127.0.0.1", web.server_address[1])
    state_dir = root / "state"
    token = load_identity(state_dir, create=True).token
    client_port = 0 if once else 8000
    ll_config = LLConfig(
        cc=Address("127.0.0.1", 0),
        services={"web": ServiceListener(Address("127.0.0.1", client_port))},
        state_dir=state_dir,
    )
    print(f"1. inside web server on {server}")
    try:
        ll = ListenNode(ll_config)
        await ll.start()
    except UsageError:
        ll_config.services["web"] = ServiceListener(
            Address("127.0.0.1", 0)
        )  # 8000 is taken: any free port
        ll = ListenNode(ll_config)
        await ll.start()
    try:
        assert ll.agent_address is not None
        print(
            f"2. LL (outside) takes clients on {ll.service_addresses['web']} "
            f"and agents on {ll.agent_address}"
        )
        cc = ConnectNode(CCConfig(ll=[ll.agent_address], services={"web": server}), token)
        async with cc:
            async with asyncio.timeout(10):
                await cc.connected[str(ll.agent_address)].wait()
            print("3. CC (inside) dialed out to the LL; mutual authentication and TLS 1.3 are up")
            url = f"http://{ll.service_addresses['web']}/"
            status, body, seconds = await asyncio.to_thread(_fetch, url)
            same = body == PAGE
            print(
                f"4. fetched {url} through the tunnel: HTTP {status}, {len(body)} bytes in "
                f"{seconds * 1000:.1f} ms, sha256 {hashlib.sha256(body).hexdigest()[:16]}… "
                f"{'matches' if same else 'DOES NOT MATCH'} the page on the inside server"
            )
            if status != 200 or not same:
                return 1
            if once:
                print("demo OK")
                return 0
            print(f"\nOpen {url} in a browser; Ctrl-C to stop.", flush=True)
            await _wait_forever()
    finally:
        await ll.close()
    return 0


async def _wait_forever() -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass


if os.name != "posix":  # pragma: no cover
    raise ImportError("tcpgc runs on POSIX systems")
