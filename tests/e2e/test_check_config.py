"""`tcpgc check -c FILE` reports whatever would make `tcpgc ll -c FILE` or `tcpgc cc -c
FILE` refuse at configuration time, naming the key and its line; and the node refuses
the same files with one line and exit status 2 before it listens on anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import make_token, run_tcpgc, tcpgc_env


def _check(path: Path, text: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run check on `text`; assert it refuses with status 2; return its problem lines."""
    path.write_text(text)
    result = run_tcpgc("check", "-c", str(path), *args, env=env)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "valid" not in result.stdout
    return result.stderr.strip().splitlines()


def _with_token(tmp_path: Path) -> dict[str, str]:
    return tcpgc_env({"TCPGC_TOKEN": make_token(tmp_path / "ll-state")})


def _reported(lines: list[str], path: Path, line: int, key: str) -> str:
    wanted = f"{path}:{line}: {key}: "
    found = [entry for entry in lines if wanted in entry]
    assert found, f"no problem for {key!r} at line {line} in {lines}"
    return found[0]


def test_empty_file_lacks_cc_and_services(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(path, "")
    _reported(lines, path, 1, "cc")
    _reported(lines, path, 1, "services")


def test_ll_file_without_cc(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(path, '[services.web]\nclients = "127.0.0.1:0"\n')
    assert "missing" in _reported(lines, path, 1, "cc")
    assert len(lines) == 1, lines


def test_ll_file_without_services(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(path, 'cc = "127.0.0.1:0"\n')
    _reported(lines, path, 1, "services")
    assert len(lines) == 1, lines


def test_cc_file_without_services(tmp_path: Path) -> None:
    path = tmp_path / "cc.toml"
    lines = _check(path, 'll = "127.0.0.1:8001"\n', env=_with_token(tmp_path))
    _reported(lines, path, 1, "services")


def test_invalid_ipv4_address(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(path, 'cc = "127.0.0.1:0"\n\n[services.web]\nclients = "10.0.0.300:8000"\n')
    assert "10.0.0.300" in _reported(lines, path, 4, "services.web.clients")
    assert len(lines) == 1, lines


def test_listen_host_name_that_does_not_resolve(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(path, 'cc = "no-such-host.invalid:8001"\n[services.web]\nclients = ":0"\n')
    assert "does not resolve" in _reported(lines, path, 1, "cc")


def test_two_services_on_one_port(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    text = (
        'cc = "127.0.0.1:0"\n'
        '[services.web]\nclients = "0.0.0.0:18080"\n'
        '[services.api]\nclients = "127.0.0.1:18080"\n'
    )
    lines = _check(path, text)
    assert "services.web.clients" in _reported(lines, path, 5, "services.api.clients")
    assert len(lines) == 1, lines


def test_agent_port_shared_with_a_service(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(path, 'cc = ":18001"\n[services.web]\nclients = "[::1]:18001"\n')
    _reported(lines, path, 3, "services.web.clients")


def test_ipv4_and_ipv6_only_wildcards_do_not_collide(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    path.write_text(
        'cc = "127.0.0.1:0"\n[services.a]\nclients = "0.0.0.0:18081"\n'
        '[services.b]\nclients = "[::]:18081"\n'
    )
    result = run_tcpgc("check", "-c", str(path))
    assert result.returncode == 0, result.stderr


def test_missing_admin_token_file(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(
        path,
        'cc = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\n'
        f'admin_token_file = "{tmp_path}/nope"\n[services.web]\nclients = "127.0.0.1:0"\n',
    )
    assert "No such file" in _reported(lines, path, 3, "admin_token_file")


def test_missing_token_file(tmp_path: Path) -> None:
    path = tmp_path / "cc.toml"
    lines = _check(
        path,
        f'll = "127.0.0.1:8001"\ntoken_file = "{tmp_path}/nope"\n'
        '[services.web]\nserver = "127.0.0.1:80"\n',
    )
    assert "No such file" in _reported(lines, path, 2, "token_file")


def test_misspelled_server_key_is_named_once_with_the_other_problems(tmp_path: Path) -> None:
    path = tmp_path / "cc.toml"
    text = 'll = "127.0.0.1:8001"\n[services.web]\nsever = "127.0.0.1:80"\nproxy_protocol = "v2"\n'
    lines = _check(path, text, env=_with_token(tmp_path))
    # One mistake, one line: the missing key, at its table, naming the misspelling.
    missing = _reported(lines, path, 2, "services.web")
    assert "missing key 'server'" in missing and "'sever'" in missing, missing
    assert "did you mean 'server'" in missing, missing
    _reported(lines, path, 4, "services.web.proxy_protocol")
    assert len(lines) == 2, lines


def test_misspelled_clients_key_on_the_ll(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(path, 'cc = "127.0.0.1:0"\n[services.web]\nclient = ":8000"\nmax_clients = -1\n')
    assert "did you mean 'clients'" in _reported(lines, path, 2, "services.web")
    _reported(lines, path, 4, "services.web.max_clients")


def test_cc_without_token_anywhere_passes_with_a_note(tmp_path: Path) -> None:
    """The token is the one thing a file normally leaves out (systemd passes
    --token-file): check says where the node will look instead of refusing."""
    path = tmp_path / "cc.toml"
    path.write_text('ll = "127.0.0.1:8001"\n[services.web]\nserver = "127.0.0.1:80"\n')
    result = run_tcpgc("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "TCPGC_TOKEN" in result.stdout


def test_malformed_token_in_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "cc.toml"
    lines = _check(
        path,
        'll = "127.0.0.1:8001"\n[services.web]\nserver = "127.0.0.1:80"\n',
        env=tcpgc_env({"TCPGC_TOKEN": "not-a-token"}),
    )
    _reported(lines, path, 1, "token_file")


@pytest.mark.parametrize(
    ("role", "text"),
    [
        ("ll", ""),
        ("ll", 'cc = "127.0.0.1:0"\n[services.web]\nclients = "10.0.0.300:8000"\n'),
        (
            "ll",
            'cc = "127.0.0.1:0"\n[services.a]\nclients = "127.0.0.1:18082"\n'
            '[services.b]\nclients = "127.0.0.1:18082"\n',
        ),
        (
            "ll",
            'cc = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\nadmin_token_file = "/nonexistent"\n'
            '[services.web]\nclients = "127.0.0.1:0"\n',
        ),
        ("cc", 'll = "127.0.0.1:1"\n[services.web]\nsever = "127.0.0.1:80"\n'),
    ],
)
def test_node_refuses_what_check_refuses_before_listening(
    tmp_path: Path, role: str, text: str
) -> None:
    """The same files make the node print problems and exit 2, with no 'listening'
    line first (an admin token that cannot be read used to fail after three)."""
    path = tmp_path / f"{role}.toml"
    path.write_text(text)
    state = tmp_path / "state"
    token = make_token(state)
    extra = ["--state-dir", str(state)] if role == "ll" else []
    result = run_tcpgc(role, "-c", str(path), *extra, env=tcpgc_env({"TCPGC_TOKEN": token}))
    assert result.returncode == 2, result.stderr
    assert "listening" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip(), "no reason given"
    checked = run_tcpgc("check", "-c", str(path), "--role", role)
    assert checked.returncode == 2, checked.stderr


def test_bind_error_names_the_config_key(tmp_path: Path) -> None:
    """A taken agent port named in the file is reported as 'cc', not as the flag."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "ll.toml"
        path.write_text(f'cc = "127.0.0.1:{port}"\n[services.web]\nclients = "127.0.0.1:0"\n')
        result = run_tcpgc("ll", "-c", str(path), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2, result.stderr
    assert "(cc)" in result.stderr and "--cc" not in result.stderr, result.stderr
    assert os.path.exists(tmp_path / "s")


def test_resume_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "ll.toml"
    lines = _check(
        path,
        'cc = "127.0.0.1:0"\nresume_window = -1\nresume_buffer = 1000\n'
        'resume_memory = "lots"\n'
        '[services.web]\nclients = "127.0.0.1:0"\nresume_window = "long"\n',
    )
    assert ">= 0.0" in _reported(lines, path, 2, "resume_window")
    assert "512 KiB" in _reported(lines, path, 3, "resume_buffer")
    _reported(lines, path, 4, "resume_memory")
    _reported(lines, path, 7, "services.web.resume_window")
    assert len(lines) == 4, lines
