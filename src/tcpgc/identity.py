"""Join tokens, the LL's secret and TLS identity, and the TLS contexts built from them.

A join token is one line: ``tcpgc1.<secret>.<fingerprint>``, both fields base64url
without padding. `tcpgc1` versions the format. The secret is 32 random bytes; the
fingerprint is the SHA-256 of the LL's certificate (DER), so one string gives an agent
both what it proves and whom it may talk to.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from tcpgc.errors import UsageError

TOKEN_PREFIX = "tcpgc1"
SECRET_SIZE = 32
FINGERPRINT_SIZE = 32

SECRET_FILE = "secret"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
PREVIOUS_SECRET_FILE = "secret.previous"
PREVIOUS_KEY_FILE = "key.previous.pem"
PREVIOUS_CERT_FILE = "cert.previous.pem"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, size: int, what: str) -> bytes:
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
    return "SHA256:" + _b64(fingerprint)


@dataclass(frozen=True)
class JoinToken:
    secret: bytes
    fingerprint: bytes

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{_b64(self.secret)}.{_b64(self.fingerprint)}"

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
            _unb64(parts[1], SECRET_SIZE, "secret"),
            _unb64(parts[2], FINGERPRINT_SIZE, "fingerprint"),
        )


def default_state_dir() -> Path:
    """Where the LL keeps its identity: /var/lib/tcpgc for root, else the XDG state dir."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/tcpgc")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "tcpgc"


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 atomically; an existing file is never overwritten."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _give_to_dir_owner(fd, path.parent)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: theirs wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _give_to_dir_owner(fd: int, directory: Path) -> None:
    """Root writing into a state dir that belongs to the service user (`tcpgc token
    --rotate` run with sudo) makes the file that user's: a root-owned 0600 secret
    would lock the LL out of its own identity at the next reload or restart."""
    if os.geteuid() != 0:
        return
    owner = directory.stat()
    if owner.st_uid != 0 or owner.st_gid != 0:
        os.fchown(fd, owner.st_uid, owner.st_gid)


