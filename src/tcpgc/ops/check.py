"""`tcpgc check -c FILE`: every reason the node would refuse FILE, one line each.

The file is judged as the node would run it with `-c FILE` alone: what a flag could
supply (`--cc`, `--clients`, `--ll`, `--server`) must be in the file. The one exception
is the agent's join token, which normally comes from outside the file ($TCPGC_TOKEN, or
`--token-file` from a systemd credential): without `token_file` the check reads
$TCPGC_TOKEN if it is set, and otherwise only notes where the node will look for it.

Beyond the file's syntax and values it does what the node does at start before it
serves: reads the files the config names (tokens, certificates, keys), resolves the host
names it must listen on, and finds listen addresses inside the file that collide.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from tcpgc.admin_access import exposure_problem
from tcpgc.config import (
    Address,
    LLConfig,
    cc_config_from,
    find_key_line,
    ll_config_from,
    ll_listeners,
    parse_address,
    read_toml,
)
from tcpgc.errors import UsageError
from tcpgc.identity import Certificate, check_private, default_state_dir, read_token
from tcpgc.identity.agents import any_may_expose, load_agents

EXIT_USAGE = 2

#: Path keys whose files the node reads at start, and whether they hold a secret.
_LL_FILES = {"admin_token_file": True, "tls_cert": False, "tls_key": True, "tls_client_ca": False}
_CC_FILES = {"admin_token_file": True, "tls_ca": False, "tls_cert": False, "tls_key": True}


def read_admin_token(path: Path | None) -> str | None:
    """The admin endpoint's bearer token from `admin_token_file` (None: no file)."""
    if path is None:
        return None
    try:
        check_private(path)
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read admin_token_file {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"admin_token_file {path} is empty")
    return token


def run_check(path: Path, role: str | None) -> int:
    """Print every problem of the config file at `path` (exit status 2), or that it is
    valid (0)."""
    data = read_toml(path)
    source = str(path)
    guessed = role is None
    if role is None:
        role = "cc" if "ll" in data or _has_service_key(data, "server") else "ll"
    problems: list[str] = []
    notes: list[str] = []
    config: Any = None
    try:
        parse = ll_config_from if role == "ll" else cc_config_from
        config = parse(data, source)
    except UsageError as exc:
        problems += str(exc).splitlines()
    problems += _required(data, role, source, guessed)
    problems += _files(data, _LL_FILES if role == "ll" else _CC_FILES, source)
    if role == "cc":
        problems += _token(data, source, notes)
    elif isinstance(config, LLConfig):
        problems += _unresolved(config, source)
        if not config.services and not problems:
            notes.append(
                "no [services.NAME]: this LL serves only ports its agents expose (agents "
                "given them with 'tcpgc agent add NAME --ports LOW-HIGH')"
            )
    problems += _exposure(data, source)
    if problems:
        text = path.read_text(errors="replace")
        for problem in dict.fromkeys(problems):  # each once, in order
            print(f"tcpgc: {_with_line(problem, text)}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: valid {role.upper()} config")
    for note in notes:
        print(f"note: {note}")
    return 0


def _exposure(data: dict[str, Any], source: str) -> list[str]:
    """A tokenless admin endpoint beyond loopback, which the node refuses (read from the
    raw data: the file may have other problems as well)."""
    try:
        admin = parse_address(data["admin"], "admin") if "admin" in data else None
    except UsageError:
        return []  # reported by the config's own validation
    token_file = data.get("admin_token_file")
    problem = exposure_problem(admin, Path(token_file) if isinstance(token_file, str) else None)
    return [] if problem is None else [f"{source}: admin: {problem}"]


def _has_service_key(data: dict[str, Any], key: str) -> bool:
    services = data.get("services")
    return isinstance(services, dict) and any(
        isinstance(body, dict) and key in body for body in services.values()
    )


