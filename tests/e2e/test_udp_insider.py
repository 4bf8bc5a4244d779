"""A hostile agent against a UDP service: it holds a real token and answers each flow's
OPEN with a data connection that ends the flow (or breaks its framing) in the same
write as its DATA. Each such flow must end there and then on the LL, giving its place
under `max_flows` back, with no internal error; new flows keep being offered."""

from __future__ import annotations

import socket

import pytest

from attack_tools import insider, start_env
from support import Harness
from tcpgc.protocol.chunks import END

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "then", [END, (70000).to_bytes(4, "big"), b"\x00\x00"], ids=["end", "oversized", "cut"]
)
def test_flows_ended_with_their_data_give_back_their_place(harness: Harness, then: bytes) -> None:
    env = start_env(harness, services={"dns": {"protocol": "udp", "max_flows": 3}}, with_cc=False)
    addr = env.client_addrs["dns"]
    clients: list[socket.socket] = []
    try:
        with insider(env, ("dns",)) as agent:
            for i in range(8):  # more than max_flows: each must free its place
                client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                clients.append(client)
                client.sendto(b"query %d" % i, addr)
                opened = agent.next_open(timeout=10)  # times out if the cap was kept
                assert opened.service == "dns"
                data = agent.claim(opened.conn_id, then=then)
                if then == b"\x00\x00":
                    data.close()  # a header cut short, then the connection closes
                else:
                    data.settimeout(5)
                    data.recv(65536)  # the LL ends too (its end marker) or closes
                    data.close()
    finally:
        for client in clients:
            client.close()
    log = env.ll.output()
    assert "Traceback" not in log and "internal error" not in log
