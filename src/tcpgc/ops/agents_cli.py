"""`tcpgc agent add | list | revoke`: agents' own credentials in the LL's state dir.

`add` prints the new agent's join token on stdout (nothing else, so it can be piped to
where the agent reads it) and what it may do on stderr. A running LL sees each change
within a second: no restart, no reload.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tcpgc.config import LLConfig, ll_config_from, read_toml
from tcpgc.identity import (
    SECRET_FILE,
    Certificate,
    Identity,
    JoinToken,
    default_state_dir,
    load_identity,
)
from tcpgc.identity.agents import (
    add_agent,
    load_agents,
    make_scope,
    parse_ports,
    read_seen,
    revoke_agent,
)


def ll_state(args: argparse.Namespace) -> tuple[LLConfig, Path]:
    """The LL's config (-c, if given) and its state dir as `tcpgc token` and `tcpgc
    agent` see it: --state-dir, else the config's, else the default."""
    config = ll_config_from(read_toml(args.config), str(args.config)) if args.config else LLConfig()
    return config, args.state_dir or config.state_dir or default_state_dir()


def _presented(identity: Identity, config: LLConfig) -> Identity:
    """With the config's own certificate if it names one (the fingerprint agents pin)."""
    if config.tls_cert is not None and config.tls_key is not None:
        return identity.with_certificate(Certificate.load(config.tls_cert, config.tls_key))
    return identity


def ll_identity(args: argparse.Namespace, *, create: bool) -> tuple[Identity, LLConfig]:
    """The LL's identity as `tcpgc token` and `tcpgc agent` see it (see `ll_state`)."""
    config, state_dir = ll_state(args)
    return _presented(load_identity(state_dir, create=create), config), config


def run_agent(args: argparse.Namespace) -> int:
    if args.verb == "add":
        return _add(args)
    identity, _ = ll_identity(args, create=False)
    if args.verb == "revoke":
        revoke_agent(identity.state_dir, args.name)
        print(
            f"agent '{args.name}' revoked: a running LL closes its connections and its "
            "exposed ports within seconds, and refuses its token from now on",
            file=sys.stderr,
        )
        return 0
    _list(identity, as_json=args.json)
    return 0


def _add(args: argparse.Namespace) -> int:
    services = tuple(name for name in args.services.split(",") if name)
    ports = parse_ports(args.ports) if args.ports is not None else None
    scope = make_scope(services, ports, args.max_ports, args.rate)
    config, state_dir = ll_state(args)
    new_identity = not (state_dir / SECRET_FILE).exists()
    identity = _presented(load_identity(state_dir, create=True), config)
    credential = add_agent(identity.state_dir, args.name, scope)
    print(JoinToken(credential.secret, identity.fingerprint))
    if new_identity:
        print(
            f"warning: there was no LL identity in {state_dir}: created one. Start the LL "
            "with this state dir (--state-dir, or state_dir in its config), or this "
            "agent's token will not be accepted",
            file=sys.stderr,
        )
    if ports is not None and ports[0] < 1024:
        print(
            f"warning: ports {ports[0]}-{ports[1]} include privileged ones (below 1024): "
            "an LL running as root lets this agent listen on them",
            file=sys.stderr,
        )
    unknown = [name for name in services if args.config and name not in config.services]
    if unknown:
        print(
            f"warning: {', '.join(unknown)} not configured in {args.config}: the agent can "
            "serve them only once the LL's config has them",
            file=sys.stderr,
        )
    example = "-c cc.toml    # with a [services.NAME] section for each service"
    if ports is not None:
        example = f"--ll THIS_HOST:PORT --expose {ports[0]}=SERVER_HOST:PORT"
    print(
        f"agent '{credential.name}' added: it {scope.describe()}.\n"
        "Its join token is above (shown once; 'tcpgc agent revoke' ends it). On the "
        "agent's host:\n"
        "  read -rs TCPGC_TOKEN && export TCPGC_TOKEN\n"
        f"  tcpgc cc {example}",
        file=sys.stderr,
    )
    return 0


def _list(identity: Identity, *, as_json: bool) -> None:
    problems: list[str] = []
    agents = sorted(load_agents(identity.state_dir, problems).values(), key=lambda a: a.name)
    seen = read_seen(identity.state_dir)
    rows = [
        {
            "name": agent.name,
            "services": list(agent.scope.services),
            "ports": None if agent.scope.ports is None else list(agent.scope.ports),
            "max_ports": agent.scope.max_ports,
            "rate": agent.scope.rate,
            "scope": agent.scope.describe(),
            "created": agent.created,
            "last_seen": seen.get(agent.name),
        }
        for agent in agents
    ]
    for problem in problems:  # on stderr: stdout stays a clean listing
        print(f"tcpgc: unreadable (its agent is refused): {problem}", file=sys.stderr)
    if as_json:
        print(json.dumps({"agents": rows, "unreadable": problems}, indent=1))
        return
    if not rows:
        print("no agents: add one with 'tcpgc agent add NAME --services ... | --ports ...'")
        return
    for row in rows:
        last = row["last_seen"]
        when = _ago(last) if isinstance(last, float) else "never seen"
        print(f"{row['name']}\t{row['scope']}\t{when}")


def _ago(moment: float) -> str:
    seconds = max(0, int(time.time() - moment))
    if seconds < 120:
        return f"seen {seconds} s ago"
    if seconds < 7200:
        return f"seen {seconds // 60} min ago"
    return "seen " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(moment))
