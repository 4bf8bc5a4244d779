"""What an operator sees of agents with credentials of their own, on a real LL's admin
endpoint: metrics by agent (sessions, bytes, refusals, rate-limit pauses, exposed
ports) and the status page's JSON (name, scope, refusals, who exposed a port)."""

from __future__ import annotations

import json

from agent_tools import free_port_range, re_exposed, start_agents_ll
from support import READY_TIMEOUT, Harness, echo_roundtrip
from test_admin import admin_url, http_get, scrape, value

PAYLOAD = b"x" * 200_000


def test_metrics_and_status_by_agent(harness: Harness) -> None:
    env = start_agents_ll(harness, ("web",), options={"admin": "127.0.0.1:0"})
    base = admin_url(env.ll)
    server = harness.echo_server()
    port = free_port_range(2)
    token = env.add("laptop", "--ports", str(port), "--rate", "20Mbit")
    env.start_cc(
        token,
        name="laptop",
        exposes=[f"127.0.0.1:{port}={server.addr_str}", f"127.0.0.1:{port + 1}=127.0.0.1:1"],
    )
    env.ll.wait_for(re_exposed(port), READY_TIMEOUT)
    shared = env.harness.token(env.state_dir)
    env.start_cc(shared, name="shared", services={"web": server.addr_str})
    env.ll.wait_for(r"services: web\)", READY_TIMEOUT)

    # 200 kB each way at 20 Mbit/s: past the first burst, so the agent's limit bites.
    assert echo_roundtrip(("127.0.0.1", port), PAYLOAD, timeout=20) == PAYLOAD
    assert echo_roundtrip(env.client_addrs["web"], b"hello") == b"hello"
    env.ll.wait_for(rf"client \S+ of service ':{port}' done", READY_TIMEOUT)

    samples = scrape(base)
    assert value(samples, "tcpgc_agent_sessions", agent="laptop") == 1
    assert value(samples, "tcpgc_agent_sessions", agent="shared") == 1
    assert value(samples, "tcpgc_agent_refusals_total", agent="laptop") == 1  # port + 1
    assert value(samples, "tcpgc_exposed_ports") == 1
    assert value(samples, "tcpgc_agent_bytes_total", agent="laptop", direction="in") >= len(PAYLOAD)
    assert value(samples, "tcpgc_agent_bytes_total", agent="shared", direction="out") >= 5
    assert value(samples, "tcpgc_agent_rate_limited_total", agent="laptop") > 0
    assert value(samples, "tcpgc_agent_rate_limited_total", agent="shared") == 0
    assert value(samples, "tcpgc_bytes_total", service=f":{port}", direction="out") >= len(PAYLOAD)
    # No agent id (which agents choose) ever becomes a label.
    labels = {dict(key[1]).get("agent") for key in samples if key[0].startswith("tcpgc_agent_")}
    assert labels == {"laptop", "shared"}, labels

    status, _, body = http_get(base + "/status.json")
    assert status == 200, body
    state = json.loads(body)
    exposed = [s for s in state["services"] if s["name"] == f":{port}"]
    assert exposed and exposed[0]["exposed_by"] == "laptop", state["services"]
    web = [s for s in state["services"] if s["name"] == "web"]
    assert web and web[0]["exposed_by"] is None, state["services"]
    agents = {a["name"]: a for a in state["agents"]}
    assert set(agents) == {"laptop", None}, state["agents"]
    laptop = agents["laptop"]
    assert f"only port {port}" in laptop["scope"] and "20 Mbit/s" in laptop["scope"], laptop
    assert len(laptop["refused"]) == 1 and f"port {port + 1}" in laptop["refused"][0], laptop
    assert laptop["bytes_in"] >= len(PAYLOAD) and laptop["limited"] > 0, laptop
    assert laptop["rate_limit"] == 20_000_000, laptop
    assert "no exposed port" in agents[None]["scope"], agents[None]
    assert token.split(".")[1] not in body  # the secret is never shown
