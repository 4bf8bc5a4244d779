"""Command line → configuration → the node APIs and the runner. No logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from tcpgc.addresses import format_endpoint
from tcpgc.admin_access import exposure_problem
from tcpgc.cc.node import ConnectNode
from tcpgc.cli_args import EXIT_USAGE, build_parser, cc_config, ll_config
from tcpgc.config import DEFAULT_SERVICE, CCConfig, LLConfig
from tcpgc.environment import take_from_environment
from tcpgc.errors import UsageError
from tcpgc.identity import (
    JoinToken,
    format_fingerprint,
    read_token,
    retire_previous,
    rotate,
)
from tcpgc.ll.node import ListenNode
from tcpgc.memory_trim import tune_allocator
from tcpgc.ops.agents_cli import ll_identity, ll_state, run_agent
from tcpgc.ops.check import read_admin_token, run_check
from tcpgc.ops.logs import setup_logging
from tcpgc.runner import Reload, Service, choose_loop, raise_fd_limit, run_on, serve_until_stopped

log = logging.getLogger("tcpgc")


class NodeWithAdmin:
    """A node and its admin endpoint (if the config asks for one), started and closed
    together: what the runner runs for `tcpgc ll` and `tcpgc cc`."""

    def __init__(self, node: ListenNode | ConnectNode, admin_token: str | None) -> None:
        self.node = node
        self._admin_token = admin_token
        self._admin: Service | None = None

    async def start(self) -> None:
        node = self.node
        await node.start()
        if node.config.admin is not None:
            from tcpgc.ops.admin import AdminServer  # only nodes that serve it pay for it

            admin = AdminServer(node, node.config.admin, self._admin_token, node.config.admin_hosts)
            self._admin = admin
            await admin.start()
            log.info("admin endpoint on http://%s/", admin.address)
        if isinstance(node, ListenNode):
            # Through logging, to stderr: a JSON record under --log-format json.
            log.info("%s", instructions(node))

    async def drain(self, deadline: float) -> None:
        await self.node.drain(deadline)

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()
        await self.node.close()


async def _no_reload() -> None:
    log.warning("SIGHUP: no config file (-c) to reload")


def _refuse_exposed_admin(config: LLConfig | CCConfig) -> None:
    """Before anything listens: no tokenless admin endpoint beyond loopback."""
    problem = exposure_problem(config.admin, config.admin_token_file)
    if problem is not None:
        raise UsageError(problem)


OWN_CREDENTIALS = (
    "\nOr give an agent a token of its own, scoped to some services or to ports it may "
    "expose (tcpgc cc --expose PORT=SERVER): tcpgc agent add NAME --ports LOW-HIGH"
)


def instructions(node: ListenNode) -> str:
    """What the LL logs once it is up: how to start an agent that serves exactly the
    services this LL has (an agent offering others would be sent none of their clients)."""
    assert node.identity is not None and node.agent_address is not None
    agent = node.agent_address
    host = agent.host if agent.host not in ("0.0.0.0", "::", "") else "THIS_HOST"
    where = format_endpoint(host, agent.port)
    names = [name for name, service in node.services.items() if not service.exposed_by]
    plain = " --insecure-plaintext" if node.config.insecure_plaintext else ""
    if not names:
        return (
            f"tcpgc LL is up; its identity is {format_fingerprint(node.identity.fingerprint)}; "
            "no services: it serves only ports its agents expose.\n"
            "Give an agent a token of its own with the ports it may expose (run here):\n"
            f"  tcpgc agent add NAME --ports LOW-HIGH --state-dir {node.identity.state_dir}\n"
            "then on the inside host, with that token:\n"
            "  read -rs TCPGC_TOKEN && export TCPGC_TOKEN\n"
            f"  tcpgc cc --ll {where} --expose PORT=SERVER_HOST:PORT{plain}"
        )
    head = (
        f"tcpgc LL is up; its identity is {format_fingerprint(node.identity.fingerprint)}; "
        f"services: {', '.join(names)}.\n"
        f"On the inside host, put the join token in the environment (paste the output of\n"
        f"'tcpgc token --state-dir {node.identity.state_dir}' run here):\n"
        f"  read -rs TCPGC_TOKEN && export TCPGC_TOKEN\n"
    )
    if names == [DEFAULT_SERVICE]:
        return (
            head
            + f"then start the agent:\n  tcpgc cc --ll {where} --server SERVER_HOST:PORT{plain}"
            + OWN_CREDENTIALS
        )
    lines = [f'll = "{where}"']
    if node.config.insecure_plaintext:
        lines.append("insecure_plaintext = true")
    for name in names:
        lines += ["", f"[services.{name}]", 'server = "SERVER_HOST:PORT"']
    snippet = "\n".join(f"    {line}" if line else "" for line in lines)
    return (
        head
        + "then write cc.toml, with each service's server (names must match this LL's):\n"
        + snippet
        + "\nand start the agent:\n  tcpgc cc -c cc.toml"
        + OWN_CREDENTIALS
    )


def _token(args: argparse.Namespace) -> JoinToken | None:
    """The join token to print; None after --retire-previous, which changes no token."""
    if args.rotate or args.rotate_certificate:
        _, state_dir = ll_state(args)
        rotate(state_dir, secret=args.rotate, certificate=args.rotate_certificate)
        print(
            "rotated: send the LL SIGHUP (or restart it) to accept the new token besides "
            "the old one, update the agents, then run 'tcpgc token --retire-previous'",
            file=sys.stderr,
        )
    elif args.retire_previous:
        retire_previous(ll_state(args)[1])
        print(
            "retired: send the LL SIGHUP (or restart it); agents holding the old token are "
            "then refused (the token, unchanged, is printed by 'tcpgc token')",
            file=sys.stderr,
        )
        return None
    identity, _ = ll_identity(args, create=True)
    return identity.token


def run(argv: Sequence[str] | None = None) -> int:
    """Run the tcpgc command `argv` (default: the process's arguments); its exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "token":
        token = _token(args)
        if token is not None:
            print(token)
        return 0
    if args.command == "agent":
        return run_agent(args)
    if args.command == "demo":
        from tcpgc.ops.demo import run_demo

        return asyncio.run(run_demo(once=args.once))
    if args.command == "check":
        return run_check(args.config, args.role)
    loop = choose_loop()  # before anything starts: a wrong TCPGC_LOOP is exit 2
    setup_logging(args.log_level, args.log_format)
    raise_fd_limit()
    tune_allocator()
    if getattr(args, "classic", False):
        from tcpgc.socat_compat.classic import run_classic

        classic_cfg = ll_config(args) if args.command == "ll" else cc_config(args)
        return run_classic(classic_cfg, getattr(args, "interval", None), loop)
    if getattr(args, "interval", None) is not None:
        raise UsageError("--interval applies only with --classic")
    if args.command == "ll":
        _run_ll(args, loop)
    else:
        _run_cc(args, loop)
    return 0


def _run_ll(args: argparse.Namespace, loop: str) -> None:
    config = ll_config(args)
    _refuse_exposed_admin(config)
    if config.insecure_plaintext:
        logging.getLogger("tcpgc.ll").warning(
            "--insecure-plaintext: the LL-CC leg is NOT encrypted; anyone on the path reads it"
        )
    # Read before anything listens: a missing file is one line and exit 2.
    admin_token = read_admin_token(config.admin_token_file)
    node = ListenNode(config)
    if args.cc:
        node.cc_source = "--cc"

    async def reload() -> None:
        await node.reload(ll_config(args))

    _serve(node, admin_token, reload if args.config else _no_reload, loop)


def _run_cc(args: argparse.Namespace, loop: str) -> None:
    config = cc_config(args)
    _refuse_exposed_admin(config)
    # Kept here for reloads, and out of the environment that other processes can read.
    env_token = take_from_environment("TCPGC_TOKEN")
    token = read_token(env_token, config.token_file)
    admin_token = read_admin_token(config.admin_token_file)
    if config.insecure_plaintext:
        logging.getLogger("tcpgc.cc").warning(
            "--insecure-plaintext: the LL-CC leg is NOT encrypted and the LL is not pinned"
        )
    node = ConnectNode(config, token)

    async def reload() -> None:
        new = cc_config(args)
        await node.reload(new, read_token(env_token, new.token_file))

    _serve(node, admin_token, reload if args.config else _no_reload, loop)


def _serve(
    node: ListenNode | ConnectNode, admin_token: str | None, reload: Reload, loop: str
) -> None:
    service = NodeWithAdmin(node, admin_token)
    run_on(
        loop,
        serve_until_stopped(
            service,
            drain=service.drain,
            drain_timeout=node.config.drain_timeout,
            reload=reload,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        for line in str(exc).splitlines():
            print(f"tcpgc: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
