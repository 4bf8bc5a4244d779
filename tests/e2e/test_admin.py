"""The admin endpoint of real ``tcpgc ll`` / ``tcpgc cc`` processes: Prometheus metrics
before and after known traffic, health checks, the bearer token, and the status page
rendered by headless Chromium (which also takes the screenshot in docs/)."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import (
    RE_LL_HANDSHAKE_FAILED,
    READY_TIMEOUT,
    REPO_ROOT,
    Harness,
    Node,
    Tunnel,
    bound_unused_port,
    connect,
    echo_roundtrip,
    format_addr,
    parse_addr,
    recv_exactly,
    service_re,
)

RE_ADMIN = r"admin endpoint on http://(?P<addr>\S+)/"
#: Written by the status page test when TCPGC_UPDATE_SCREENSHOT is set.
SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"
ADMIN_TOKEN = "adm-" + "7f3c9e1b5a2d4c6e8f0a1b2c3d4e5f60"


def admin_url(node: Node) -> str:
    return "http://" + node.wait_for(RE_ADMIN, READY_TIMEOUT)["addr"]


def http_get(url: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of a GET; error statuses are returned, not raised."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read().decode()


def scrape(
    base: str, token: str | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (name, labels). Parsed with prometheus-client's
    own parser, so a malformed exposition fails here."""
    status, headers, body = http_get(base + "/metrics", token)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version="), headers
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


# ---------------------------------------------------------------------------- metrics


def test_metrics_count_known_traffic(harness: Harness) -> None:
    echo = harness.echo_server()
    tunnel = harness.tunnel(
        echo.addr_str,
        ll_args=["--admin", "127.0.0.1:0"],
        cc_args=["--admin", "127.0.0.1:0"],
    )
    ll_admin, cc_admin = admin_url(tunnel.ll), admin_url(tunnel.cc)
    ll_before, cc_before = scrape(ll_admin), scrape(cc_admin)
    assert value(ll_before, "tcpgc_agents_connected") == 1
    assert value(cc_before, "tcpgc_agents_connected") == 1  # the CC's one LL session

    sizes = [1000 + 111 * i for i in range(5)]
    for size in sizes:
        payload = os.urandom(size)
        assert echo_roundtrip(tunnel.client_addr, payload) == payload
    sent = sum(sizes)

    # The LL counts a chunk before forwarding it, so once each echo is back every byte
    # was counted in both directions.
    ll_after = scrape(ll_admin)
    accepted = "tcpgc_clients_accepted_total"
    assert (
        value(ll_after, accepted, service="default") - value(ll_before, accepted, service="default")
        == 5
    )
    for direction in ("in", "out"):
        grew = value(ll_after, "tcpgc_bytes_total", service="default", direction=direction) - value(
            ll_before, "tcpgc_bytes_total", service="default", direction=direction
        )
        assert grew == sent, f"LL bytes {direction}: {grew} != {sent}"
    assert value(ll_after, "tcpgc_agents_connected") == 1
    waited = "tcpgc_data_connection_wait_seconds_count"
    assert (
        value(ll_after, waited, service="default") - value(ll_before, waited, service="default")
        == 5
    )

    # The CC sees the same clients (it may count the last bytes a moment later: the echo
    # server's reply reaches the client through it, but its own count of the client's
    # EOF is not ordered with our scrape).
    cc_after = scrape(cc_admin)
    assert (
        value(cc_after, accepted, service="default") - value(cc_before, accepted, service="default")
        == 5
    )
    cc_in = value(cc_after, "tcpgc_bytes_total", service="default", direction="in") - value(
        cc_before, "tcpgc_bytes_total", service="default", direction="in"
    )
    assert cc_in == sent

    # Garbage on the agent port moves the handshake failure counter.
    failures_before = total(ll_after, "tcpgc_handshake_failures_total")
    mark = tunnel.ll.mark()
    with connect(tunnel.agent_addr) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64))
        tunnel.ll.wait_for(RE_LL_HANDSHAKE_FAILED, READY_TIMEOUT, since=mark)
    failures = total(scrape(ll_admin), "tcpgc_handshake_failures_total")
    assert failures == failures_before + 1

    for base in (ll_admin, cc_admin):
        status, _, body = http_get(base + "/healthz")
        assert (status, body) == (200, "ok\n")


