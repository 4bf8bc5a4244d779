"""Identity lifecycle through real nodes: rotating the secret and the certificate with a
changeover, and an organisation's own PKI with mutual TLS instead of pinning."""

from __future__ import annotations

from pathlib import Path

from pki_tools import certificate, key_pem, new_key, pem, write_private
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    Harness,
    Node,
    echo_roundtrip,
    format_addr,
    parse_addr,
    run_tcpgc,
    service_re,
)

READY = 20.0


def _join(
    harness: Harness, ll: Node, agent: tuple[str, int], token: str, server: str, name: str
) -> None:
    """Start an agent and wait until it and the LL both log that it joined (the LL's line
    may come a moment after the agent's)."""
    mark = ll.mark()
    cc = harness.start_cc("--ll", format_addr(*agent), "--server", server, token=token, name=name)
    cc.wait_for(RE_CC_JOINED, READY)
    ll.wait_for(RE_LL_AGENT_JOINED, READY, since=mark)


def test_rotation_accepts_old_and_new_tokens_until_the_old_is_retired(harness: Harness) -> None:
    echo = harness.echo_server()
    state = harness.state_dir()
    old = harness.token(state)
    rotated = run_tcpgc("token", "--state-dir", str(state), "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = run_tcpgc("token", "--state-dir", str(state), "--rotate-certificate").stdout.strip()
    assert new.split(".")[1] != old.split(".")[1], "the secret did not change"
    assert new.split(".")[2] != old.split(".")[2], "the certificate did not change"
    assert all(old not in line for line in (rotated.stdout, rotated.stderr))

    # During the changeover one LL accepts both tokens, each with its own certificate.
    ll, agent = harness.start_ll(
        "--clients", "127.0.0.1:0", "--cc", "127.0.0.1:0", "--state-dir", str(state)
    )
    client = parse_addr(ll.wait_for(service_re("default"), READY)["addr"])
    _join(harness, ll, agent, old, echo.addr_str, "cc-old")
    _join(harness, ll, agent, new, echo.addr_str, "cc-new")
    assert len(ll.find_all(RE_LL_AGENT_JOINED)) == 2
    assert echo_roundtrip(client, b"both") == b"both"

    # Retired: after a restart, the old token is refused and the new one still works.
    assert run_tcpgc("token", "--state-dir", str(state), "--retire-previous").returncode == 0
    ll.stop()
    ll2, agent2 = harness.start_ll(
        "--clients", "127.0.0.1:0", "--cc", "127.0.0.1:0", "--state-dir", str(state), name="ll2"
    )
    refused = harness.start_cc(
        "--ll", format_addr(*agent2), "--server", echo.addr_str, token=old, name="cc-old2"
    )
    refused.wait_for(r"cannot connect to LL", READY)
    _join(harness, ll2, agent2, new, echo.addr_str, "cc-new2")
    assert len(ll2.find_all(RE_LL_AGENT_JOINED)) == 1


def test_own_pki_with_mutual_tls(harness: Harness, tmp_path: Path) -> None:
    """The LL presents a certificate of the organisation's CA and requires agents to
    present one too; the agent verifies the chain and name instead of pinning."""
    ca_key = new_key()
    ca = certificate("tcpgc test CA", ca_key, None, ca_key, ca=True)
    ll_key, cc_key = new_key(), new_key()
    ll_cert = certificate("ll", ll_key, ca, ca_key, server=True)
    cc_cert = certificate("agent", cc_key, ca, ca_key)
    files = {
        "ca": write_private(tmp_path / "ca.pem", pem(ca)),
        "ll_cert": write_private(tmp_path / "ll.pem", pem(ll_cert)),
        "ll_key": write_private(tmp_path / "ll.key", key_pem(ll_key)),
        "cc_cert": write_private(tmp_path / "cc.pem", pem(cc_cert)),
        "cc_key": write_private(tmp_path / "cc.key", key_pem(cc_key)),
    }
    state = harness.state_dir()
    ll_toml = tmp_path / "ll.toml"
    ll_toml.write_text(
        f'cc = "127.0.0.1:0"\nstate_dir = "{state}"\n'
        f'tls_cert = "{files["ll_cert"]}"\ntls_key = "{files["ll_key"]}"\n'
        f'tls_client_ca = "{files["ca"]}"\n'
        '[services.default]\nclients = "127.0.0.1:0"\n'
    )
    # The token's fingerprint is of the state dir's self-signed certificate, not of the
    # one the LL presents: the agent must verify by the CA, not by the pin.
    token = harness.token(state)
    assert token != run_tcpgc("token", "-c", str(ll_toml)).stdout.strip()
    ll, agent = harness.start_ll("-c", str(ll_toml))
    client = parse_addr(ll.wait_for(service_re("default"), READY)["addr"])
    echo = harness.echo_server()

    def cc_toml(name: str, with_client_cert: bool) -> Path:
        path = tmp_path / f"{name}.toml"
        lines = [
            f'll = "{format_addr(*agent)}"',
            f'tls_ca = "{files["ca"]}"',
            "[services.default]",
            f'server = "{echo.addr_str}"',
        ]
        if with_client_cert:
            lines[2:2] = [f'tls_cert = "{files["cc_cert"]}"', f'tls_key = "{files["cc_key"]}"']
        path.write_text("\n".join(lines) + "\n")
        return path

    good = harness.start_cc("-c", str(cc_toml("good", True)), token=token, name="cc")
    good.wait_for(RE_CC_JOINED, READY)
    ll.wait_for(RE_LL_AGENT_JOINED, READY)
    assert echo_roundtrip(client, b"pki") == b"pki"

    # Without a client certificate the LL refuses the agent at the TLS layer.
    bare = harness.start_cc("-c", str(cc_toml("bare", False)), token=token, name="cc-bare")
    bare.wait_for(r"cannot connect to LL", READY)
    ll.wait_for(r"handshake failed from .*(?:certificate|TLS)", READY)
    assert len(ll.find_all(RE_LL_AGENT_JOINED)) == 1
