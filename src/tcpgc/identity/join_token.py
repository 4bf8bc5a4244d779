"""Join tokens. A join token is one line: ``tcpgc1.<secret>.<fingerprint>``, both fields
base64url without padding. `tcpgc1` versions the format. The secret is 32 random bytes;
the fingerprint is the SHA-256 of the LL's certificate (DER), so one string gives an
agent both what it proves and whom it may talk to.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from tcpgc.errors import UsageError
from tcpgc.identity.secret_files import check_private

TOKEN_PREFIX = "tcpgc1"
SECRET_SIZE = 32
FINGERPRINT_SIZE = 32


def b64url(data: bytes) -> str:
    """`data` as base64url without padding, as the token writes its fields."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str, size: int, what: str) -> bytes:
    """The `size` bytes a token field `what` holds; UsageError if it does not."""
    try:
        padded = text + "=" * (-len(text) % 4)
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
    except (ValueError, TypeError, UnicodeEncodeError):
        raw = b""
    if len(raw) != size:
        raise UsageError(f"malformed join token: its {what} field is not {size} bytes of base64url")
    return raw


def format_fingerprint(fingerprint: bytes) -> str:
    """How fingerprints are shown to people (as OpenSSH shows host keys)."""
    return "SHA256:" + b64url(fingerprint)


@dataclass(frozen=True)
class JoinToken:
    """What an agent needs to join an LL: the secret it proves, the certificate it pins."""

    secret: bytes
    fingerprint: bytes

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{b64url(self.secret)}.{b64url(self.fingerprint)}"

    def __repr__(self) -> str:  # never let the secret reach a log through a repr
        return f"JoinToken(fingerprint={format_fingerprint(self.fingerprint)})"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        parts = text.strip().split(".")
        if len(parts) != 3 or not parts[0].startswith("tcpgc"):
            raise UsageError(
                "malformed join token: expected 'tcpgc1.<secret>.<fingerprint>' "
                "as printed by 'tcpgc token' on the LL host"
            )
        if parts[0] != TOKEN_PREFIX:
            raise UsageError(
                f"join token format {parts[0]!r} is not supported by this tcpgc "
                f"(it reads {TOKEN_PREFIX!r}): upgrade tcpgc on this host"
            )
        return cls(
            unb64url(parts[1], SECRET_SIZE, "secret"),
            unb64url(parts[2], FINGERPRINT_SIZE, "fingerprint"),
        )


def read_token(env_value: str | None, token_file: Path | None) -> JoinToken:
    """The agent's token: from --token-file / config, else $TCPGC_TOKEN."""
    if token_file is not None:
        try:
            check_private(token_file)
            text = token_file.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read token file {token_file}: {exc.strerror}") from None
        return JoinToken.parse(text)
    if env_value:
        return JoinToken.parse(env_value)
    raise UsageError(
        "no join token: set TCPGC_TOKEN or pass --token-file FILE "
        "(print it on the LL host with 'tcpgc token')"
    )