def test_status_json(tunnel_with_admin: tuple[Tunnel, str, str]) -> None:
    tunnel, ll_admin, cc_admin = tunnel_with_admin
    with connect(tunnel.client_addr) as sock:
        sock.sendall(b"x" * 1234)
        recv_exactly(sock, 1234)
        client = format_addr(*sock.getsockname()[:2])
        status, headers, body = http_get(ll_admin + "/status.json")
        assert status == 200 and headers["Content-Type"] == "application/json"
        ll = json.loads(body)
        assert ll["role"] == "ll" and ll["tls"] is True
        assert [s["name"] for s in ll["services"]] == ["default"]
        assert len(ll["agents"]) == 1
        [conn] = ll["connections"]
        assert conn["client"] == client and conn["service"] == "default"
        assert conn["bytes_in"] == conn["bytes_out"] == 1234
        assert ll["totals"]["bytes_in"] >= 1234

        cc = json.loads(http_get(cc_admin + "/status.json")[2])
        assert cc["role"] == "cc"
        assert [entry["connected"] for entry in cc["lls"]] == [True]
        assert len(cc["connections"]) == 1


_NODES_WITH_ADMIN_OR_NOT = """
import sys
from tcpgc.cc.node import ConnectNode
from tcpgc.config import Address, CCConfig, LLConfig, ServiceListener
from tcpgc.errors import UsageError
from tcpgc.identity import JoinToken
from tcpgc.ll.node import ListenNode

admin = Address("127.0.0.1", 0) if sys.argv[1] == "admin" else None
ll = ListenNode(
    LLConfig(
        cc=Address("127.0.0.1", 0),
        services={"s": ServiceListener(Address("127.0.0.1", 0))},
        admin=admin,
    )
)
cc = ConnectNode(
    CCConfig(ll=[Address("127.0.0.1", 1)], services={"s": Address("127.0.0.1", 2)}, admin=admin),
    JoinToken(bytes(32), bytes(32)),
)
print("counting", ll.metrics.registry is not None, cc.metrics.registry is not None)
print("loaded", "prometheus_client" in sys.modules)
from tcpgc.ops.admin import AdminServer
try:
    AdminServer(ll, Address("127.0.0.1", 0), None)
    print("admin ok")
except UsageError as exc:
    print("admin refused:", exc)
"""


