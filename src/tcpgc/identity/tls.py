"""The TLS material of the LL-CC leg: the LL's certificates (self-signed, or of the
operator's own PKI), the name an agent asks for when it pins one, and the agent's
client context."""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from tcpgc.errors import UsageError
from tcpgc.identity.secret_files import check_private


@dataclass(frozen=True)
class Certificate:
    """A certificate and key the LL can present, by path."""

    cert_path: Path
    key_path: Path
    fingerprint: bytes

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Certificate:
        try:
            check_private(key_path)
            pem = cert_path.read_bytes()
            fingerprint = fingerprint_of_pem(pem)
        except FileNotFoundError:
            raise  # the caller knows how to say which command creates it
        except OSError as exc:
            raise UsageError(f"cannot read certificate {exc.filename}: {exc.strerror}") from None
        except ValueError:
            raise UsageError(f"{cert_path} is not a PEM certificate") from None
        return cls(cert_path, key_path, fingerprint)


@functools.lru_cache(maxsize=8)
def pin_server_name(fingerprint: bytes) -> str:
    """The SNI an agent sends when it pins `fingerprint` (one string for every data
    connection: each TLS link keeps the one it was given)."""
    return f"{fingerprint.hex()[:32]}.pin.tcpgc.invalid"


def fingerprint_of_pem(cert_pem: bytes) -> bytes:
    """The SHA-256 of a PEM certificate's DER bytes: what a join token pins."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii", errors="replace"))
    return hashlib.sha256(der).digest()


def new_certificate() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key and a self-signed certificate for it (key PEM, cert PEM).
    Nobody checks its names or dates: agents pin its fingerprint. Ed25519 rather than
    P-256 because every agent-side TLS connection keeps the parsed certificate: its
    P-256 public key costs 2 KB more per connection, and signing is no slower."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tcpgc LL")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)  # Ed25519 hashes inside the signature
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def agent_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS 1.3 client context for agents. Without a CA bundle, chain validation is off
    because the LL's certificate is pinned by fingerprint instead (see the CC node)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            check_private(key or cert)
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the agent's TLS material: {exc}") from None
    return ctx
