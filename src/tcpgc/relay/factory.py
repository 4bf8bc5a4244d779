"""The one way to start a relay: picks the engine (splice or copy) before building it."""

from __future__ import annotations

from tcpgc.relay.chunked_splice import start_chunked_relay
from tcpgc.relay.splice import start_relay

__all__ = ["start_chunked_relay", "start_relay"]
