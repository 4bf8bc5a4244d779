"""Classic mode: the seed's raw socat protocol, so a site can replace one socat node at a
time. There is no control connection, no authentication and no TLS; a connection on
the LL's agent port *is* the next client's stream.

The protocol has one signal, and it is the agent port itself: the seed's LL
(``socat tcp-l:C,reuseaddr,fork tcp-l:A,reuseaddr``) listens on A only while a client
waits, so the seed's CC (``socat tcp:LL:A,forever,interval=2,fork tcp:SERVER:P``) is
refused until there is a client, and every connection it gets through is one it should
carry. Both nodes here keep that contract, and do better where socat fails:

- The classic LL queues clients (first in, first out) and keeps the agent port open
  while any waits, instead of dropping every client that arrives while another waits.
  It closes the port the moment the queue empties: a socat CC that got through with
  nobody waiting would fork, dial the server and hold an idle connection there.
- The classic CC dials again at once after a connection gets through (the next client
  is likely waiting), waits `interval` after a refusal, and caps the connections on
  which the LL has said nothing, so an LL that accepts without a client (the race at
  the end of a burst, a misconfigured port, an attacker) cannot make it pile up idle
  connections to the server.
"""

from __future__ import annotations

from tcpgc.config import CCConfig, LLConfig
from tcpgc.runner import choose_loop, run_on, serve_until_stopped
from tcpgc.socat_compat.classic_cc import ClassicConnectNode
from tcpgc.socat_compat.classic_config import ClassicCCConfig, ClassicLLConfig
from tcpgc.socat_compat.classic_ll import ClassicListenNode

__all__ = [
    "ClassicCCConfig",
    "ClassicConnectNode",
    "ClassicLLConfig",
    "ClassicListenNode",
    "run_classic",
]


def run_classic(
    config: LLConfig | CCConfig, interval: float | None = None, loop: str | None = None
) -> int:
    """Run a classic node built from the parsed flags until SIGINT or SIGTERM, on the
    event loop `loop` (default: as `tcpgc.runner.choose_loop` picks)."""
    chosen = loop or choose_loop()
    if isinstance(config, LLConfig):
        ll_config = ClassicLLConfig.from_config(config)
        run_on(chosen, _serve_ll(ll_config))
    else:
        cc_config = ClassicCCConfig.from_config(config, interval)
        run_on(chosen, _serve_cc(cc_config))
    return 0


# The nodes are built inside the loop: they take the running loop. A signal stops them
# at once, without a drain; they have nothing to reload, so SIGHUP keeps its default.


async def _serve_ll(config: ClassicLLConfig) -> None:
    await serve_until_stopped(ClassicListenNode(config))


async def _serve_cc(config: ClassicCCConfig) -> None:
    await serve_until_stopped(ClassicConnectNode(config))
