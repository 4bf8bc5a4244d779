"""Dialing an LL: TCP, TLS, and the LL's certificate checked, for the control
connection and for every data or ready connection of a session. Library errors are
mapped here, where they enter, into typed errors worded for a log line."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl

from tcpgc.config import Address
from tcpgc.errors import CertificateChanged, PinMismatch
from tcpgc.identity import JoinToken, format_fingerprint, pin_server_name
from tcpgc.transport.failures import tls_dial_error, transport_error
from tcpgc.transport.link import Link

#: What to check when the LL does not answer in TLS.
PLAINTEXT_HINT = "is the LL running with --insecure-plaintext?"


class LLDialer:
    """Makes verified links to LLs. `token`, `tls` and `ca_verified` may be replaced
    (on reload): the next dial uses them."""

    def __init__(self, token: JoinToken, tls: ssl.SSLContext | None, *, ca_verified: bool) -> None:
        self.token = token
        #: The agent's TLS context; None with --insecure-plaintext.
        self.tls = tls
        #: The LL's certificate is checked against a CA bundle, not pinned by the token.
        self.ca_verified = ca_verified

    async def dial(self, address: Address, binding: bytes | None = None) -> tuple[Link, bytes]:
        """A verified link to the LL at `address`: its certificate checked either against
        the fingerprint pinned by the token or, with a CA bundle, by the CA; for a data
        or ready connection of a session (`binding`: the fingerprint of its control
        connection's certificate), also that it is that same certificate. Also returns
        the fingerprint proofs on the link are bound to.

        Raises typed errors (`TransportError` and its kinds), never library ones; the
        caller's own deadline stays its own to map."""
        loop = asyncio.get_running_loop()
        tls = self.tls
        pinning = tls is not None and not self.ca_verified
        # Pinning agents name the certificate they expect, so an LL in the middle of a
        # certificate rotation can present the old one to holders of the old token.
        name = pin_server_name(self.token.fingerprint) if pinning else address.connect_host
        try:
            _, link = await loop.create_connection(
                lambda: Link(tls, server_hostname=name if tls else None),
                address.connect_host,
                address.port,
            )
        except (OSError, ssl.SSLError) as exc:
            raise transport_error(exc, peer_plaintext_hint=PLAINTEXT_HINT) from exc
        try:
            try:
                await link.ready
            except (OSError, ssl.SSLError) as exc:
                raise tls_dial_error(exc, peer_plaintext_hint=PLAINTEXT_HINT) from exc
            if tls is None:
                return link, self.token.fingerprint
            presented = hashlib.sha256(link.peer_certificate or b"").digest()
            self._check(presented, pinning, binding)
        except BaseException:
            link.abort()
            raise
        return link, presented

    def _check(self, presented: bytes, pinning: bool, binding: bytes | None) -> None:
        pinned = self.token.fingerprint
        if pinning and not hmac.compare_digest(presented, pinned):
            raise PinMismatch(
                f"the LL's certificate is {format_fingerprint(presented)} but the join "
                f"token pins {format_fingerprint(pinned)}: refusing to "
                "talk to it (wrong address, a token from another LL, or someone in the middle)"
            )
        if binding is not None and not hmac.compare_digest(presented, binding):
            raise CertificateChanged(
                f"the LL's certificate on this connection is {format_fingerprint(presented)}"
                f" but its control connection's is {format_fingerprint(binding)}: "
                "refusing it (someone in the middle, or the LL changed certificates; "
                "the next session takes a new one)"
            )
