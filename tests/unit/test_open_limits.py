"""The agent's caps on concurrent opens, and how it logs a flood of refusals."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tcpgc.cc.open_limits import OpenLimits, RefusalLog


def test_caps_per_ll_and_per_service() -> None:
    limits = OpenLimits(per_ll=3, per_service=2)
    assert limits.acquire("ll1", "web") is None
    assert limits.acquire("ll1", "web") is None
    over = limits.acquire("ll2", "web")  # another LL, the same service: its cap holds
    assert over is not None and "max_connections_per_service" in over
    assert limits.acquire("ll1", "ssh") is None
    over = limits.acquire("ll1", "db")
    assert over is not None and "max_connections_per_ll" in over
    assert limits.acquire("ll2", "db") is None  # other LLs are not starved
    limits.release("ll1", "web")
    assert limits.acquire("ll1", "db") is None  # one freed, one more admitted


def test_zero_means_no_cap() -> None:
    limits = OpenLimits(per_ll=0, per_service=0)
    assert all(limits.acquire("ll", "web") is None for _ in range(10_000))


def test_a_flood_of_refusals_is_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        refusals = RefusalLog(logging.getLogger("test.refusals"), interval=0.05)  # seconds
        for n in range(1000):
            refusals.refused(f"refused OPEN {n}")
        assert len(caplog.records) == 1
        # Quiet again once an interval passes with nothing to count.
        deadline = asyncio.get_running_loop().time() + 5
        while refusals._timer is not None:
            assert asyncio.get_running_loop().time() < deadline, "never quiet again"
            await asyncio.sleep(0.01)
        refusals.refused("refused OPEN later")
        refusals.close()

    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused OPEN 0",
        "999 more OPENs refused in the last 0 s (connection caps reached)",
        "refused OPEN later",
    ], messages
