"""The CC's status snapshot, for the admin endpoint's status page."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from tcpgc.addresses import format_endpoint
from tcpgc.config import Address
from tcpgc.protocol.messages import Open
from tcpgc.relay.result import AnyRelay
from tcpgc.relay.resume_table import waiting_for


def cc_status(
    *,
    agent_id: bytes,
    tls: bool,
    connected: dict[str, asyncio.Event],
    services: dict[str, Address],
    udp_services: Collection[str],
    relays: dict[Address, dict[AnyRelay, Open]],
    now: float,
) -> dict[str, Any]:
    """A JSON-able snapshot: LLs, services, connections (`now`: `time.monotonic()`)."""
    return {
        "role": "cc",
        "agent_id": agent_id.hex()[:12],
        "tls": tls,
        "lls": [
            {"address": address, "connected": event.is_set()}
            for address, event in connected.items()
        ],
        "services": [
            {"name": name, "server": str(server), "protocol": _protocol(name, udp_services)}
            for name, server in services.items()
        ],
        "connections": [
            {
                "ll": str(ll),
                "service": request.service,
                "client": _client(request),
                "server": relay.a.peer,
                "bytes_in": relay.result.bytes_b_to_a,
                "bytes_out": relay.result.bytes_a_to_b,
                "seconds": round(now - relay.result.started, 1),
                "waiting": waiting_for(relay, now),
            }
            for ll, ll_relays in relays.items()
            for relay, request in ll_relays.items()
        ],
    }


def _client(request: Open) -> str:
    if not request.client_host:
        return "unknown"
    return format_endpoint(request.client_host, request.client_port)


def _protocol(name: str, udp_services: Collection[str]) -> str:
    return "udp" if name in udp_services else "tcp"
