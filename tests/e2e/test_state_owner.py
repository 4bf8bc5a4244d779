"""`tcpgc token` run as root against a state dir that belongs to the service user (as
systemd's StateDirectory= makes it) writes files that user can read: a root-owned
secret used to make the LL's next SIGHUP or restart fail with 'Permission denied'."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import RE_LL_AGENT_PORT, Node, node_toml, run_tcpgc, tcpgc_env

NOBODY = 65534
READY = 20.0


@pytest.fixture
def user_state_dir() -> Iterator[Path]:
    """A 0700 state dir owned by an unprivileged user, in a dir that user can enter."""
    if os.geteuid() != 0:
        pytest.skip("giving files to another user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run the LL as another user")
    base = Path(tempfile.mkdtemp(prefix="tcpgc-owner-"))
    try:
        os.chmod(base, 0o711)
        state = base / "state"
        state.mkdir(mode=0o700)
        os.chown(state, NOBODY, NOBODY)
        yield state
    finally:
        shutil.rmtree(base)


def _owners(state: Path) -> dict[str, int]:
    return {path.name: path.stat().st_uid for path in state.iterdir()}


def test_token_and_rotation_as_root_keep_the_state_dir_usable(user_state_dir: Path) -> None:
    state = user_state_dir
    created = run_tcpgc("token", "--state-dir", str(state))
    assert created.returncode == 0, created.stderr
    assert set(_owners(state).values()) == {NOBODY}, _owners(state)

    config = state.parent / "ll.toml"
    config.write_text(
        node_toml(
            {"cc": "127.0.0.1:0", "state_dir": str(state)}, {"web": {"clients": "127.0.0.1:0"}}
        )
    )
    config.chmod(0o644)
    as_user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    ll = Node("ll", "-c", str(config), name="ll (nobody)", env=tcpgc_env(), prefix=as_user)
    try:
        ll.wait_for(RE_LL_AGENT_PORT, READY)
        rotated = run_tcpgc("token", "--state-dir", str(state), "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert set(_owners(state).values()) == {NOBODY}, _owners(state)
        mark = ll.mark()
        ll.proc.send_signal(signal.SIGHUP)
        ll.wait_for(r"config reloaded|reload refused", 10, since=mark)
        assert not ll.find_all(r"reload refused|Permission denied", since=mark), ll.output()
    finally:
        ll.stop()
