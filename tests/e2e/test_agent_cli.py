"""`tcpgc agent add | list | revoke` as an operator types them: what each prints where,
exit codes, one clear line for every mistake, the files' modes, and a token that is shown
once and never again."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from agent_tools import agent_add, agent_revoke, free_port_range, start_agents_ll, token_secret
from support import Harness, node_toml, run_tcpgc, tcpgc_cmd, tcpgc_env

pytestmark = pytest.mark.timeout(120)

LIST_FIELDS = {
    "name", "services", "ports", "max_ports", "rate", "scope", "created", "last_seen",
}  # fmt: skip


def agent(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return run_tcpgc("agent", *args, "--state-dir", str(state))


def assert_usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, nothing on stdout, one line on stderr starting 'tcpgc: '; returns it."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", f"printed on stdout: {proc.stdout!r}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpgc: "), proc.stderr
    return lines[0]


def test_add_prints_the_token_alone_on_stdout_and_keeps_it_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = agent("add", "web-1", "--services", "web,db", "--rate", "80Mbit", state=state)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpgc1."), proc.stdout
    token = lines[0]
    assert "agent 'web-1' added" in proc.stderr
    assert token not in proc.stderr and token_secret(token) not in proc.stderr
    folder = state / "agents"
    path = folder / "web-1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    stored = json.loads(path.read_text())
    assert stored["secret"] == token_secret(token), "the file holds another secret"
    assert stored["services"] == ["web", "db"] and stored["rate"] == 80_000_000
    # the token's fingerprint is the LL's own: the one `tcpgc token` names
    shared = run_tcpgc("token", "--state-dir", str(state)).stdout.strip()
    assert shared.split(".")[2] == token.split(".")[2]
    assert token_secret(shared) != token_secret(token)


def test_the_credential_is_private_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.run(
        ["sh", "-c", 'umask 000; exec "$@"', "sh", *tcpgc_cmd("agent", "add", "x", "--ports",
         "9000", "--state-dir", str(state))],
        env=tcpgc_env(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((state / "agents" / "x.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "agents").stat().st_mode) == 0o700


def test_list_shows_scopes_and_never_a_token(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert_usage_error(agent("list", state=state))  # no LL here yet: says how to make one
    run_tcpgc("token", "--state-dir", str(state))
    empty = agent("list", state=state)
    assert empty.returncode == 0 and "no agents" in empty.stdout
    listed = json.loads(agent("list", "--json", state=state).stdout)
    assert listed == {"agents": [], "unreadable": []}
    tok_a = agent_add(state, "a", "--ports", "8000-8005", "--max-ports", "2")
    tok_b = agent_add(state, "b", "--services", "web")
    text = agent("list", state=state)
    assert text.returncode == 0, text.stderr
    rows = text.stdout.splitlines()
    assert [row.split("\t")[0] for row in rows] == ["a", "b"]
    assert "exposes only ports 8000-8005 (at most 2 at once)" in rows[0]
    assert "serves only web" in rows[1] and "never seen" in rows[1]
    as_json = agent("list", "--json", state=state)
    assert as_json.returncode == 0, as_json.stderr
    for output in (text.stdout + text.stderr, as_json.stdout + as_json.stderr):
        for token in (tok_a, tok_b):
            assert token not in output and token_secret(token) not in output
    agents = json.loads(as_json.stdout)["agents"]
    assert [set(row) for row in agents] == [LIST_FIELDS, LIST_FIELDS]
    a, b = agents
    assert (a["name"], a["services"], a["ports"], a["max_ports"], a["rate"]) == (
        "a", [], [8000, 8005], 2, None,
    )  # fmt: skip
    assert (b["name"], b["services"], b["ports"], b["max_ports"]) == ("b", ["web"], None, 0)
    assert abs(a["created"] - time.time()) < 120 and a["last_seen"] is None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("add", "a", "--ports", "9000"), "exists"),  # duplicate (added first)
        (("add", "b c", "--ports", "9000"), "not valid"),
        (("add", ".hidden", "--ports", "9000"), "not valid"),
        (("add", "../x", "--ports", "9000"), "not valid"),
        (("add", "x" * 65, "--ports", "9000"), "not valid"),
        (("add", "seen", "--ports", "9000"), "reserved"),
        (("add", "c"), "no service and no port"),
        (("add", "c", "--services", ",,"), "no service and no port"),
        (("add", "c", "--services", "we b"), "not a service name"),
        (("add", "c", "--ports", "0-5"), "port range"),
        (("add", "c", "--ports", "5-1"), "port range"),
        (("add", "c", "--ports", "1-65536"), "port range"),
        (("add", "c", "--ports", "abc"), "port range"),
        (("add", "c", "--ports", "8000-"), "port range"),
        (("add", "c", "--ports", "1-5", "--max-ports", "0"), "max-ports"),
        (("add", "c", "--ports", "1-99", "--max-ports", "33"), "max-ports"),
        (("add", "c", "--services", "web", "--max-ports", "3"), "--ports"),
        (("add", "c", "--ports", "9000", "--rate", "fast"), "rate"),
        (("add", "c", "--ports", "9000", "--rate", "0"), "rate"),
        (("add", "c", "--ports", "9000", "--rate", "10bit"), "rate"),
        (("revoke", "nobody"), "no agent"),
        (("revoke", "../state"), "no agent"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    state = tmp_path / "state"
    agent_add(state, "a", "--ports", "9000")
    before = sorted(os.listdir(state / "agents"))
    line = assert_usage_error(agent(*args, state=state))
    assert says in line, line
    assert sorted(os.listdir(state / "agents")) == before, "a refused command changed files"


def test_revoke_removes_the_agent_and_a_second_revoke_is_an_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    token = agent_add(state, "a", "--ports", "9000")
    agent_add(state, "b", "--ports", "9001")
    proc = agent("revoke", "a", state=state)
    assert proc.returncode == 0 and proc.stdout == "", proc
    assert "revoked" in proc.stderr and token not in proc.stderr
    assert not (state / "agents" / "a.json").exists()
    names = [
        row["name"] for row in json.loads(agent("list", "--json", state=state).stdout)["agents"]
    ]
    assert names == ["b"]
    assert "no agent" in assert_usage_error(agent("revoke", "a", state=state))
    # the name is free again, with a new secret
    again = agent_add(state, "a", "--ports", "9000")
    assert token_secret(again) != token_secret(token)


def test_add_with_the_ll_config_uses_its_state_dir_and_warns_of_unknown_services(
    tmp_path: Path,
) -> None:
    state = tmp_path / "ll-state"
    config = tmp_path / "ll.toml"
    config.write_text(
        node_toml({"cc": "127.0.0.1:0", "state_dir": str(state)}, {"web": {"clients": ":0"}})
    )
    proc = run_tcpgc("agent", "add", "a", "--services", "web,db", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert (state / "agents" / "a.json").exists()
    warning = [line for line in proc.stderr.splitlines() if "not configured" in line]
    assert len(warning) == 1 and "db" in warning[0] and "web" not in warning[0]
    # The state dir had no LL identity yet: one was made, and the operator is told.
    assert any("no LL identity in" in line for line in proc.stderr.splitlines())
    listed = run_tcpgc("agent", "list", "--json", "-c", str(config))
    assert [row["name"] for row in json.loads(listed.stdout)["agents"]] == ["a"]


def test_last_seen_is_recorded_once_the_agent_connected(harness: Harness) -> None:
    base = free_port_range(1)
    env = start_agents_ll(harness)
    token = env.add("a", "--ports", str(base))
    server = harness.echo_server()
    before = time.time()
    env.start_cc(token, name="cc", exposes=[f"{base}={server.addr_str}"])
    deadline = time.monotonic() + 35
    while True:
        listed = agent("list", "--json", state=env.state_dir)
        seen = json.loads(listed.stdout)["agents"][0]["last_seen"]
        if seen is not None:
            break
        assert time.monotonic() < deadline, "last_seen still null 35 s after the agent joined"
        time.sleep(0.5)
    assert isinstance(seen, float) and before - 1 < seen < time.time() + 1
    assert "seen " in agent("list", state=env.state_dir).stdout
    seen_file = env.state_dir / "agents" / "seen.json"
    assert stat.S_IMODE(seen_file.stat().st_mode) == 0o600
    assert token_secret(token) not in seen_file.read_text()


def test_an_unreadable_credential_is_listed_and_hides_no_other(tmp_path: Path) -> None:
    """One corrupt file does not stop `list` (it names the file on stderr and under
    "unreadable") nor a revocation of another agent."""
    state = tmp_path / "state"
    run_tcpgc("token", "--state-dir", str(state))
    agent_add(state, "good", "--ports", "9000")
    agent_add(state, "other", "--ports", "9001")
    junk = state / "agents" / "junk.json"
    junk.write_text("not json")
    junk.chmod(0o600)
    listed = agent("list", "--json", state=state)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert [row["name"] for row in data["agents"]] == ["good", "other"]
    assert len(data["unreadable"]) == 1 and "junk.json" in data["unreadable"][0]
    assert "junk.json" in listed.stderr and "Traceback" not in listed.stderr
    agent_revoke(state, "other")
    names = [
        row["name"] for row in json.loads(agent("list", "--json", state=state).stdout)["agents"]
    ]
    assert names == ["good"]
