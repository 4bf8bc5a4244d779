"""The lifecycle every node shares, classic ones included: the event loop it runs on,
the signals that stop and reload it, and the file descriptors it may hold.

SIGINT or SIGTERM drains (connections in flight may finish, within a deadline) and then
stops; a second one while draining stops at once. SIGHUP reloads the configuration; a
reload that is refused leaves the running configuration in place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from tcpgc.errors import UsageError

log = logging.getLogger("tcpgc")

#: The environment variable that picks the event loop: 'uvloop' or 'asyncio'.
LOOP_VARIABLE = "TCPGC_LOOP"
LOOPS = ("uvloop", "asyncio")

#: Drains a node: let what is in flight finish within the deadline (seconds).
Drain = Callable[[float], Awaitable[None]]
#: Reloads a node's configuration; raises UsageError, changing nothing, to refuse.
Reload = Callable[[], Awaitable[None]]


class Service(Protocol):
    """What the runner starts and closes: a node, or a node with its admin endpoint."""

    async def start(self) -> None:
        """Start listening or dialling; a UsageError stops the process with exit 2."""

    async def close(self) -> None:
        """Stop at once, closing every connection; called once more is harmless."""


def choose_loop() -> str:
    """The event loop to run on: uvloop when it is installed (it roughly halves the
    loop's cost per connection), unless TCPGC_LOOP=asyncio asks for the standard one.
    TCPGC_LOOP=uvloop without uvloop, or any other value, is a usage error: a loop the
    operator asked for is never replaced silently."""
    wanted = os.environ.get(LOOP_VARIABLE, "")
    if wanted and wanted not in LOOPS:
        raise UsageError(
            f"{LOOP_VARIABLE}={wanted!r} is not an event loop tcpgc runs on: "
            f"set it to 'uvloop' or 'asyncio', or leave it unset"
        )
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise UsageError(
                f"{LOOP_VARIABLE}=uvloop, but uvloop is not installed: "
                f"install it (pip install uvloop) or set {LOOP_VARIABLE}=asyncio"
            ) from None
        return "asyncio"
    return "uvloop"


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    """Run `main` to completion on a new event loop of the kind `choose_loop` named."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def raise_fd_limit() -> None:
    """Every relayed client costs each node two sockets: take all the file descriptors
    the hard limit allows rather than the soft default (often 1024)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open file limit: %s", exc)


async def serve_until_stopped(
    service: Service,
    *,
    drain: Drain | None = None,
    drain_timeout: float = 0.0,
    reload: Reload | None = None,
) -> None:
    """Start `service` and run it until SIGINT or SIGTERM, then `drain` it for up to
    `drain_timeout` seconds (a second signal cuts the drain short) and close it.

    SIGHUP calls `reload`; without one, SIGHUP keeps its default action (it ends the
    process), as for a classic node, which has nothing to reload."""
    loop = asyncio.get_running_loop()
    stop, hup = asyncio.Event(), asyncio.Event()
    handled = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if reload is not None else [])
    # Restored afterwards: the loop's removal resets to the defaults, not to these.
    previous = {sig: signal.getsignal(sig) for sig in handled}
    for sig in handled:
        loop.add_signal_handler(sig, hup.set if sig == signal.SIGHUP else stop.set)
    try:
        await service.start()
        await _wait_for_stop(stop, hup, reload)
        if drain is None:
            log.info("stopping")
            return
        stop.clear()
        log.info("stopping: draining connections for up to %.0f s", drain_timeout)
        draining = asyncio.ensure_future(drain(drain_timeout))
        interrupted = asyncio.ensure_future(stop.wait())
        await asyncio.wait([draining, interrupted], return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if not draining.done():
            log.info("second signal: closing now")
            draining.cancel()
            await asyncio.gather(draining, return_exceptions=True)
            await service.close()
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)
        await service.close()


async def _wait_for_stop(stop: asyncio.Event, hup: asyncio.Event, reload: Reload | None) -> None:
    """Return on SIGINT or SIGTERM, reloading on each SIGHUP meanwhile."""
    while not stop.is_set():
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hup.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if hup.is_set() and not stop.is_set() and reload is not None:
            hup.clear()
            try:
                await reload()
            except UsageError as exc:
                log.error("reload refused, the running config stays: %s", exc)
