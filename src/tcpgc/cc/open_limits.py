"""The agent's caps on what its LLs may make it open.

Every OPEN an LL sends costs the agent two sockets (the server connection and the data
connection to the LL) for as long as it is being dialed or relayed. An LL that is
compromised, or misbehaves, could otherwise send OPENs until the agent runs out of file
descriptors and can serve no other LL. Past a cap an OPEN is refused (OPEN_FAILED), and
the refusals of a flood are logged in a few lines, not one each.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Hashable
from typing import Any

#: Seconds over which refusals past the first are counted into one log line.
LOG_INTERVAL = 10.0


class OpenLimits:
    """Connections being opened or relayed, per LL and per service (of all LLs)."""

    def __init__(self, per_ll: int, per_service: int) -> None:
        #: The caps; 0 means no cap. May be changed (on reload) at any time.
        self.per_ll = per_ll
        self.per_service = per_service
        self._by_ll: collections.Counter[Hashable] = collections.Counter()
        self._by_service: collections.Counter[str] = collections.Counter()

    def acquire(self, ll: Hashable, service: str) -> str | None:
        """Count one more connection of `service` through `ll`; None if it is within
        both caps, else (counting nothing) which cap it would pass."""
        if self.per_ll and self._by_ll[ll] >= self.per_ll:
            return f"{self._by_ll[ll]} connections through this LL (max_connections_per_ll)"
        if self.per_service and self._by_service[service] >= self.per_service:
            return (
                f"{self._by_service[service]} connections of service '{service}' "
                "(max_connections_per_service)"
            )
        self._by_ll[ll] += 1
        self._by_service[service] += 1
        return None

    def release(self, ll: Hashable, service: str) -> None:
        """One connection counted by `acquire` is done."""
        _decrement(self._by_ll, ll)
        _decrement(self._by_service, service)


def _decrement(counter: collections.Counter[Any], key: Hashable) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # counters of LLs and services gone do not linger


class RefusalLog:
    """Logs the first refusal at once, then at most one line per `interval` saying how
    many more there were: a flood of refusals costs a few lines, and none is hidden."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self._log = logger
        self._interval = interval
        self._more = 0
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, text: str) -> None:
        if self._timer is None:
            self._log.warning("%s", text)
            self._arm()
        else:
            self._more += 1

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._more:
            self._log.warning(
                "%d more OPENs refused in the last %.0f s (connection caps reached)",
                self._more,
                self._interval,
            )
            self._more = 0
            self._arm()  # still flooding, perhaps: keep counting rather than logging

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
