"""Reconnect backoff, without I/O or randomness of its own: the caller passes the
random draw, so the schedule is tested exactly."""

from __future__ import annotations


class Backoff:
    """Exponential backoff between `low` and `high` seconds: each failure doubles the
    ceiling, `reset` brings it back to `low`."""

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = high
        #: The current ceiling of the wait.
        self.delay = low

    def full_jitter(self, draw: float) -> float:
        """The wait before the next attempt, anywhere between `low` and the current
        ceiling (`draw` in [0, 1), e.g. `random.random()`), then the ceiling doubles.
        Full jitter: agents restarted together do not come back together."""
        wait = full_jitter(self.low, self.delay, draw)
        self.failed()
        return wait

    def failed(self) -> None:
        """One more failure: double the ceiling, up to `high`."""
        self.delay = min(self.delay * 2, self.high)

    def reset(self) -> None:
        self.delay = self.low


def full_jitter(low: float, high: float, draw: float) -> float:
    """The point `draw` (in [0, 1)) of the way from `low` to `high`: what
    `random.uniform(low, high)` returns for `random.random() == draw`."""
    return low + (high - low) * draw
