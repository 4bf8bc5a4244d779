"""What the LL proves itself with and checks agents against: its identity, the secrets
of the join tokens it accepts, and the TLS context(s) of its agent port."""

from __future__ import annotations

import ssl

from tcpgc.config import LLConfig
from tcpgc.identity import Certificate, Identity, default_state_dir, load_identity
from tcpgc.protocol.handshake import key_id
from tcpgc.transport.link import Link


class Credentials:
    """The LL's loaded identity; `load` again on reload (all or nothing)."""

    def __init__(self) -> None:
        self.identity: Identity | None = None
        #: The accepted secrets by key id (more than one while a secret is rotated).
        self.secrets: dict[bytes, bytes] = {}
        #: The agent port's TLS context; None in plaintext mode.
        self.tls: ssl.SSLContext | None = None
        self._binding_of_context: dict[int, bytes] = {}

    @property
    def plaintext(self) -> bool:
        return self.tls is None

    def load(self, config: LLConfig) -> None:
        """Load (or reload) what `config` names; raises, changing nothing, if it cannot."""
        identity = load_identity(config.state_dir or default_state_dir(), create=True)
        if config.tls_cert is not None and config.tls_key is not None:
            identity = identity.with_certificate(Certificate.load(config.tls_cert, config.tls_key))
        tls: ssl.SSLContext | None = None
        bindings: dict[int, bytes] = {}
        if not config.insecure_plaintext:
            tls, bindings = identity.server_context(config.tls_client_ca)
        # Only now that everything loaded: a reload that fails changes nothing.
        self.identity = identity
        self.secrets = {key_id(secret): secret for secret in identity.secrets}
        self.tls, self._binding_of_context = tls, bindings

    def binding_of(self, link: Link) -> bytes:
        """The fingerprint of the certificate this LL presented on `link`: what every
        proof on it is bound to. In plaintext mode, the identity the token names."""
        binding = self._binding_of_context.get(id(link.tls_context))
        if binding is None:
            assert self.identity is not None
            binding = self.identity.fingerprint
        return binding