def _required(data: dict[str, Any], role: str, source: str, guessed: bool) -> list[str]:
    """What a node started with `-c FILE` alone needs and the file lacks."""
    problems = []
    hint = " (checked as an LL config: give --role cc for an agent's)" if guessed else ""
    if role == "ll" and "cc" not in data:
        problems.append(f'{source}: cc: missing: where agents connect, e.g. cc = ":8001"{hint}')
    if role == "cc" and "ll" not in data:
        problems.append(f'{source}: ll: missing: the LL\'s agent address, e.g. ll = "gw:8001"')
    services = data.get("services")
    # An agent may only expose ports; an LL may only serve the ports agents expose.
    exposes = _agents_may_expose(data) if role == "ll" else bool(data.get("expose"))
    if (services is None or services == {}) and not exposes:
        if role == "ll":
            example = 'clients = ":8000", or let an agent expose ports (\'tcpgc agent add '
            example += f"NAME --ports LOW-HIGH'){hint}"
        else:
            example = 'server = "127.0.0.1:80", or expose a port: expose = ["8000=127.0.0.1:80"]'
        problems.append(
            f"{source}: services: no [services.NAME] section: add one, e.g. "
            f"[services.web] with {example}"
        )
    return problems


def _agents_may_expose(data: dict[str, Any]) -> bool:
    """Whether the LL's state dir holds an agent that may expose ports (all an LL
    without services could serve)."""
    state_dir = data.get("state_dir")
    try:
        folder = Path(state_dir) if isinstance(state_dir, str) else default_state_dir()
        agents = load_agents(folder, [])  # unreadable ones are the LL's to report
    except OSError:
        return False
    return any_may_expose(agents)


def _files(data: dict[str, Any], keys: dict[str, bool], source: str) -> list[str]:
    """The files the node reads at start: each must be there and readable, and a file
    holding a secret must not be readable by others."""
    problems = []
    for key, secret in keys.items():
        value = data.get(key)
        if not isinstance(value, str) or not value:
            continue  # absent, or already reported as not a path
        path = Path(value)
        try:
            if key == "admin_token_file":
                read_admin_token(path)
                continue
            if secret:
                check_private(path)
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"{source}: {key}: cannot read {path}: {exc.strerror}")
        except UsageError as exc:
            problems.append(f"{source}: {key}: {exc}")
    cert, private = data.get("tls_cert"), data.get("tls_key")
    ll_pair = "tls_client_ca" in keys and isinstance(cert, str) and isinstance(private, str)
    if ll_pair and not problems:
        try:
            Certificate.load(Path(str(cert)), Path(str(private)))
        except (OSError, UsageError) as exc:
            problems.append(f"{source}: tls_cert: {exc}")
    return problems


def _token(data: dict[str, Any], source: str, notes: list[str]) -> list[str]:
    value = data.get("token_file")
    env = os.environ.get("TCPGC_TOKEN")
    if isinstance(value, str) and value:
        try:
            read_token(None, Path(value))
        except UsageError as exc:
            return [f"{source}: token_file: {exc}"]
    elif env:
        try:
            read_token(env, None)
        except UsageError as exc:
            return [f"{source}: token_file: not set, and $TCPGC_TOKEN is not a token: {exc}"]
    elif "token_file" not in data:
        notes.append(
            "no token_file: the node takes its join token from $TCPGC_TOKEN or "
            "--token-file FILE (as contrib/tcpgc-cc.service does)"
        )
    return []


def _unresolved(config: LLConfig, source: str) -> list[str]:
    """Listen addresses given by host name that do not resolve here."""
    problems = []
    for label, address in ll_listeners(config):
        if address.host and not _is_literal(address):
            try:
                socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                problems.append(
                    f"{source}: {label}: host {address.host!r} does not resolve ({exc.strerror})"
                )
    return problems


def _is_literal(address: Address) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address.host.split("%", 1)[0])
        except OSError:
            continue
        return True
    return False


def _with_line(problem: str, text: str) -> str:
    """'FILE: key: message' -> 'FILE:LINE: key: message'. A key that is missing from
    the file altogether is pointed at line 1 (top-level keys) or at its table."""
    parts = problem.split(": ", 2)
    if len(parts) < 3:
        return problem
    line = find_key_line(text, parts[1])
    if line is None and not parts[1].startswith(("services.", "ll[")):
        line = 1
    return problem if line is None else f"{parts[0]}:{line}: {parts[1]}: {parts[2]}"
