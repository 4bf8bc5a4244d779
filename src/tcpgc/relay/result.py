"""What every relay engine shares: its result and the type callers hold."""

from __future__ import annotations

from tcpgc.relay.copy import RelayResult
from tcpgc.relay.splice import AnyRelay

__all__ = ["AnyRelay", "RelayResult"]
