"""The LL's start-up instructions: they name the LL's own services, give an agent
config that serves them (which works when followed), and go to stderr through logging
(JSON records under --log-format json). An agent offering a service the LL lacks is
named in a warning with the services the LL has."""

from __future__ import annotations

import json
import re

from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_PORT,
    Harness,
    Node,
    echo_roundtrip,
    node_toml,
    parse_addr,
    service_re,
)

BANNER = r"tcpgc LL is up"
READY = 20.0


def _ll_two_services(harness: Harness, *extra: str) -> tuple[Node, str]:
    state = harness.state_dir()
    token = harness.token(state)
    config = harness.tmp_path / "ll.toml"
    config.write_text(
        node_toml(
            {"cc": "127.0.0.1:0", "state_dir": str(state)},
            {"web": {"clients": "127.0.0.1:0"}, "ssh": {"clients": "127.0.0.1:0"}},
        )
    )
    ll = harness.node("ll", "-c", str(config), *extra, name="ll")
    return ll, token


def _banner_text(lines: list[str]) -> str:
    """The banner record and the lines that continue it (text format)."""
    for i, line in enumerate(lines):
        if re.search(BANNER, line):
            rest = []
            for follow in lines[i + 1 :]:
                if re.match(r"\d{4}-\d\d-\d\d ", follow):
                    break
                rest.append(follow)
            return "\n".join([line, *rest])
    raise AssertionError(f"no banner in {lines}")


def test_banner_names_the_services_and_its_config_serves_them(harness: Harness) -> None:
    ll, token = _ll_two_services(harness)
    agent = ll.wait_for(RE_LL_AGENT_PORT, READY)["addr"]
    clients = {
        name: parse_addr(ll.wait_for(service_re(name), READY)["addr"]) for name in ("web", "ssh")
    }
    ll.wait_for(BANNER, READY)
    banner = _banner_text(ll.stderr_lines)
    assert not any(line.strip() for line in ll.stdout_lines), ll.stdout_lines
    assert "services: web, ssh" in banner, banner
    assert "--server SERVER_HOST:PORT" not in banner, banner
    assert "[services.web]" in banner and "[services.ssh]" in banner, banner
    assert f'll = "{agent}"' in banner, banner

    # Follow it: the indented lines are cc.toml, each server filled in.
    snippet = "\n".join(
        line[4:] if line.startswith("    ") else line
        for line in banner.splitlines()
        if line.startswith("    ") or line == ""
    )
    web, ssh = harness.echo_server(prefix=b"web:"), harness.echo_server(prefix=b"ssh:")
    for server in (web, ssh):
        snippet = snippet.replace('"SERVER_HOST:PORT"', f'"{server.addr_str}"', 1)
    cc_toml = harness.tmp_path / "cc.toml"
    cc_toml.write_text(snippet + "\n")
    cc = harness.start_cc("-c", str(cc_toml), token=token)
    cc.wait_for(RE_CC_JOINED, READY)
    assert echo_roundtrip(clients["web"], b"hello")[:4] == b"web:"
    assert echo_roundtrip(clients["ssh"], b"hello")[:4] == b"ssh:"
    assert not ll.find_all("does not have")


def test_single_default_service_gets_the_command(harness: Harness) -> None:
    state = harness.state_dir()
    harness.token(state)
    ll = harness.node(
        "ll", "--clients", "127.0.0.1:0", "--cc", "127.0.0.1:0", "--state-dir", str(state)
    )
    agent = ll.wait_for(RE_LL_AGENT_PORT, READY)["addr"]
    ll.wait_for(BANNER, READY)
    banner = _banner_text(ll.stderr_lines)
    assert f"tcpgc cc --ll {agent} --server SERVER_HOST:PORT" in banner, banner
    assert not any(line.strip() for line in ll.stdout_lines), ll.stdout_lines


def test_banner_is_a_json_record_under_json_logs(harness: Harness) -> None:
    ll, _ = _ll_two_services(harness, "--log-format", "json")
    ll.wait_for(BANNER, READY)
    ll.wait_for(r"\}$", READY)
    entries = [json.loads(line) for line in ll.stderr_lines if line.strip()]
    banners = [e for e in entries if "tcpgc LL is up" in e["message"]]
    assert len(banners) == 1, entries
    assert "[services.ssh]" in banners[0]["message"]
    assert not any(line.strip() for line in ll.stdout_lines), ll.stdout_lines


def test_agent_with_a_service_the_ll_lacks_is_named(harness: Harness) -> None:
    """The old banner's command made the agent offer 'default' to an LL with 'web' and
    'ssh': both nodes now name what the agent offers and what the LL has."""
    ll, token = _ll_two_services(harness)
    agent = ll.wait_for(RE_LL_AGENT_PORT, READY)["addr"]
    echo = harness.echo_server()
    cc = harness.start_cc("--ll", agent, "--server", echo.addr_str, token=token)
    cc.wait_for(RE_CC_JOINED, READY)
    warning = ll.wait_for(r"WARNING .*offers services this LL does not have: (?P<rest>.*)", READY)
    assert warning["rest"] == "default (this LL has: web, ssh)", warning.string
    # The LL tells the agent its services (in READY): the agent says it too.
    line = cc.wait_for(r"WARNING .*LL \S+ does not have services: (?P<rest>.*)", READY)
    assert line["rest"].startswith("default (it has: web, ssh)"), line.string
