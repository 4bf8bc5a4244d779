"""Join tokens and the LL identity kept in its state dir."""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from attack_tools import self_signed_certificate
from tcpgc.errors import UsageError
from tcpgc.identity import (
    CERT_FILE,
    FINGERPRINT_SIZE,
    KEY_FILE,
    SECRET_FILE,
    SECRET_SIZE,
    TOKEN_PREFIX,
    JoinToken,
    agent_context,
    fingerprint_of_pem,
    format_fingerprint,
    load_identity,
    pin_server_name,
    read_token,
    retire_previous,
    rotate,
)

SECRET = bytes(range(SECRET_SIZE))
FINGERPRINT = bytes(range(100, 100 + FINGERPRINT_SIZE))
TOKEN = JoinToken(SECRET, FINGERPRINT)
TOKEN_TEXT = str(TOKEN)
_, SECRET_FIELD, FP_FIELD = TOKEN_TEXT.split(".")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- tokens ---------------------------------------------------------------------------


def test_token_round_trip() -> None:
    assert TOKEN_TEXT.startswith(TOKEN_PREFIX + ".")
    assert TOKEN_TEXT.count(".") == 2
    assert "=" not in TOKEN_TEXT  # base64url without padding
    parsed = JoinToken.parse(TOKEN_TEXT)
    assert parsed == TOKEN
    assert parsed.secret == SECRET
    assert parsed.fingerprint == FINGERPRINT
    assert str(parsed) == TOKEN_TEXT


@pytest.mark.parametrize("seed", range(8))
def test_token_round_trip_random(seed: int) -> None:
    secret = os.urandom(SECRET_SIZE)
    fingerprint = hashlib.sha256(bytes([seed]) + secret).digest()
    token = JoinToken(secret, fingerprint)
    text = str(token)
    # Only base64url characters after the prefix, so it survives shells and config files.
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    assert JoinToken.parse(text) == token


def test_token_parse_tolerates_surrounding_whitespace() -> None:
    assert JoinToken.parse(f"  {TOKEN_TEXT}\n") == TOKEN


def test_token_repr_hides_secret() -> None:
    text = repr(TOKEN)
    assert SECRET_FIELD not in text
    assert str(SECRET) not in text
    assert SECRET.hex() not in text
    assert format_fingerprint(FINGERPRINT) in text
    # Nor through containers, which use repr of their items.
    assert SECRET_FIELD not in repr([TOKEN])
    assert SECRET_FIELD not in f"{TOKEN!r}"


def test_format_fingerprint() -> None:
    assert format_fingerprint(FINGERPRINT) == "SHA256:" + FP_FIELD


MALFORMED = {
    "wrong-prefix": f"foo1.{SECRET_FIELD}.{FP_FIELD}",
    "no-prefix": f"{SECRET_FIELD}.{FP_FIELD}",
    "two-fields": f"{TOKEN_PREFIX}.{SECRET_FIELD}",
    "four-fields": f"{TOKEN_TEXT}.{FP_FIELD}",
    "one-field": SECRET_FIELD,
    "empty": "",
    "bad-base64-secret": f"{TOKEN_PREFIX}.{SECRET_FIELD[:-1]}!.{FP_FIELD}",
    "bad-base64-fp": f"{TOKEN_PREFIX}.{SECRET_FIELD}.{FP_FIELD[:-1]}*",
    "non-ascii": f"{TOKEN_PREFIX}.{SECRET_FIELD[:-1]}é.{FP_FIELD}",
    "short-secret": f"{TOKEN_PREFIX}.{SECRET_FIELD[:-4]}.{FP_FIELD}",
    "long-secret": f"{TOKEN_PREFIX}.{SECRET_FIELD}AAAA.{FP_FIELD}",
    "short-fp": f"{TOKEN_PREFIX}.{SECRET_FIELD}.{FP_FIELD[:-8]}",
    "long-fp": f"{TOKEN_PREFIX}.{SECRET_FIELD}.{FP_FIELD}AAAA",
    "empty-fields": f"{TOKEN_PREFIX}..",
    "swapped-lengths": f"{TOKEN_PREFIX}.{SECRET_FIELD}.{SECRET_FIELD[:10]}",
    "future-version": f"tcpgc2.{SECRET_FIELD}.{FP_FIELD}",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_token(text: str) -> None:
    with pytest.raises(UsageError) as info:
        JoinToken.parse(text)
    message = str(info.value)
    assert message
    # The message may end up in logs or a bug report: never echo the token back.
    if text:
        assert text not in message
    assert SECRET_FIELD[:10] not in message
    assert FP_FIELD[:10] not in message


def test_future_token_version_says_upgrade() -> None:
    with pytest.raises(UsageError, match="upgrade") as info:
        JoinToken.parse(f"tcpgc2.{SECRET_FIELD}.{FP_FIELD}")
    assert "tcpgc1" in str(info.value)


def test_wrong_prefix_says_what_is_expected() -> None:
    with pytest.raises(UsageError, match="tcpgc token"):
        JoinToken.parse(f"foo.{SECRET_FIELD}.{FP_FIELD}")


@pytest.mark.parametrize("junk", ["!!", "!!!!", "\t\t\t\t", "$%^&", "=="])
def test_token_with_junk_characters_is_refused(junk: str) -> None:
    # A lenient base64 decoder drops characters outside the alphabet: four of them keep
    # the length valid, so only strict decoding refuses this.
    text = f"{TOKEN_PREFIX}.{SECRET_FIELD[:5]}{junk}{SECRET_FIELD[5:]}.{FP_FIELD}"
    with pytest.raises(UsageError):
        JoinToken.parse(text)


# -- read_token -----------------------------------------------------------------------


def test_read_token_from_env() -> None:
    assert read_token(TOKEN_TEXT, None) == TOKEN


def test_read_token_from_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN_TEXT + "\n")
    path.chmod(0o600)
    # The file wins over the environment.
    other = JoinToken(b"\x01" * SECRET_SIZE, FINGERPRINT)
    assert read_token(str(other), path) == TOKEN


