"""Agents' own credentials, kept in the LL's state dir (`tcpgc agent add/list/revoke`).

Each agent named by the operator holds a secret of its own, and a scope: the configured
services it may serve, the ports it may expose (`tcpgc cc --expose`), how many at once,
and the bandwidth its connections may use together. Its join token has the format of the
LL's shared one (``tcpgc1.<secret>.<fingerprint>``): the LL knows it by its key id.

On disk: ``<state dir>/agents/<name>.json``, 0600, one per agent, written atomically;
revoking deletes the file. A running LL polls the folder (see `agents_fingerprint`),
so neither command needs a restart or a reload. When each agent was last seen is kept
apart, in ``agents/seen.json``, written by the LL.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcpgc.errors import UsageError
from tcpgc.identity.join_token import SECRET_SIZE, b64url, unb64url
from tcpgc.identity.secret_files import check_private, make_private_dir, write_private
from tcpgc.protocol.fields import MAX_EXPOSES, MAX_NAME, is_valid_name
from tcpgc.protocol.handshake import key_id
from tcpgc.rates import format_rate, parse_rate, rate_problem

AGENTS_DIR = "agents"
SEEN_FILE = "seen.json"
_SUFFIX = ".json"


@dataclass(frozen=True)
class AgentScope:
    """What an agent may do. Empty `services` and no `ports`: nothing (refused by
    `tcpgc agent add`, which wants at least one)."""

    services: tuple[str, ...] = ()
    #: The range of ports it may expose, inclusive; None: no port.
    ports: tuple[int, int] | None = None
    #: How many of them at once (default: the whole range, at most MAX_EXPOSES).
    max_ports: int = 0
    #: Bandwidth of all its connections together, bits/s each direction; None: unlimited.
    rate: int | None = None

    def may_serve(self, name: str) -> bool:
        return name in self.services

    def may_expose(self, port: int) -> bool:
        return self.ports is not None and self.ports[0] <= port <= self.ports[1]

    def describe_services(self) -> str:
        """The services it may serve, after "may serve": 'only web, db' / 'no service'."""
        return "only " + ", ".join(self.services) if self.services else "no service"

    def describe_ports(self) -> str:
        """The ports it may expose, after "may expose": 'only ports 8000-8005'."""
        if self.ports is None:
            return "no port"
        low, high = self.ports
        return f"only port {low}" if low == high else f"only ports {low}-{high}"

    def describe(self) -> str:
        """The whole scope in one line, for `tcpgc agent list` and the status page."""
        parts = [f"serves {self.describe_services()}", f"exposes {self.describe_ports()}"]
        if self.ports is not None:
            parts[-1] += f" (at most {self.max_ports} at once)"
        parts.append(f"rate {format_rate(self.rate)}" if self.rate else "no rate limit")
        return "; ".join(parts)


@dataclass(frozen=True)
class AgentCredential:
    name: str
    secret: bytes = field(repr=False)
    scope: AgentScope
    created: float = 0.0

    @property
    def key_id(self) -> bytes:
        return key_id(self.secret)


def agents_dir(state_dir: Path) -> Path:
    return state_dir / AGENTS_DIR


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an agent, or None."""
    if not is_valid_name(name) or name.startswith(":") or name.startswith("."):
        return (
            f"agent name {name!r} is not valid: use 1-{MAX_NAME} ASCII letters, digits, "
            "'-', '_' and '.' (not first)"
        )
    if name + _SUFFIX == SEEN_FILE:
        return f"agent name {name!r} is reserved: choose another"
    return None


def parse_ports(text: str) -> tuple[int, int]:
    """'8000' or '8000-8005' as an inclusive range; UsageError if it is not one."""
    low_text, dash, high_text = text.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if dash else low
    except ValueError:
        low = high = 0
    if not (0 < low <= high < 65536):
        raise UsageError(
            f"--ports {text!r} is not a port range: give PORT or LOW-HIGH, within 1-65535"
        )
    return low, high


def make_scope(
    services: tuple[str, ...],
    ports: tuple[int, int] | None,
    max_ports: int | None,
    rate: str | None,
) -> AgentScope:
    """The scope `tcpgc agent add` was asked for, checked; UsageError if it is wrong."""
    for name in services:
        if not is_valid_name(name) or name.startswith(":"):
            raise UsageError(f"--services: {name!r} is not a service name")
    if not services and ports is None:
        raise UsageError(
            "an agent with no service and no port could do nothing: give --services "
            "NAME[,NAME...] and/or --ports LOW-HIGH"
        )
    span = 0 if ports is None else ports[1] - ports[0] + 1
    if max_ports is not None and ports is None:
        raise UsageError("--max-ports applies only with --ports")
    if max_ports is not None and not 0 < max_ports <= MAX_EXPOSES:
        raise UsageError(f"--max-ports must be between 1 and {MAX_EXPOSES}")
    problem = rate_problem(rate) if rate is not None else None
    if problem is not None:
        raise UsageError(f"--rate: {problem}")
    bits = parse_rate(rate) if rate is not None else None
    return AgentScope(services, ports, min(max_ports or span, span, MAX_EXPOSES), bits)


