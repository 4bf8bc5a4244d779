"""UDP services in the config of both nodes: `protocol`, the flow controls and their
defaults, every mistake one problem naming its key, and a TCP and a UDP service on one
port (different protocols: no clash)."""

from __future__ import annotations

import pytest

from tcpgc.config import cc_config_from, ll_config_from
from tcpgc.errors import UsageError


def _ll(services: dict[str, object]) -> dict[str, object]:
    return {"cc": "127.0.0.1:0", "services": services}


def _problems(data: dict[str, object], parse: object = ll_config_from) -> list[str]:
    try:
        parse(data, "f.toml")  # type: ignore[operator]
    except UsageError as exc:
        return str(exc).splitlines()
    return []


def test_a_udp_service_has_its_controls_and_their_defaults() -> None:
    config = ll_config_from(
        _ll(
            {
                "dns": {"clients": "127.0.0.1:5353", "protocol": "udp", "max_flows": 50},
                "web": {"clients": "127.0.0.1:8080"},
            }
        ),
        "f.toml",
    )
    dns, web = config.services["dns"], config.services["web"]
    assert dns.udp and not web.udp
    assert (dns.udp_idle_timeout, dns.max_flows, dns.max_flows_per_source) == (60.0, 50, 500)
    assert config.window_of("dns") == 0.0  # a flow is never resumed
    assert config.window_of("web") == config.resume_window


def test_a_tcp_and_a_udp_service_may_share_a_port_but_two_udp_ones_may_not() -> None:
    both = {"clients": "127.0.0.1:5353"}
    assert _problems(_ll({"a": both, "b": {**both, "protocol": "udp"}})) == []
    problems = _problems(_ll({"a": {**both, "protocol": "udp"}, "b": {**both, "protocol": "udp"}}))
    assert len(problems) == 1
    assert problems[0].startswith("f.toml: services.b.clients: same port as services.a.clients")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"protocol": "sctp"}, "services.s.protocol"),
        ({"protocol": "udp", "max_flows": -1}, "services.s.max_flows"),
        ({"protocol": "udp", "max_flows": 0}, "services.s.max_flows"),
        ({"protocol": "udp", "max_flows_per_source": "x"}, "services.s.max_flows_per_source"),
        ({"protocol": "udp", "udp_idle_timeout": "x"}, "services.s.udp_idle_timeout"),
        ({"protocol": "udp", "udp_idle_timeout": 0}, "services.s.udp_idle_timeout"),
        ({"udp_idle_timeout": 5}, "services.s.udp_idle_timeout"),
        ({"max_flows": 5}, "services.s.max_flows"),
        ({"protocol": "udp", "rate_limit": "1Mbit"}, "services.s.rate_limit"),
        ({"protocol": "udp", "resume_window": 5}, "services.s.resume_window"),
        ({"protocol": "udp", "max_clients": 5}, "services.s.max_clients"),
    ],
)
def test_each_mistake_is_one_problem_naming_its_key(body: dict[str, object], key: str) -> None:
    problems = _problems(_ll({"s": {"clients": "127.0.0.1:0", **body}}))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"f.toml: {key}: ")


def test_the_agent_knows_its_udp_services_and_their_idle_timeout() -> None:
    config = cc_config_from(
        {
            "ll": "127.0.0.1:7000",
            "services": {
                "dns": {"server": "127.0.0.1:53", "protocol": "udp"},
                "syslog": {"server": "[::1]:514", "protocol": "udp", "udp_idle_timeout": 5},
                "web": {"server": "127.0.0.1:80"},
            },
        },
        "cc.toml",
    )
    assert config.udp_services == {"dns": 60.0, "syslog": 5.0}
    assert set(config.services) == {"dns", "syslog", "web"}


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"protocol": "quic"}, "services.s.protocol"),
        ({"udp_idle_timeout": 5}, "services.s.udp_idle_timeout"),
        ({"protocol": "udp", "proxy_protocol": 2}, "services.s.proxy_protocol"),
        ({"protocol": "udp", "udp_idle_timeout": -1}, "services.s.udp_idle_timeout"),
    ],
)
def test_each_agent_mistake_is_one_problem_naming_its_key(
    body: dict[str, object], key: str
) -> None:
    data = {"ll": "127.0.0.1:7000", "services": {"s": {"server": "127.0.0.1:53", **body}}}
    problems = _problems(data, cc_config_from)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"f.toml: {key}: ")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_refused(value: float) -> None:
    """nan compares false with everything, so it passed `< minimum`; an infinite idle
    timeout would keep every flow for ever."""
    body = {"clients": "127.0.0.1:0", "protocol": "udp", "udp_idle_timeout": value}
    problems = _problems(_ll({"s": body}))
    assert len(problems) == 1
    assert problems[0].startswith("f.toml: services.s.udp_idle_timeout: ")
    assert len(_problems({**_ll({}), "client_wait": value})) == 1