@pytest.mark.parametrize("admin", ["admin", "none"])
def test_only_nodes_with_an_admin_endpoint_count(admin: str) -> None:
    """The admin endpoint is the one reader of the metrics: a node without one keeps
    none, and does not even load prometheus-client (5.5 MB per process)."""
    done = subprocess.run(
        [sys.executable, "-c", _NODES_WITH_ADMIN_OR_NOT, admin],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    if admin == "admin":
        assert lines[:3] == ["counting True True", "loaded True", "admin ok"], done.stdout
    else:
        assert lines[:2] == ["counting False False", "loaded False"], done.stdout
        assert lines[2].startswith("admin refused: this node counts nothing"), done.stdout


def test_cc_health_without_ll(harness: Harness) -> None:
    refusing = bound_unused_port()  # nothing listens: the CC cannot join
    try:
        host, port = refusing.getsockname()[:2]
        cc = harness.start_cc(
            "--ll",
            format_addr(host, port),
            "--server",
            "127.0.0.1:9",
            "--admin",
            "127.0.0.1:0",
            token=harness.token(harness.state_dir()),
        )
        status, _, body = http_get(admin_url(cc) + "/healthz")
        assert status == 503 and "no LL session up" in body, body
    finally:
        refusing.close()


def test_admin_bad_requests(tunnel_with_admin: tuple[Tunnel, str, str]) -> None:
    _, ll_admin, _ = tunnel_with_admin
    assert http_get(ll_admin + "/nothing-here")[0] == 404
    host, port = parse_addr(ll_admin.removeprefix("http://"))
    for request, status in (
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"garbage\r\n\r\n", b"400"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + b"X-Filler: yyyyyyyyyyyyyyyyyyyy\r\n" * 2000 + b"\r\n", b"431"),
        (b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
    ):
        with connect((host, port)) as sock:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before reading it all
            reply = b""
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except ConnectionResetError:
                pass
        assert reply.startswith(b"HTTP/1.1 " + status), (request[:40], reply[:200])
        if request.startswith(b"HEAD"):
            assert reply.endswith(b"\r\n\r\n"), "HEAD must not carry a body"
    # The node is unharmed.
    assert http_get(ll_admin + "/healthz")[0] == 200


# ---------------------------------------------------------------------------- token


def test_bearer_token(harness: Harness, tmp_path: Path) -> None:
    echo = harness.echo_server()
    state = harness.state_dir()
    token = harness.token(state)
    token_file = private_file(tmp_path / "admin-token", ADMIN_TOKEN + "\n")
    config = tmp_path / "ll.toml"
    config.write_text(
        f'cc = "127.0.0.1:0"\nstate_dir = "{state}"\n'
        f'admin = "127.0.0.1:0"\nadmin_token_file = "{token_file}"\n'
        '[services.default]\nclients = "127.0.0.1:0"\n'
    )
    ll, agent = harness.start_ll("-c", str(config))
    cc = harness.start_cc("--ll", format_addr(*agent), "--server", echo.addr_str, token=token)
    base = admin_url(ll)
    for path in ("/metrics", "/status.json", "/"):
        status, headers, _ = http_get(base + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert http_get(base + path, "wrong-" + ADMIN_TOKEN)[0] == 401, path
        assert http_get(base + path, ADMIN_TOKEN)[0] == 200, path
    assert http_get(base + "/healthz")[0] == 200  # for load balancers: no token
    assert http_get(base + f"/?token={ADMIN_TOKEN}")[0] == 200
    assert http_get(base + "/?token=nope")[0] == 401
    # The query form is for the page only; the data needs the header.
    assert http_get(base + f"/status.json?token={ADMIN_TOKEN}")[0] == 401
    ll.stop()
    cc.stop()
    assert ADMIN_TOKEN not in ll.output(), "the admin token leaked into the log"


# ---------------------------------------------------------------------------- status page


@pytest.fixture
def tunnel_with_admin(harness: Harness) -> tuple[Tunnel, str, str]:
    echo = harness.echo_server()
    tunnel = harness.tunnel(
        echo.addr_str,
        ll_args=["--admin", "127.0.0.1:0"],
        cc_args=["--admin", "127.0.0.1:0"],
    )
    return tunnel, admin_url(tunnel.ll), admin_url(tunnel.cc)


def _install_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if (path := shutil.which(name)) is not None:
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            timeout=150,
            check=False,
        )
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _install_chromium()
    if path is None:
        pytest.skip("chromium is not installed and could not be (apt-get install -y chromium)")
    return path


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4,
    NUL-separated JSON): real time, so the page's per-second polling and throughput
    work as in a real browser. Stdlib only."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        argv = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--window-size=1200,800",
            "about:blank",
        ]
        # Chromium reads commands on fd 3 and writes replies on fd 4: a tiny Python
        # trampoline puts the pipes there and execs it (no preexec_fn with threads about).
        trampoline = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execvp(sys.argv[3], sys.argv[3:])"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(to_browser_r), str(from_browser_w), *argv],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self._session = ""

    def call(self, method: str, deadline: float = 30.0, **params: object) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        end = time.monotonic() + deadline
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._from_browser], [], [], end - time.monotonic())
                if not ready:
                    raise AssertionError(f"chromium did not answer {method} in {deadline} s")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise EOFError(f"chromium closed its pipe (exit {self._proc.poll()})")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=1200,
            height=800,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def wait_until(self, expression: str, timeout: float = 20.0) -> None:
        """Until `expression` is true in the page (checked every 100 ms)."""
        end = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > end:
                html = self.evaluate("document.documentElement.outerHTML")
                raise AssertionError(f"page never got {expression!r}:\n{str(html)[-3000:]}")
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self._session = ""
            self.call("Browser.close", deadline=10)
        except (AssertionError, EOFError, OSError):
            pass
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[Browser]:
    browser = Browser(chromium, tmp_path / "chromium-profile")
    try:
        browser.call("Browser.getVersion", deadline=30)
    except (OSError, EOFError, AssertionError) as exc:
        browser.close()
        pytest.skip(f"chromium cannot run here: {exc}")
    try:
        yield browser
    finally:
        browser.close()


