"""The command line: its flags, and the node configurations they make (a config file
read first, flags over it). Nothing here starts anything."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

from tcpgc import __version__
from tcpgc.addresses import collisions
from tcpgc.config import (
    DEFAULT_SERVICE,
    CCConfig,
    LLConfig,
    ServiceListener,
    cc_config_from,
    ll_config_from,
    ll_listeners,
    ll_udp_listeners,
    parse_address,
    read_toml,
)
from tcpgc.config_cc import expose_or_problem
from tcpgc.errors import UsageError
from tcpgc.identity import default_state_dir

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: say what is wrong and where help is.
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every tcpgc command; a usage error is one line and exit 2."""
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

    _agent_commands(sub)

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
        "--resume-window",
        type=float,
        metavar="SECONDS",
        help="how long a stream waits for its agent to resume it after a break of the "
        "leg (default 60; 0: streams are not resumable)",
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
        "--expose",
        metavar="[udp:][HOST:]PORT=SERVERHOST:SERVERPORT",
        action="append",
        help="have each LL take clients on PORT (on its address HOST, default all) for "
        "this server, while this agent is connected; repeatable. The agent's credential "
        "must allow the port ('tcpgc agent add NAME --ports LOW-HIGH' on the LL); "
        "'udp:' exposes a UDP port",
    )
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


def _agent_commands(sub: Any) -> None:
    agent = sub.add_parser(
        "agent", help="give agents credentials of their own, each with a scope (on the LL host)"
    )
    verbs = agent.add_subparsers(dest="verb", required=True, parser_class=_Parser, metavar="VERB")
    add = verbs.add_parser("add", help="create an agent and print its join token")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--services", metavar="NAME[,NAME...]", default="", help="configured services it may serve"
    )
    add.add_argument(
        "--ports", metavar="LOW-HIGH", help="ports it may expose ('tcpgc cc --expose')"
    )
    add.add_argument(
        "--max-ports", type=int, metavar="N", help="how many of them at once (default: all)"
    )
    add.add_argument(
        "--rate", metavar="RATE", help="bandwidth of all its connections, each way (80Mbit)"
    )
    listing = verbs.add_parser("list", help="the agents, their scopes, when last seen")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    revoke = verbs.add_parser(
        "revoke", help="delete an agent's credential: a running LL drops it within seconds"
    )
    revoke.add_argument("name", metavar="NAME")
    for verb in (add, listing, revoke):
        verb.add_argument(
            "--state-dir", type=Path, help=f"LL state dir (default {default_state_dir()})"
        )
        verb.add_argument(
            "-c", "--config", type=Path, metavar="FILE", help="the LL's TOML config file"
        )


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
    """The LL's configuration: its config file (-c), if any, with the flags over it."""
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
    if args.resume_window is not None:
        if args.resume_window < 0:
            raise UsageError("--resume-window must be 0 (off) or a number of seconds")
        config.resume_window = args.resume_window
    if args.insecure_plaintext:
        config.insecure_plaintext = True
    config.require_complete()
    # A flag may collide with the file (the file's own collisions are reported with it).
    clashes = collisions(ll_listeners(config)) + collisions(ll_udp_listeners(config))
    if clashes:
        raise UsageError(
            "\n".join(f"{a} and {b} are on the same port: both cannot listen" for a, b in clashes)
        )
    return config


def cc_config(args: argparse.Namespace) -> CCConfig:
    """The CC's configuration: its config file (-c), if any, with the flags over it."""
    config = cc_config_from(read_toml(args.config), str(args.config)) if args.config else CCConfig()
    if args.admin:
        config.admin = parse_address(args.admin, "--admin")
    if args.admin_token_file:
        config.admin_token_file = args.admin_token_file
    if args.ll:
        config.ll = [parse_address(a, "--ll") for a in args.ll]
    if args.server:
        config.services[DEFAULT_SERVICE] = parse_address(args.server, "--server")
    for text in args.expose or ():
        expose = expose_or_problem(text)
        if isinstance(expose, str):
            raise UsageError(f"--expose: {expose}")
        config.add_expose(expose)
    if args.token_file:
        config.token_file = args.token_file
    if args.insecure_plaintext:
        config.insecure_plaintext = True
    config.require_complete()
    return config
