"""The runner every node shares: which event loop it picks, and what SIGHUP, SIGTERM and
a second SIGTERM do to a running service (driven in-process, with real signals)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import subprocess
import sys

import pytest

from tcpgc.errors import UsageError
from tcpgc.runner import choose_loop, serve_until_stopped

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


# ---- the event loop ---------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("value", [None, "", "uvloop"])
def test_uvloop_when_installed_unless_asyncio_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("TCPGC_LOOP", raising=False)
    else:
        monkeypatch.setenv("TCPGC_LOOP", value)
    assert choose_loop() == "uvloop"
    monkeypatch.setenv("TCPGC_LOOP", "asyncio")
    assert choose_loop() == "asyncio"


def test_without_uvloop_asyncio_is_the_default_and_uvloop_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    monkeypatch.delenv("TCPGC_LOOP", raising=False)
    assert choose_loop() == "asyncio"
    monkeypatch.setenv("TCPGC_LOOP", "uvloop")
    with pytest.raises(UsageError, match=r"uvloop is not installed.*TCPGC_LOOP=asyncio"):
        choose_loop()


def test_an_unknown_loop_is_refused_in_one_line_with_exit_2() -> None:
    env = {"TCPGC_LOOP": "trio", "PATH": "/usr/bin:/bin"}
    args = ["ll", "--cc", "127.0.0.1:0", "--clients", "127.0.0.1:0"]
    result = subprocess.run(
        [sys.executable, "-m", "tcpgc", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tcpgc: TCPGC_LOOP='trio' is not an event loop tcpgc runs on: "
        "set it to 'uvloop' or 'asyncio', or leave it unset"
    ]


# ---- signals -----------------------------------------------------------------------------


class FakeService:
    """Records what the runner asks of it; its drain lasts until `drained` is set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.started = asyncio.Event()
        self.drained = asyncio.Event()
        self.draining = asyncio.Event()
        self.reloaded = asyncio.Event()
        self.refuse_reload = False

    async def start(self) -> None:
        self.calls.append("start")
        self.started.set()

    async def drain(self, deadline: float) -> None:
        self.calls.append(f"drain {deadline:g}")
        self.draining.set()
        try:
            await self.drained.wait()
        except asyncio.CancelledError:
            self.calls.append("drain cancelled")
            raise

    async def reload(self) -> None:
        self.calls.append("reload")
        self.reloaded.set()
        if self.refuse_reload:
            raise UsageError("cc: bad address")

    async def close(self) -> None:
        self.calls.append("close")


async def _run(service: FakeService, script: asyncio.Future[None]) -> None:
    runner = asyncio.ensure_future(
        serve_until_stopped(service, drain=service.drain, drain_timeout=7, reload=service.reload)
    )
    await asyncio.wait_for(asyncio.wait([runner, script], return_when="FIRST_EXCEPTION"), 10)
    assert runner.done() and script.done()
    script.result()
    runner.result()


@pytest.mark.timeout(30)
def test_sighup_reloads_and_a_refused_reload_keeps_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        service = FakeService()

        async def script() -> None:
            await service.started.wait()
            service.refuse_reload = True
            signal.raise_signal(signal.SIGHUP)
            await service.reloaded.wait()
            service.reloaded.clear()
            service.refuse_reload = False
            signal.raise_signal(signal.SIGHUP)
            await service.reloaded.wait()
            service.drained.set()
            signal.raise_signal(signal.SIGTERM)

        await _run(service, asyncio.ensure_future(script()))
        assert service.calls == ["start", "reload", "reload", "drain 7", "close"]

    with caplog.at_level(logging.INFO, logger="tcpgc"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert "reload refused, the running config stays: cc: bad address" in messages
    assert "stopping: draining connections for up to 7 s" in messages
    assert "second signal: closing now" not in messages


@pytest.mark.timeout(30)
def test_a_second_sigterm_cuts_the_drain_short(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        service = FakeService()

        async def script() -> None:
            await service.started.wait()
            signal.raise_signal(signal.SIGTERM)
            await service.draining.wait()
            signal.raise_signal(signal.SIGTERM)

        await _run(service, asyncio.ensure_future(script()))
        assert service.calls == ["start", "drain 7", "drain cancelled", "close", "close"]

    with caplog.at_level(logging.INFO, logger="tcpgc"):
        asyncio.run(main())
    assert "second signal: closing now" in [r.getMessage() for r in caplog.records]


@pytest.mark.timeout(30)
def test_without_a_drain_a_signal_stops_at_once_and_handlers_are_restored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        service = FakeService()
        runner = asyncio.ensure_future(serve_until_stopped(service))
        await asyncio.wait_for(service.started.wait(), 10)
        signal.raise_signal(signal.SIGINT)
        await asyncio.wait_for(runner, 10)
        assert service.calls == ["start", "close"]

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with caplog.at_level(logging.INFO, logger="tcpgc"):
        asyncio.run(main())
    assert "stopping" in [r.getMessage() for r in caplog.records]
    assert {sig: signal.getsignal(sig) for sig in before} == before
