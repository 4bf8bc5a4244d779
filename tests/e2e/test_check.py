"""`tcpgc check` on broken configs, and the logs a node writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import Harness, connect, parse_addr, recv_exactly, run_tcpgc


def _check(tmp_path: Path, text: str, *args: str) -> tuple[int, list[str], str]:
    path = tmp_path / "node.toml"
    path.write_text(text)
    result = run_tcpgc("check", "-c", str(path), *args)
    return result.returncode, result.stderr.strip().splitlines(), result.stdout


BROKEN_LL = """\
cc = "nonsense"
client_wait = -1
colour = "blue"

[services.web]
clients = "127.0.0.1:99999"
allow = ["10.0.0.0/8", "not-a-network"]
max_clients = "many"

[services."bad name"]
clients = ":8000"

[services.ssh]
listen = ":2222"
"""


def test_check_names_every_problem_of_an_ll_config(tmp_path: Path) -> None:
    code, lines, _ = _check(tmp_path, BROKEN_LL)
    assert code == 2
    assert "Traceback" not in "\n".join(lines)
    expected = {
        "cc": ":1:",
        "client_wait": ":2:",
        "colour": ":3:",
        "services.web.clients": ":6:",
        "services.web.allow": ":7:",
        "services.web.max_clients": ":8:",
        "services.bad name": ":10:",
        "services.ssh": ":13:",
    }
    for key, line in expected.items():
        found = [entry for entry in lines if f": {key}: " in entry]
        assert found, f"no problem reported for {key!r} in {lines}"
        assert line in found[0], f"{key!r} reported without its line: {found[0]!r}"
    assert len(lines) == len(expected), lines


def test_check_names_every_problem_of_a_cc_config(tmp_path: Path) -> None:
    code, lines, _ = _check(
        tmp_path,
        'll = ["127.0.0.1:8001", "nowhere"]\n'
        "reconnect_min = 5\nreconnect_max = 1\npool_size = -3\n"
        '[services.web]\nserver = "127.0.0.1:80"\nproxy_protocol = 3\n',
    )
    assert code == 2
    text = "\n".join(lines)
    for key in ("ll[1]", "reconnect_max", "pool_size", "services.web.proxy_protocol"):
        assert f": {key}: " in text, (key, text)
    assert len(lines) == 4, lines


def test_check_accepts_a_valid_config(tmp_path: Path) -> None:
    code, lines, out = _check(tmp_path, 'cc = ":8001"\n[services.web]\nclients = ":8000"\n')
    assert code == 0, lines
    assert "valid LL config" in out


def test_check_validates_the_session_and_connection_caps(tmp_path: Path) -> None:
    ll = 'cc = ":8001"\n[services.web]\nclients = ":8000"\n'
    cc = 'll = "127.0.0.1:8001"\n[services.web]\nserver = "127.0.0.1:80"\n'
    code, lines, _ = _check(tmp_path, "max_sessions_per_token = -1\n" + ll)
    assert code == 2 and len(lines) == 1 and ": max_sessions_per_token: " in lines[0], lines
    code, lines, _ = _check(
        tmp_path, 'max_connections_per_ll = "lots"\nmax_connections_per_service = 1.5\n' + cc
    )
    assert code == 2, lines
    assert len(lines) == 2, lines
    assert ": max_connections_per_ll: " in lines[0], lines
    assert ": max_connections_per_service: " in lines[1], lines
    code, lines, _ = _check(tmp_path, "max_sessions_per_token = 8\n" + ll)
    assert code == 0, lines
    code, lines, _ = _check(
        tmp_path, "max_connections_per_ll = 100\nmax_connections_per_service = 0\n" + cc
    )
    assert code == 0, lines


def test_check_reports_toml_syntax_errors_with_their_line(tmp_path: Path) -> None:
    code, lines, _ = _check(tmp_path, 'cc = ":8001"\n[services.web\nclients = ":8000"\n')
    assert code == 2
    assert len(lines) == 1 and "not valid TOML" in lines[0] and "line 2" in lines[0]


@pytest.mark.parametrize("role", ["ll", "cc"])
def test_example_configs_are_valid(role: str) -> None:
    path = Path(__file__).resolve().parents[2] / "contrib" / f"{role}.toml"
    result = run_tcpgc("check", "-c", str(path), "--role", role)
    assert result.returncode == 0, result.stderr


def test_json_logs_are_one_object_per_line(harness: Harness) -> None:
    """--log-format json: every stderr line parses, and a finished connection is one
    line naming the service, the peer, bytes each way and how it ended."""
    echo = harness.echo_server()
    state = harness.state_dir()
    token = harness.token(state)
    json_logs = ("--log-format", "json")
    ll = harness.node(
        "ll",
        "--clients",
        "127.0.0.1:0",
        "--cc",
        "127.0.0.1:0",
        "--state-dir",
        str(state),
        *json_logs,
    )
    agent_addr = ll.wait_for(r'listening for agents on (?P<addr>[^\s"]+)', 20)["addr"]
    client_addr = parse_addr(ll.wait_for(r'clients on (?P<addr>[^\s"]+)', 20)["addr"])
    cc = harness.start_cc("--ll", agent_addr, "--server", echo.addr_str, *json_logs, token=token)
    cc.wait_for(r"connected to LL", 20)
    with connect(client_addr) as sock:
        sock.sendall(b"x" * 100)
        assert recv_exactly(sock, 100) == b"x" * 100
    ll.wait_for(r"done after", 10)
    ll.stop()
    cc.stop()
    for node in (ll, cc):
        lines = [line for line in node.stderr_lines if line.strip()]
        assert lines
        entries = [json.loads(line) for line in lines]
        assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    done = [e["message"] for e in map(json.loads, ll.stderr_lines) if "done after" in e["message"]]
    assert len(done) == 1
    assert "service 'default'" in done[0] and "100 bytes in, 100 bytes out" in done[0]


def test_check_refuses_a_tokenless_admin_endpoint_beyond_loopback(tmp_path: Path) -> None:
    body = '[services.web]\nclients = ":8000"\n'
    code, lines, _ = _check(tmp_path, f'cc = ":8001"\nadmin = "0.0.0.0:9181"\n{body}')
    assert code == 2
    assert len(lines) == 1 and ":2: admin: " in lines[0], lines
    assert "admin_token_file" in lines[0] and "127.0.0.1" in lines[0], lines
    # Reported with the file's other problems, not instead of them.
    code, lines, _ = _check(tmp_path, f'cc = "nonsense"\nadmin = ":9181"\n{body}')
    assert code == 2 and len(lines) == 2, lines
    assert any(": cc: " in line for line in lines) and any(": admin: " in line for line in lines)
    token_file = tmp_path / "admin-token"
    token_file.write_text("adm-0123456789abcdef\n")
    token_file.chmod(0o600)
    with_token = f'admin = "0.0.0.0:9181"\nadmin_token_file = "{token_file}"'
    for fine in (with_token, 'admin = "[::1]:9181"'):
        code, lines, out = _check(tmp_path, f'cc = ":8001"\n{fine}\n{body}')
        assert code == 0 and "valid LL config" in out, lines


@pytest.mark.parametrize("role", ["ll", "cc"])
def test_check_validates_admin_hosts(tmp_path: Path, role: str) -> None:
    top = 'cc = ":8001"' if role == "ll" else 'll = "gw:8001"'
    body = "[services.web]\n" + ('clients = ":8000"' if role == "ll" else 'server = "s:80"')
    good = 'admin_hosts = ["gw1.example.com", "tcpgc_ll", "203.0.113.9", "[2001:db8::1]"]'
    code, lines, out = _check(tmp_path, f"{top}\n{good}\n{body}\n")
    assert code == 0 and f"valid {role.upper()} config" in out, lines
    bad = 'admin_hosts = ["gw1.example.com:9181", "*.example.com", 7]'
    code, lines, _ = _check(tmp_path, f"{top}\n{bad}\n{body}\n")
    assert code == 2 and len(lines) == 3, lines
    assert all(":2: admin_hosts: " in line for line in lines), lines
    code, lines, _ = _check(tmp_path, f'{top}\nadmin_hosts = "gw1"\n{body}\n')
    assert code == 2 and "expected a list of host names" in lines[0], lines
