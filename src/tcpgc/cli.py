"""Command line → configuration → the node APIs. No logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tcpgc import __version__
from tcpgc.addresses import collisions
from tcpgc.cc.node import ConnectNode
from tcpgc.config import (
    DEFAULT_SERVICE,
    CCConfig,
    LLConfig,
    ServiceListener,
    cc_config_from,
    ll_config_from,
    ll_listeners,
    parse_address,
    read_toml,
)
from tcpgc.environment import take_from_environment
from tcpgc.errors import UsageError
from tcpgc.identity import (
    Certificate,
    JoinToken,
    default_state_dir,
    format_fingerprint,
    load_identity,
    read_token,
    retire_previous,
    rotate,
)
from tcpgc.ll.node import ListenNode
from tcpgc.ops.admin_access import exposure_problem
from tcpgc.ops.check import read_admin_token, run_check
from tcpgc.ops.logs import setup_logging
from tcpgc.ops.memory_trim import tune_allocator

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: say what is wrong and where help is.
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tcpgc",
        description="TCP gender changer: reach a server behind a firewall "
        "that drops inbound connections, through an outside node it dials out to.",
    )
    parser.add_argument("--version", action="version", version=f"tcpgc {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    token = sub.add_parser("token", help="create the LL identity if missing; print its join token")
    token.add_argument(
        "--state-dir", type=Path, help=f"LL state dir (default {default_state_dir()})"
    )
    token.add_argument(
        "-c", "--config", type=Path, metavar="FILE", help="the LL's TOML config file"
    )
    change = token.add_mutually_exclusive_group()
    change.add_argument(
        "--rotate",
        action="store_true",
        help="new secret; the previous one stays accepted until --retire-previous",
    )
    change.add_argument(
        "--rotate-certificate",
        action="store_true",
        help="new TLS key and certificate; the previous ones stay in use for "
        "agents holding the old token until --retire-previous",
    )
    change.add_argument(
        "--retire-previous",
        action="store_true",
        help="stop accepting the previous secret and certificate",
    )

    ll = sub.add_parser("ll", help="run the outside node: listen for clients and for agents")
    ll.add_argument(
        "--clients", metavar="HOST:PORT", help="where clients of service 'default' connect"
    )
    ll.add_argument("--cc", metavar="HOST:PORT", help="where agents (tcpgc cc) connect")
    ll.add_argument("--state-dir", type=Path, help=f"LL state dir (default {default_state_dir()})")
    ll.add_argument(
        "--client-wait",
        type=float,
        metavar="SECONDS",
        help="how long a client may wait for an agent (default 10)",
    )
    ll.add_argument(
        "--classic",
        action="store_true",
        help="speak the seed's raw socat protocol (no authentication, no TLS): "
        "to replace a socat LL while the CC is still socat",
    )
    _common(ll)

    cc = sub.add_parser("cc", help="run the inside node: dial the LL and the server")
    cc.add_argument(
        "--ll",
        metavar="HOST:PORT",
        action="append",
        help="the LL's agent address (repeat to serve several LLs)",
    )
    cc.add_argument("--server", metavar="HOST:PORT", help="the server of service 'default'")
    cc.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the join token (default: $TCPGC_TOKEN)",
    )
    cc.add_argument(
        "--classic",
        action="store_true",
        help="speak the seed's raw socat protocol (no authentication, no TLS): "
        "to replace a socat CC while the LL is still socat",
    )
    cc.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help="with --classic: wait between attempts while the LL refuses (default 1)",
    )
    _common(cc)

    check = sub.add_parser("check", help="validate a config file and report every problem")
    check.add_argument("-c", "--config", type=Path, metavar="FILE", required=True)
    check.add_argument(
        "--role", choices=["ll", "cc"], help="which node the file is for (default: guessed)"
    )

    demo = sub.add_parser(
        "demo", help="run a web server, an LL and a CC on loopback and fetch a page"
    )
    demo.add_argument("--once", action="store_true", help="fetch the page once, report, and exit")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, metavar="FILE", help="TOML config file")
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="no TLS between LL and CC (authentication stays on); both sides must agree",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one object per line"
    )
    p.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and a status page here (off by default; use loopback)",
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help="0600 file holding the bearer token the admin endpoint requires "
        "(required unless --admin is on loopback)",
    )


def ll_config(args: argparse.Namespace) -> LLConfig:
    config = ll_config_from(read_toml(args.config), str(args.config)) if args.config else LLConfig()
    if args.admin:
        config.admin = parse_address(args.admin, "--admin")
    if args.admin_token_file:
        config.admin_token_file = args.admin_token_file
    if args.cc:
        config.cc = parse_address(args.cc, "--cc")
    if args.clients:
        config.services[DEFAULT_SERVICE] = ServiceListener(parse_address(args.clients, "--clients"))
    if args.state_dir:
        config.state_dir = args.state_dir
    if args.client_wait is not None:
        if args.client_wait <= 0:
            raise UsageError("--client-wait must be a positive number of seconds")
        config.client_wait = args.client_wait
    if args.insecure_plaintext:
        config.insecure_plaintext = True
    if config.cc is None:
        raise UsageError(
            "tcpgc ll needs --cc HOST:PORT (where agents connect) or a config file with 'cc'"
        )
    if not config.services:
        raise UsageError(
            "tcpgc ll needs --clients HOST:PORT or a config file with [services.NAME] sections"
        )
    # A flag may collide with the file (the file's own collisions are reported with it).
    clashes = collisions(ll_listeners(config))
    if clashes:
        raise UsageError(
            "\n".join(f"{a} and {b} are on the same port: both cannot listen" for a, b in clashes)
        )
    return config


def cc_config(args: argparse.Namespace) -> CCConfig:
    config = cc_config_from(read_toml(args.config), str(args.config)) if args.config else CCConfig()
    if args.admin:
        config.admin = parse_address(args.admin, "--admin")
    if args.admin_token_file:
        config.admin_token_file = args.admin_token_file
    if args.ll:
        config.ll = [parse_address(a, "--ll") for a in args.ll]
    if args.server:
        config.services[DEFAULT_SERVICE] = parse_address(args.server, "--server")
    if args.token_file:
        config.token_file = args.token_file
    if args.insecure_plaintext:
        config.insecure_plaintext = True
    if not config.ll:
        raise UsageError(
            "tcpgc cc needs --ll HOST:PORT (the LL's agent address) or a config file with 'll'"
        )
    if not config.services:
        raise UsageError(
            "tcpgc cc needs --server HOST:PORT or a config file with [services.NAME] sections"
        )
    return config


async def _serve(
    node: ListenNode | ConnectNode,
    reload: Callable[[], Awaitable[None]] | None,
    admin_token: str | None = None,
) -> None:
    """Run `node` until SIGTERM or SIGINT, then drain it; SIGHUP reloads the config.
    A second SIGTERM or SIGINT while draining closes at once."""
    loop = asyncio.get_running_loop()
    log = logging.getLogger("tcpgc")
    stop, hup = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    admin = None
    try:
        await node.start()
        if node.config.admin is not None:
            from tcpgc.ops.admin import AdminServer  # only nodes that serve it pay for it

            admin = AdminServer(node, node.config.admin, admin_token, node.config.admin_hosts)
            await admin.start()
            log.info("admin endpoint on http://%s/", admin.address)
        if isinstance(node, ListenNode):
            # Through logging, to stderr: a JSON record under --log-format json.
            log.info("%s", instructions(node))
        while not stop.is_set():
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hup.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if hup.is_set() and not stop.is_set():
                hup.clear()
                if reload is None:
                    log.warning("SIGHUP: no config file (-c) to reload")
                    continue
                try:
                    await reload()
                except UsageError as exc:
                    log.error("reload refused, the running config stays: %s", exc)
        stop.clear()
        log.info("stopping: draining connections for up to %.0f s", node.config.drain_timeout)
        drain = asyncio.ensure_future(node.drain(node.config.drain_timeout))
        interrupted = asyncio.ensure_future(stop.wait())
        await asyncio.wait([drain, interrupted], return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if not drain.done():
            log.info("second signal: closing now")
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
            await node.close()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if admin is not None:
            await admin.close()
        await node.close()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run a node on uvloop when it is installed (the `fast` extra): it roughly halves
    the event loop's cost per connection. TCPGC_LOOP=asyncio forces the standard loop."""
    if os.environ.get("TCPGC_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def raise_fd_limit() -> None:
    """Every relayed client costs each node two sockets: take all the file descriptors
    the hard limit allows rather than the soft default (often 1024)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logging.getLogger("tcpgc").warning("cannot raise the open file limit: %s", exc)


def _refuse_exposed_admin(config: LLConfig | CCConfig) -> None:
    """Before anything listens: no tokenless admin endpoint beyond loopback."""
    problem = exposure_problem(config.admin, config.admin_token_file)
    if problem is not None:
        raise UsageError(problem)


def instructions(node: ListenNode) -> str:
    """What the LL logs once it is up: how to start an agent that serves exactly the
    services this LL has (an agent offering others would be sent none of their clients)."""
    assert node.identity is not None and node.agent_address is not None
    agent = node.agent_address
    host = agent.host if agent.host not in ("0.0.0.0", "::", "") else "THIS_HOST"
    where = f"[{host}]:{agent.port}" if ":" in host else f"{host}:{agent.port}"
    names = list(node.services)
    head = (
        f"tcpgc LL is up; its identity is {format_fingerprint(node.identity.fingerprint)}; "
        f"services: {', '.join(names)}.\n"
        f"On the inside host, put the join token in the environment (paste the output of\n"
        f"'tcpgc token --state-dir {node.identity.state_dir}' run here):\n"
        f"  read -rs TCPGC_TOKEN && export TCPGC_TOKEN\n"
    )
    if names == [DEFAULT_SERVICE]:
        plain = " --insecure-plaintext" if node.config.insecure_plaintext else ""
        return (
            head
            + f"then start the agent:\n  tcpgc cc --ll {where} --server SERVER_HOST:PORT{plain}"
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
    )


def _token(args: argparse.Namespace) -> JoinToken | None:
    """The join token to print; None after --retire-previous, which changes no token."""
    config = ll_config_from(read_toml(args.config), str(args.config)) if args.config else LLConfig()
    state_dir = args.state_dir or config.state_dir or default_state_dir()
    if args.rotate or args.rotate_certificate:
        identity = rotate(state_dir, secret=args.rotate, certificate=args.rotate_certificate)
        print(
            "rotated: send the LL SIGHUP (or restart it) to accept the new token besides "
            "the old one, update the agents, then run 'tcpgc token --retire-previous'",
            file=sys.stderr,
        )
    elif args.retire_previous:
        retire_previous(state_dir)
        print(
            "retired: send the LL SIGHUP (or restart it); agents holding the old token are "
            "then refused (the token, unchanged, is printed by 'tcpgc token')",
            file=sys.stderr,
        )
        return None
    else:
        identity = load_identity(state_dir, create=True)
    if config.tls_cert is not None and config.tls_key is not None:
        identity = identity.with_certificate(Certificate.load(config.tls_cert, config.tls_key))
    return identity.token


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        token = _token(args)
        if token is not None:
            print(token)
        return 0
    if args.command == "demo":
        from tcpgc.ops.demo import run_demo

        return asyncio.run(run_demo(once=args.once))
    if args.command == "check":
        return run_check(args.config, args.role)
    setup_logging(args.log_level, args.log_format)
    raise_fd_limit()
    tune_allocator()
    if getattr(args, "classic", False):
        from tcpgc.socat_compat.classic import run_classic

        classic_cfg = ll_config(args) if args.command == "ll" else cc_config(args)
        return run_classic(classic_cfg, getattr(args, "interval", None))
    if getattr(args, "interval", None) is not None:
        raise UsageError("--interval applies only with --classic")
    if args.command == "ll":
        ll_cfg = ll_config(args)
        _refuse_exposed_admin(ll_cfg)
        if ll_cfg.insecure_plaintext:
            logging.getLogger("tcpgc.ll").warning(
                "--insecure-plaintext: the LL-CC leg is NOT encrypted; anyone on the path reads it"
            )
        # Read before anything listens: a missing file is one line and exit 2.
        ll_admin_token = read_admin_token(ll_cfg.admin_token_file)
        ll_node = ListenNode(ll_cfg)
        if args.cc:
            ll_node.cc_source = "--cc"

        async def reload_ll() -> None:
            await ll_node.reload(ll_config(args))

        _run(_serve(ll_node, reload_ll if args.config else None, ll_admin_token))
        return 0
    cc_cfg = cc_config(args)
    _refuse_exposed_admin(cc_cfg)
    # Kept here for reloads, and out of the environment that other processes can read.
    env_token = take_from_environment("TCPGC_TOKEN")
    token = read_token(env_token, cc_cfg.token_file)
    cc_admin_token = read_admin_token(cc_cfg.admin_token_file)
    if cc_cfg.insecure_plaintext:
        logging.getLogger("tcpgc.cc").warning(
            "--insecure-plaintext: the LL-CC leg is NOT encrypted and the LL is not pinned"
        )
    cc_node = ConnectNode(cc_cfg, token)

    async def reload_cc() -> None:
        config = cc_config(args)
        await cc_node.reload(config, read_token(env_token, config.token_file))

    _run(_serve(cc_node, reload_cc if args.config else None, cc_admin_token))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        for line in str(exc).splitlines():
            print(f"tcpgc: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