def check_private(path: Path) -> None:
    """Refuse a secret file that others can read, with the fix in the message."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"{path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"it holds a secret: run 'chmod 600 {path}'"
        )


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


@dataclass(frozen=True)
class Identity:
    """The LL's secrets and certificates, as kept in its state dir.

    During a rotation the LL holds a previous secret and/or certificate besides the
    current ones, so agents holding the old token keep working until they are updated.
    """

    state_dir: Path
    secret: bytes
    certificate: Certificate
    previous_secret: bytes | None = None
    previous_certificate: Certificate | None = None

    @property
    def fingerprint(self) -> bytes:
        return self.certificate.fingerprint

    @property
    def token(self) -> JoinToken:
        return JoinToken(self.secret, self.fingerprint)

    @property
    def secrets(self) -> list[bytes]:
        return [self.secret] + ([self.previous_secret] if self.previous_secret else [])

    def with_certificate(self, certificate: Certificate) -> Identity:
        """This identity presenting a certificate of the operator's own PKI."""
        return Identity(self.state_dir, self.secret, certificate, self.previous_secret, None)

    def server_context(
        self, client_ca: Path | None = None
    ) -> tuple[ssl.SSLContext, dict[int, bytes]]:
        """The TLS context for the agent port, and the fingerprint behind each context
        it may switch to (keyed by id), for the handshake's binding."""

        def make(cert: Certificate) -> ssl.SSLContext:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            # Agents never resume sessions: tickets would only cost bytes on every
            # handshake and memory in every agent-side connection.
            ctx.num_tickets = 0
            try:
                ctx.load_cert_chain(cert.cert_path, cert.key_path)
                if client_ca is not None:
                    ctx.load_verify_locations(cafile=client_ca)
                    ctx.verify_mode = ssl.CERT_REQUIRED
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"cannot load TLS material for the agent port: {exc}") from None
            return ctx

        current = make(self.certificate)
        fingerprints = {id(current): self.certificate.fingerprint}
        if self.previous_certificate is not None:
            previous = make(self.previous_certificate)
            fingerprints[id(previous)] = self.previous_certificate.fingerprint
            wanted = pin_server_name(self.previous_certificate.fingerprint)

            def choose(sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
                # Agents name the certificate they pin in SNI: old tokens get the old one.
                if name == wanted:
                    sslobj.context = previous

            current.sni_callback = choose
        return current, fingerprints


@functools.lru_cache(maxsize=8)
def pin_server_name(fingerprint: bytes) -> str:
    """The SNI an agent sends when it pins `fingerprint` (one string for every data
    connection: each TLS link keeps the one it was given)."""
    return f"{fingerprint.hex()[:32]}.pin.tcpgc.invalid"


def _read_secret(path: Path) -> bytes:
    check_private(path)
    try:
        return _unb64(path.read_text().strip(), SECRET_SIZE, "secret")
    except UsageError:
        raise UsageError(f"{path} is corrupt: remove it to create a new secret") from None


def _check_state_dir(state_dir: Path) -> None:
    """Refuse a state dir, or a secret in it, that another user controls: whoever can
    write the dir can replace the LL's secret and key with their own. The dir must be
    this user's (root may also work in the service user's dir: what it writes there is
    given to the dir's owner), and every secret in it the dir owner's or root's."""
    info = state_dir.stat()  # FileNotFoundError: the caller says how to create it
    uid = os.geteuid()
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(
            f"state dir {state_dir} is writable by other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); anyone who can write there can "
            f"replace the LL's secret: run 'chmod 700 {state_dir}'"
        )
    if info.st_uid != uid and uid != 0:
        raise UsageError(
            f"state dir {state_dir} is owned by uid {info.st_uid}, not by this user "
            f"(uid {uid}): run tcpgc as its owner, or 'chown -R {uid} {state_dir}'"
        )
    for name in (SECRET_FILE, PREVIOUS_SECRET_FILE, KEY_FILE, PREVIOUS_KEY_FILE):
        path = state_dir / name
        try:
            owner = path.lstat().st_uid
        except FileNotFoundError:
            continue
        if owner not in (info.st_uid, 0):
            raise UsageError(
                f"{path} is owned by uid {owner}, not by the state dir's owner (uid "
                f"{info.st_uid}); it holds a secret: if it is theirs, run "
                f"'chown {info.st_uid} {path}'"
            )


def _create_missing(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_state_dir(state_dir)  # before anything secret is written into it
    if not (state_dir / SECRET_FILE).exists():
        secret = _b64(secrets.token_bytes(SECRET_SIZE)) + "\n"
        _write_private(state_dir / SECRET_FILE, secret.encode())
    if not (state_dir / KEY_FILE).exists() or not (state_dir / CERT_FILE).exists():
        key_pem, cert_pem = _new_certificate()
        for name in (KEY_FILE, CERT_FILE):
            (state_dir / name).unlink(missing_ok=True)
        _write_private(state_dir / KEY_FILE, key_pem)
        _write_private(state_dir / CERT_FILE, cert_pem)


def load_identity(state_dir: Path, *, create: bool) -> Identity:
    """Read the LL identity from `state_dir`, creating what is missing if `create`."""
    try:
        if create:
            _create_missing(state_dir)
        else:
            _check_state_dir(state_dir)
        previous_secret = None
        if (state_dir / PREVIOUS_SECRET_FILE).exists():
            previous_secret = _read_secret(state_dir / PREVIOUS_SECRET_FILE)
        previous_cert = None
        if (state_dir / PREVIOUS_CERT_FILE).exists():
            previous_cert = Certificate.load(
                state_dir / PREVIOUS_CERT_FILE, state_dir / PREVIOUS_KEY_FILE
            )
        return Identity(
            state_dir,
            _read_secret(state_dir / SECRET_FILE),
            Certificate.load(state_dir / CERT_FILE, state_dir / KEY_FILE),
            previous_secret,
            previous_cert,
        )
    except FileNotFoundError as exc:
        raise UsageError(
            f"no LL identity in {state_dir} ({exc.filename} missing): run "
            f"'tcpgc token --state-dir {state_dir}' to create one"
        ) from None
    except PermissionError as exc:
        raise UsageError(
            f"cannot use state dir {state_dir}: {exc.strerror} ({exc.filename})"
        ) from None


def rotate(state_dir: Path, *, secret: bool, certificate: bool) -> Identity:
    """Start a changeover: the current secret and/or certificate become the previous
    ones (still accepted), and new ones are created. Restart or reload the LL after."""
    load_identity(state_dir, create=True)  # validate what is there first
    pairs = []
    if secret:
        pairs.append((SECRET_FILE, PREVIOUS_SECRET_FILE))
    if certificate:
        pairs += [(CERT_FILE, PREVIOUS_CERT_FILE), (KEY_FILE, PREVIOUS_KEY_FILE)]
    for current, previous in pairs:
        os.replace(state_dir / current, state_dir / previous)
    return load_identity(state_dir, create=True)


def retire_previous(state_dir: Path) -> Identity:
    """End a changeover: the previous secret and certificate are no longer accepted."""
    for name in (PREVIOUS_SECRET_FILE, PREVIOUS_CERT_FILE, PREVIOUS_KEY_FILE):
        (state_dir / name).unlink(missing_ok=True)
    return load_identity(state_dir, create=False)


def fingerprint_of_pem(cert_pem: bytes) -> bytes:
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii", errors="replace"))
    return hashlib.sha256(der).digest()


def _new_certificate() -> tuple[bytes, bytes]:
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