def test_read_token_file_readable_by_others_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN_TEXT)
    path.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600") as info:
        read_token(None, path)
    assert SECRET_FIELD not in str(info.value)


def test_read_token_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read token file"):
        read_token(TOKEN_TEXT, tmp_path / "nope")


@pytest.mark.parametrize("env_value", [None, ""])
def test_read_token_none_given(env_value: str | None) -> None:
    with pytest.raises(UsageError, match="TCPGC_TOKEN"):
        read_token(env_value, None)


# -- the LL identity ------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tcpgc"


def test_load_identity_creates_private_files(state_dir: Path) -> None:
    identity = load_identity(state_dir, create=True)
    assert mode(state_dir) == 0o700
    for name in (SECRET_FILE, KEY_FILE, CERT_FILE):
        assert (state_dir / name).is_file()
        assert mode(state_dir / name) == 0o600, name
    assert len(identity.secret) == SECRET_SIZE
    assert identity.certificate.cert_path == state_dir / CERT_FILE
    assert identity.certificate.key_path == state_dir / KEY_FILE
    assert identity.previous_secret is None
    assert identity.previous_certificate is None
    assert identity.secrets == [identity.secret]
    # No temporary files are left behind.
    assert sorted(p.name for p in state_dir.iterdir()) == sorted([SECRET_FILE, KEY_FILE, CERT_FILE])


def test_load_identity_is_idempotent(state_dir: Path) -> None:
    first = load_identity(state_dir, create=True)
    second = load_identity(state_dir, create=True)
    third = load_identity(state_dir, create=False)
    assert str(first.token) == str(second.token) == str(third.token)
    assert first.fingerprint == second.fingerprint == third.fingerprint
    assert first.secret == third.secret


def test_two_state_dirs_have_different_identities(tmp_path: Path) -> None:
    a = load_identity(tmp_path / "a", create=True)
    b = load_identity(tmp_path / "b", create=True)
    assert a.secret != b.secret
    assert a.fingerprint != b.fingerprint


