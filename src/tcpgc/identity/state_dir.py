"""The LL's identity as kept in its state dir: its secret and certificate, the previous
ones during a rotation, and the TLS context of the agent port built from them."""

from __future__ import annotations

import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from tcpgc.errors import UsageError
from tcpgc.identity.join_token import SECRET_SIZE, JoinToken, b64url, unb64url
from tcpgc.identity.secret_files import check_private, write_private
from tcpgc.identity.tls import Certificate, new_certificate, pin_server_name

SECRET_FILE = "secret"
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
PREVIOUS_SECRET_FILE = "secret.previous"
PREVIOUS_KEY_FILE = "key.previous.pem"
PREVIOUS_CERT_FILE = "cert.previous.pem"


def default_state_dir() -> Path:
    """Where the LL keeps its identity: /var/lib/tcpgc for root, else the XDG state dir."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/tcpgc")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "tcpgc"


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


def _read_secret(path: Path) -> bytes:
    check_private(path)
    try:
        return unb64url(path.read_text().strip(), SECRET_SIZE, "secret")
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
        secret = b64url(secrets.token_bytes(SECRET_SIZE)) + "\n"
        write_private(state_dir / SECRET_FILE, secret.encode())
    if not (state_dir / KEY_FILE).exists() or not (state_dir / CERT_FILE).exists():
        key_pem, cert_pem = new_certificate()
        for name in (KEY_FILE, CERT_FILE):
            (state_dir / name).unlink(missing_ok=True)
        write_private(state_dir / KEY_FILE, key_pem)
        write_private(state_dir / CERT_FILE, cert_pem)


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
