"""Join tokens, the LL's secret and TLS identity, and the TLS contexts built from them.

A join token is one line: ``tcpgc1.<secret>.<fingerprint>``, both fields base64url
without padding. `tcpgc1` versions the format. The secret is 32 random bytes; the
fingerprint is the SHA-256 of the LL's certificate (DER), so one string gives an agent
both what it proves and whom it may talk to.

The parts: `join_token` (the token's format), `state_dir` (the LL's secret and
certificate on disk), `tls` (certificates and TLS contexts), `secret_files` (files that
hold secrets). Their public names are all importable from here.
"""

from tcpgc.identity.join_token import (
    FINGERPRINT_SIZE,
    SECRET_SIZE,
    TOKEN_PREFIX,
    JoinToken,
    format_fingerprint,
    read_token,
)
from tcpgc.identity.secret_files import check_private
from tcpgc.identity.state_dir import (
    CERT_FILE,
    KEY_FILE,
    PREVIOUS_CERT_FILE,
    PREVIOUS_KEY_FILE,
    PREVIOUS_SECRET_FILE,
    SECRET_FILE,
    Identity,
    default_state_dir,
    load_identity,
    retire_previous,
    rotate,
)
from tcpgc.identity.tls import Certificate, agent_context, fingerprint_of_pem, pin_server_name

__all__ = [
    "CERT_FILE",
    "FINGERPRINT_SIZE",
    "KEY_FILE",
    "PREVIOUS_CERT_FILE",
    "PREVIOUS_KEY_FILE",
    "PREVIOUS_SECRET_FILE",
    "SECRET_FILE",
    "SECRET_SIZE",
    "TOKEN_PREFIX",
    "Certificate",
    "Identity",
    "JoinToken",
    "agent_context",
    "check_private",
    "default_state_dir",
    "fingerprint_of_pem",
    "format_fingerprint",
    "load_identity",
    "pin_server_name",
    "read_token",
    "retire_previous",
    "rotate",
]
