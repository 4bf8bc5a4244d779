"""What the LL proves itself with and checks agents against: its identity, the secrets
of the join tokens it accepts (its shared one, and each agent's own credential), and the
TLS context(s) of its agent port."""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path

from tcpgc.config import LLConfig
from tcpgc.errors import UsageError
from tcpgc.identity import Certificate, Identity, default_state_dir, load_identity
from tcpgc.identity.agents import (
    AgentCredential,
    agents_fingerprint,
    any_may_expose,
    load_agents,
)
from tcpgc.protocol.handshake import key_id
from tcpgc.relay.rate_limit import RateLimits
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")


class Credentials:
    """The LL's loaded identity; `load` again on reload (all or nothing)."""

    def __init__(self) -> None:
        self.identity: Identity | None = None
        #: The accepted secrets by key id: the shared one (two while it is rotated) and
        #: every agent credential's.
        self.secrets: dict[bytes, bytes] = {}
        #: The agents' own credentials by key id (see `tcpgc agent`).
        self.agents: dict[bytes, AgentCredential] = {}
        self._agents_seen: object = None
        self._refreshed = 0.0
        self._rates: dict[bytes, RateLimits] = {}
        self._problems: set[str] = set()
        #: The agent port's TLS context; None in plaintext mode.
        self.tls: ssl.SSLContext | None = None
        self._binding_of_context: dict[int, bytes] = {}

    @property
    def plaintext(self) -> bool:
        return self.tls is None

    def load(self, config: LLConfig) -> list[AgentCredential]:
        """Load (or reload) what `config` names; raises, changing nothing, if it cannot.
        Returns the agents' credentials that are gone since (revoked), whose sessions
        must end."""
        identity = load_identity(config.state_dir or default_state_dir(), create=True)
        if config.tls_cert is not None and config.tls_key is not None:
            identity = identity.with_certificate(Certificate.load(config.tls_cert, config.tls_key))
        tls: ssl.SSLContext | None = None
        bindings: dict[int, bytes] = {}
        if not config.insecure_plaintext:
            tls, bindings = identity.server_context(config.tls_client_ca)
        fingerprint = agents_fingerprint(identity.state_dir)
        agents = self._read_agents(identity.state_dir)
        # Only now that everything loaded: a reload that fails changes nothing.
        self.identity = identity
        self.tls, self._binding_of_context = tls, bindings
        return self._set_agents(agents, fingerprint)

    def _read_agents(self, state_dir: Path) -> dict[bytes, AgentCredential]:
        """The credentials that can be read; each that cannot is logged (once per
        distinct problem) and left out: its agent is refused, and dropped if connected,
        and no bad file keeps a revocation from taking effect."""
        problems: list[str] = []
        try:
            agents = load_agents(state_dir, problems)
        except OSError as exc:  # EMFILE, EIO...: try again later, drop no one meanwhile
            raise UsageError(f"cannot read the agents' credentials: {exc}") from None
        for problem in problems:
            if problem not in self._problems:
                log.warning("agent credential left out: %s", problem)
        self._problems = set(problems)
        return agents

    def _set_agents(
        self, agents: dict[bytes, AgentCredential], fingerprint: object
    ) -> list[AgentCredential]:
        assert self.identity is not None
        gone = [agent for kid, agent in self.agents.items() if kid not in agents]
        shared = {key_id(secret): secret for secret in self.identity.secrets}
        self.secrets = {kid: agent.secret for kid, agent in agents.items()} | shared
        self.agents = {kid: agent for kid, agent in agents.items() if kid not in shared}
        self._rates = {kid: r for kid, r in self._rates.items() if kid in self.agents}
        # With a file left out, look again at each poll: a chmod that fixes it changes
        # no fingerprint.
        self._agents_seen = None if self._problems else fingerprint
        return gone

    def refresh_agents(self) -> list[AgentCredential]:
        """Read the agents' credentials again if the state dir's changed (`tcpgc agent
        add` or `revoke` ran): cheap when nothing did. Returns the credentials that are
        gone (revoked, or unreadable), whose sessions must end."""
        assert self.identity is not None
        fingerprint = agents_fingerprint(self.identity.state_dir)
        if fingerprint == self._agents_seen:
            return []
        return self._set_agents(self._read_agents(self.identity.state_dir), fingerprint)

    @property
    def may_expose(self) -> bool:
        """Whether any agent's credential lets it expose a port."""
        return any_may_expose(self.agents)

    def rate_of(self, credential: AgentCredential | None) -> RateLimits | None:
        """The buckets every session of `credential` shares (its scope's rate)."""
        if credential is None or credential.scope.rate is None:
            return None
        limits = self._rates.get(credential.key_id)
        if limits is None:
            limits = self._rates[credential.key_id] = RateLimits.of(credential.scope.rate)
        return limits

    def refresh_for(self, unknown_key_id: bytes) -> list[AgentCredential]:
        """An agent presents a key id this LL does not know: it may have been added
        this very second, so read the folder now rather than at the next poll (at most
        ten times a second, however many bad key ids arrive). Returns what
        `refresh_agents` does; nothing if the folder cannot be read (the watcher says
        why)."""
        now = time.monotonic()
        if unknown_key_id in self.secrets or now - self._refreshed < 0.1:
            return []
        self._refreshed = now
        try:
            return self.refresh_agents()
        except (UsageError, OSError):
            return []

    def binding_of(self, link: Link) -> bytes:
        """The fingerprint of the certificate this LL presented on `link`: what every
        proof on it is bound to. In plaintext mode, the identity the token names."""
        binding = self._binding_of_context.get(id(link.tls_context))
        if binding is None:
            assert self.identity is not None
            binding = self.identity.fingerprint
        return binding