def test_fingerprint_is_sha256_of_cert_der(state_dir: Path) -> None:
    identity = load_identity(state_dir, create=True)
    cert = x509.load_pem_x509_certificate((state_dir / CERT_FILE).read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert identity.fingerprint == hashlib.sha256(der).digest()
    assert fingerprint_of_pem((state_dir / CERT_FILE).read_bytes()) == identity.fingerprint
    assert identity.certificate.fingerprint == identity.fingerprint
    assert identity.token.fingerprint == identity.fingerprint
    assert identity.token.secret == identity.secret
    assert JoinToken.parse(str(identity.token)) == identity.token


def test_secret_file_holds_the_token_secret(state_dir: Path) -> None:
    identity = load_identity(state_dir, create=True)
    assert (state_dir / SECRET_FILE).read_text().strip() == str(identity.token).split(".")[1]


def test_key_matches_certificate(state_dir: Path) -> None:
    identity = load_identity(state_dir, create=True)
    # load_cert_chain fails if the key does not belong to the certificate.
    ctx, fingerprints = identity.server_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert fingerprints == {id(ctx): identity.fingerprint}
    key = serialization.load_pem_private_key((state_dir / KEY_FILE).read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((state_dir / CERT_FILE).read_bytes())
    assert key.public_key() == cert.public_key()


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
@pytest.mark.parametrize("name", [KEY_FILE, SECRET_FILE])
def test_file_readable_by_others_refused(state_dir: Path, name: str, bad_mode: int) -> None:
    load_identity(state_dir, create=True)
    (state_dir / name).chmod(bad_mode)
    for create in (False, True):
        with pytest.raises(UsageError, match="chmod 600") as info:
            load_identity(state_dir, create=create)
        assert str(state_dir / name) in str(info.value)
    # The refusal did not rewrite or re-mode anything.
    assert mode(state_dir / name) == bad_mode


def test_missing_identity_without_create(state_dir: Path) -> None:
    with pytest.raises(UsageError, match="tcpgc token") as info:
        load_identity(state_dir, create=False)
    assert str(state_dir) in str(info.value)
    assert not state_dir.exists()


@pytest.mark.parametrize("name", [SECRET_FILE, KEY_FILE, CERT_FILE])
def test_partly_missing_identity_without_create(state_dir: Path, name: str) -> None:
    load_identity(state_dir, create=True)
    (state_dir / name).unlink()
    with pytest.raises(UsageError, match="tcpgc token"):
        load_identity(state_dir, create=False)


@pytest.mark.parametrize("name", [SECRET_FILE, KEY_FILE, CERT_FILE])
def test_partly_missing_identity_names_the_file(state_dir: Path, name: str) -> None:
    load_identity(state_dir, create=True)
    (state_dir / name).unlink()
    with pytest.raises(UsageError) as info:
        load_identity(state_dir, create=False)
    assert name in str(info.value)
    assert not (state_dir / name).exists()  # create=False never writes


def test_missing_cert_is_recreated_with_its_key(state_dir: Path) -> None:
    first = load_identity(state_dir, create=True)
    old_key = (state_dir / KEY_FILE).read_bytes()
    (state_dir / CERT_FILE).unlink()
    second = load_identity(state_dir, create=True)
    assert second.secret == first.secret
    assert second.fingerprint != first.fingerprint
    assert (state_dir / KEY_FILE).read_bytes() != old_key
    second.server_context()  # the new key and certificate belong together


def test_corrupt_secret_file(state_dir: Path) -> None:
    load_identity(state_dir, create=True)
    (state_dir / SECRET_FILE).write_text("not a secret\n")
    with pytest.raises(UsageError, match="corrupt") as info:
        load_identity(state_dir, create=False)
    assert "not a secret" not in str(info.value)


# -- rotation -------------------------------------------------------------------------


def test_rotate_secret_keeps_the_old_one_accepted(state_dir: Path) -> None:
    old = load_identity(state_dir, create=True)
    new = rotate(state_dir, secret=True, certificate=False)
    assert new.secret != old.secret
    assert new.previous_secret == old.secret
    assert new.secrets == [new.secret, old.secret]
    assert new.fingerprint == old.fingerprint
    assert new.previous_certificate is None
    for path in state_dir.iterdir():
        if path.name != CERT_FILE:
            assert mode(path) == 0o600, path.name
    # Loading again sees the same changeover state.
    assert load_identity(state_dir, create=False).secrets == new.secrets


def test_rotate_certificate_keeps_the_old_one_served(state_dir: Path) -> None:
    old = load_identity(state_dir, create=True)
    new = rotate(state_dir, secret=False, certificate=True)
    assert new.secret == old.secret
    assert new.previous_secret is None
    assert new.fingerprint != old.fingerprint
    assert new.previous_certificate is not None
    assert new.previous_certificate.fingerprint == old.fingerprint
    ctx, fingerprints = new.server_context()
    assert sorted(fingerprints.values()) == sorted([new.fingerprint, old.fingerprint])
    assert fingerprints[id(ctx)] == new.fingerprint


def test_retire_previous_ends_the_changeover(state_dir: Path) -> None:
    load_identity(state_dir, create=True)
    rotated = rotate(state_dir, secret=True, certificate=True)
    retired = retire_previous(state_dir)
    assert retired.secret == rotated.secret
    assert retired.fingerprint == rotated.fingerprint
    assert retired.previous_secret is None
    assert retired.previous_certificate is None
    assert retired.secrets == [rotated.secret]
    assert sorted(p.name for p in state_dir.iterdir()) == sorted([SECRET_FILE, KEY_FILE, CERT_FILE])


def test_new_identity_uses_ed25519(state_dir: Path) -> None:
    """Each agent-side TLS connection keeps the LL's parsed certificate: an Ed25519 one
    costs 2 KB less per connection than P-256."""
    load_identity(state_dir, create=True)
    cert = x509.load_pem_x509_certificate((state_dir / CERT_FILE).read_bytes())
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)


def test_p256_identity_of_an_earlier_release_still_serves(state_dir: Path) -> None:
    """State dirs made before the switch to Ed25519 keep their P-256 certificate: it is
    loaded as it is, and an agent pinning it completes a handshake."""
    load_identity(state_dir, create=True)
    cert_path, key_path, fingerprint = self_signed_certificate(state_dir, "earlier")  # P-256
    key_path.replace(state_dir / KEY_FILE)  # 0600, as the LL wrote it
    cert_path.replace(state_dir / CERT_FILE)
    identity = load_identity(state_dir, create=False)
    assert identity.fingerprint == fingerprint
    server_ctx, _ = identity.server_context()
    bios = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]
    client = agent_context().wrap_bio(
        *bios[0], server_hostname=pin_server_name(identity.fingerprint)
    )
    server = server_ctx.wrap_bio(*bios[1], server_side=True)
    for _ in range(4):  # ClientHello, server flight, client Finished
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[1][0].write(bios[0][1].read())
        bios[0][0].write(bios[1][1].read())
    presented = client.getpeercert(binary_form=True)
    assert presented is not None
    assert hashlib.sha256(presented).digest() == identity.fingerprint
