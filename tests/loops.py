"""Running an async test body on each event loop tcpgc runs on."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

#: Parametrize a test with these and hand its body to `run_on`.
LOOPS = ["asyncio", "uvloop"]


def run_on(
    loop_name: str, main: Callable[[], Coroutine[Any, Any, None]], timeout: float = 20
) -> None:
    """Run `main()` on a fresh loop of that kind, within `timeout` seconds."""
    if loop_name == "uvloop":
        if importlib.util.find_spec("uvloop") is None:
            pytest.skip("uvloop is not installed (a dependency, but not on Windows or PyPy)")
        import uvloop

        uvloop.run(asyncio.wait_for(main(), timeout))
    else:
        asyncio.run(asyncio.wait_for(main(), timeout))


async def loop_turns(n: int = 3) -> None:
    """Let the loop poll and run what became ready `n` times: after this, a readiness
    callback that was due has run (a sleep of fixed length would only guess)."""
    for _ in range(n):
        await asyncio.sleep(0)
