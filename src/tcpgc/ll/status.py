"""The LL's status snapshot for the admin endpoint's status page and JSON."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from tcpgc.config import Address
from tcpgc.ll.agents import AgentRegistry, AgentSession
from tcpgc.ll.clients import Service
from tcpgc.ll.udp_flows import UdpFlows
from tcpgc.relay.resume_table import waiting_for


def ll_status(
    agent_address: Address | None,
    tls: bool,
    services: Mapping[str, Service],
    agents: AgentRegistry,
) -> dict[str, Any]:
    """A JSON-able snapshot: services, agents, connections."""
    now = time.monotonic()
    return {
        "role": "ll",
        "agent_address": str(agent_address),
        "tls": tls,
        "services": [
            {
                "name": name,
                "listen": str(service.address),
                "protocol": service.config.protocol,
                "clients": service.clients,
                "flows": (
                    len(service.server.flows) if isinstance(service.server, UdpFlows) else None
                ),
                "agents": sum(1 for a in agents if name in a.services),
                "exposed_by": service.exposed_by or None,
            }
            for name, service in services.items()
        ],
        "agents": [
            {
                "id": agent.agent_id,
                "name": agent.credential.name if agent.credential else None,
                "scope": _scope(agent),
                "peer": agent.peer,
                "services": list(agent.services),
                "refused": list(agent.refused),
                "connected_for": round(time.time() - agent.since, 1),
                "connections": len(agent.relays),
                "bytes_in": agent.bytes_in + sum(r.result.bytes_a_to_b for r in agent.relays),
                "bytes_out": agent.bytes_out + sum(r.result.bytes_b_to_a for r in agent.relays),
                "rate_limit": agent.credential.scope.rate if agent.credential else None,
                "limited": agent.limited,
            }
            for agent in agents
        ],
        "connections": [
            {
                "service": service.name,
                "client": relay.a.peer,
                "bytes_in": relay.result.bytes_a_to_b,
                "bytes_out": relay.result.bytes_b_to_a,
                "seconds": round(now - relay.result.started, 1),
                "waiting": waiting_for(relay, now),
            }
            for service in services.values()
            for relay in service.relays
        ],
    }


def _scope(agent: AgentSession) -> str:
    if agent.credential is None:
        return "shared join token: every service, no exposed port"
    return agent.credential.scope.describe()