def test_status_page(harness: Harness, browser: Browser, tmp_path: Path) -> None:
    echo = harness.echo_server()
    state = harness.state_dir()
    token = harness.token(state)
    token_file = private_file(tmp_path / "admin-token", ADMIN_TOKEN)
    config = tmp_path / "ll.toml"
    config.write_text(
        f'cc = "127.0.0.1:0"\nstate_dir = "{state}"\n'
        f'admin = "127.0.0.1:0"\nadmin_token_file = "{token_file}"\n'
        '[services.web]\nclients = "127.0.0.1:0"\n'
        '[services.ssh]\nclients = "127.0.0.1:0"\n'
    )
    ll, agent = harness.start_ll("-c", str(config))
    web = parse_addr(ll.wait_for(service_re("web"), READY_TIMEOUT)["addr"])
    ssh = parse_addr(ll.wait_for(service_re("ssh"), READY_TIMEOUT)["addr"])
    cc_config = tmp_path / "cc.toml"
    cc_config.write_text(
        f'll = "{format_addr(*agent)}"\nadmin = "127.0.0.1:0"\n'
        f'[services.web]\nserver = "{echo.addr_str}"\n'
        f'[services.ssh]\nserver = "{echo.addr_str}"\n'
    )
    cc = harness.start_cc("-c", str(cc_config), token=token)
    ll_base, cc_base = admin_url(ll), admin_url(cc)
    ll.wait_for(r"agent \S+ connected from", READY_TIMEOUT)

    stop = threading.Event()
    clients: list[tuple[socket.socket, threading.Thread]] = []

    def pump(sock: socket.socket, chunk: int) -> None:
        try:
            while not stop.wait(0.05):
                sock.sendall(b"t" * chunk)
                recv_exactly(sock, chunk)
        except (OSError, AssertionError):
            pass

    try:
        for addr, chunk in ((web, 48 * 1024), (web, 6 * 1024), (ssh, 512)):
            sock = connect(addr)
            sock.sendall(b"hello")
            recv_exactly(sock, 5)  # relayed end to end: it is a live connection now
            thread = threading.Thread(target=pump, args=(sock, chunk), daemon=True)
            thread.start()
            clients.append((sock, thread))
        client = format_addr(*clients[0][0].getsockname()[:2])

        page = f"{ll_base}/?token={ADMIN_TOKEN}"
        # Three polls: the last two give every connection a measured rate.
        browser.open(page)
        browser.wait_until("Number(document.body.dataset.polls || 0) >= 3")
        dom = browser.evaluate("document.documentElement.outerHTML")
        assert "live ·" in dom, f"the page did not load /status.json:\n{dom[-3000:]}"
        assert ">web<" in dom and ">ssh<" in dom, dom[-3000:]
        assert client in dom, f"live connection {client} not shown:\n{dom[-3000:]}"
        assert "LL · outside node" in dom
        rate = browser.evaluate("document.getElementById('s-in').textContent")
        assert rate.endswith("/s") and not rate.startswith("0 "), f"no throughput shown: {rate}"
        png = browser.screenshot()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 400_000, len(png)
        # The docs' picture is renewed only when asked: a test run leaves the tree alone.
        shot = (
            SCREENSHOT if os.environ.get("TCPGC_UPDATE_SCREENSHOT") else tmp_path / SCREENSHOT.name
        )
        shot.write_bytes(png)

        # Without the token the page is refused.
        assert http_get(ll_base + "/")[0] == 401

        browser.call("Page.navigate", url=cc_base + "/")
        browser.wait_until("Number(document.body.dataset.polls || 0) >= 1")
        cc_dom = browser.evaluate("document.documentElement.outerHTML")
        assert "CC · agent" in cc_dom and format_addr(*agent) in cc_dom, cc_dom[-3000:]
        assert echo.addr_str in cc_dom
    finally:
        stop.set()
        for sock, thread in clients:
            thread.join(5)
            sock.close()