def add_agent(state_dir: Path, name: str, scope: AgentScope) -> AgentCredential:
    """Create agent `name` with a fresh secret; UsageError if it exists."""
    problem = name_problem(name)
    if problem:
        raise UsageError(problem)
    folder = agents_dir(state_dir)
    make_private_dir(folder)
    path = folder / (name + _SUFFIX)
    if path.exists():
        raise UsageError(f"agent '{name}' exists: revoke it first, or choose another name")
    credential = AgentCredential(name, secrets.token_bytes(SECRET_SIZE), scope, time.time())
    write_private(path, (json.dumps(_to_json(credential), indent=1) + "\n").encode())
    if _read(path).secret != credential.secret:  # another `agent add` won the race
        raise UsageError(f"agent '{name}' exists: revoke it first, or choose another name")
    return credential


def revoke_agent(state_dir: Path, name: str) -> None:
    """Delete agent `name`'s credential; UsageError if there is none. Its secret is
    overwritten first: a copy of the state dir taken later holds nothing of it."""
    if name_problem(name):
        raise UsageError(f"no agent named {name!r}")
    path = agents_dir(state_dir) / (name + _SUFFIX)
    doomed = path.with_name(f".{path.name}.{secrets.token_hex(4)}.revoked")
    try:
        os.rename(path, doomed)  # at once out of the LL's sight, never half-erased in it
    except FileNotFoundError:
        raise UsageError(
            f"no agent named '{name}' in {agents_dir(state_dir)} ('tcpgc agent list' shows them)"
        ) from None
    with doomed.open("r+b") as file:
        file.write(b"\0" * os.fstat(file.fileno()).st_size)
        file.flush()
        os.fsync(file.fileno())
    doomed.unlink()


def load_agents(state_dir: Path, problems: list[str] | None = None) -> dict[bytes, AgentCredential]:
    """Every agent credential in `state_dir`, by key id (none if there is no folder).
    A file whose content or mode is wrong raises UsageError naming it; or, given
    `problems`, is left out and its problem appended there (one bad file must not hide
    the others). OSError (the system failed to read) is raised as it is."""
    folder = agents_dir(state_dir)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return {}
    agents: dict[bytes, AgentCredential] = {}
    for entry in names:
        if not entry.endswith(_SUFFIX) or entry == SEEN_FILE or entry.startswith("."):
            continue
        try:
            credential = _read(folder / entry)
        except FileNotFoundError:  # revoked while we read the folder
            continue
        except UsageError as exc:  # its content or its mode: the operator's to fix
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        agents[credential.key_id] = credential
    return agents


def any_may_expose(agents: dict[bytes, AgentCredential]) -> bool:
    """Whether any of `agents` may expose a port (all an LL without services serves)."""
    return any(agent.scope.ports is not None for agent in agents.values())


def agents_fingerprint(state_dir: Path) -> object:
    """Something that changes whenever an agent is added or revoked: cheap to poll."""
    folder = agents_dir(state_dir)
    try:
        with os.scandir(folder) as entries:
            return sorted(
                (e.name, e.stat().st_mtime_ns, e.stat().st_ino)
                for e in entries
                if e.name.endswith(_SUFFIX) and e.name != SEEN_FILE and not e.name.startswith(".")
            )
    except FileNotFoundError:
        return None


def read_seen(state_dir: Path) -> dict[str, float]:
    try:
        data = json.loads((agents_dir(state_dir) / SEEN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def record_seen(state_dir: Path, seen: dict[str, float]) -> None:
    """Write when agents were last seen (merged with what is recorded)."""
    folder = agents_dir(state_dir)
    if not folder.is_dir():
        return
    merged = read_seen(state_dir) | seen
    path = folder / SEEN_FILE
    tmp = folder / f".{SEEN_FILE}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps(merged).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _to_json(credential: AgentCredential) -> dict[str, Any]:
    scope = credential.scope
    return {
        "name": credential.name,
        "secret": b64url(credential.secret),
        "created": round(credential.created, 3),
        "services": list(scope.services),
        "ports": None if scope.ports is None else list(scope.ports),
        "max_ports": scope.max_ports,
        "rate": scope.rate,
    }


def _read(path: Path) -> AgentCredential:
    check_private(path)
    try:
        data = json.loads(path.read_text())
        ports = data["ports"]
        credential = AgentCredential(
            str(data["name"]),
            unb64url(str(data["secret"]), SECRET_SIZE, "secret"),
            AgentScope(
                tuple(str(s) for s in data["services"]),
                None if ports is None else (int(ports[0]), int(ports[1])),
                int(data["max_ports"]),
                None if data["rate"] is None else int(data["rate"]),
            ),
            float(data["created"]),
        )
    except (ValueError, KeyError, TypeError, IndexError, UsageError):
        raise UsageError(
            f"agent credential {path} is corrupt: revoke it ('tcpgc agent revoke "
            f"{path.stem}') and add it again"
        ) from None
    if credential.name != path.stem:
        raise UsageError(f"agent credential {path} names another agent: remove it")
    return credential
