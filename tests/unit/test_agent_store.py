"""Agents' own credentials on disk (`tcpgc.identity.agents`): scopes as `tcpgc agent add`
builds them, names, the files and their modes, what a running LL polls, and when each
agent was last seen."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tcpgc.errors import UsageError
from tcpgc.identity.agents import (
    AgentScope,
    add_agent,
    agents_dir,
    agents_fingerprint,
    load_agents,
    make_scope,
    name_problem,
    parse_ports,
    read_seen,
    record_seen,
    revoke_agent,
)
from tcpgc.protocol.fields import MAX_EXPOSES
from tcpgc.protocol.handshake import key_id

WEB = AgentScope(("web",))
PORTS = AgentScope((), (8000, 8005), 6)


# -- scopes ---------------------------------------------------------------------------


def test_make_scope_takes_services_ports_and_rate() -> None:
    scope = make_scope(("web", "db"), (8000, 8005), 2, "80Mbit")
    assert scope == AgentScope(("web", "db"), (8000, 8005), 2, 80_000_000)
    assert scope.may_serve("web") and not scope.may_serve("ssh")
    assert scope.may_expose(8000) and scope.may_expose(8005)
    assert not scope.may_expose(7999) and not scope.may_expose(8006)


def test_max_ports_defaults_to_the_range_within_the_protocol_cap() -> None:
    assert make_scope((), (8000, 8005), None, None).max_ports == 6
    assert make_scope((), (8000, 8000), None, None).max_ports == 1
    assert make_scope((), (1000, 9000), None, None).max_ports == MAX_EXPOSES
    assert make_scope((), (8000, 8001), 5, None).max_ports == 2  # never more than the range
    assert make_scope(("web",), None, None, None).max_ports == 0


def test_a_scope_with_no_service_exposes_nothing() -> None:
    scope = make_scope(("web",), None, None, None)
    assert scope.ports is None and not scope.may_expose(8000) and scope.rate is None


@pytest.mark.parametrize(
    ("services", "ports", "max_ports", "rate"),
    [
        ((), None, None, None),  # nothing to do
        (("we b",), None, None, None),
        ((":80",), None, None, None),  # an exposed port's name is not a service
        (("web",), None, 3, None),  # --max-ports without --ports
        ((), (1, 5), 0, None),
        ((), (1, 99), MAX_EXPOSES + 1, None),
        ((), (1, 5), None, "fast"),
        ((), (1, 5), None, "0"),
        ((), (1, 5), None, "10bit"),  # below the smallest rate
    ],
)
def test_make_scope_refuses_a_bad_scope_as_a_usage_error(
    services: tuple[str, ...],
    ports: tuple[int, int] | None,
    max_ports: int | None,
    rate: str | None,
) -> None:
    with pytest.raises(UsageError):
        make_scope(services, ports, max_ports, rate)


def test_scopes_describe_themselves() -> None:
    assert WEB.describe_services() == "only web" and WEB.describe_ports() == "no port"
    assert AgentScope((), (80, 80), 1).describe_ports() == "only port 80"
    text = AgentScope(("a", "b"), (8000, 8005), 2, 80_000_000).describe()
    assert text == (
        "serves only a, b; exposes only ports 8000-8005 (at most 2 at once); rate 80 Mbit/s"
    )
    assert AgentScope((), (1, 2), 2).describe_services() == "no service"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8000", (8000, 8000)), ("8000-8005", (8000, 8005)), ("1-65535", (1, 65535))],
)
def test_parse_ports(text: str, expected: tuple[int, int]) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize(
    "text", ["", "-", "0", "65536", "0-5", "5-1", "1-65536", "a-b", "1-2-3", "8000-", "-8000"]
)
def test_parse_ports_refuses_what_is_not_a_range(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ports(text)


@pytest.mark.parametrize("name", ["a", "web-1", "a.b", "A_1", "x" * 64, "sees", "seen.x"])
def test_good_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    "name", ["", ".x", ":80", "a b", "é", "x" * 65, "../x", "a/b", "seen", "a\n", "a\x00"]
)
def test_bad_names(name: str) -> None:
    assert name_problem(name) is not None


# -- the files --------------------------------------------------------------------------


def test_add_load_and_revoke(tmp_path: Path) -> None:
    assert load_agents(tmp_path) == {} and agents_fingerprint(tmp_path) is None
    a = add_agent(tmp_path, "a", PORTS)
    b = add_agent(tmp_path, "b", WEB)
    assert a.secret != b.secret and len(a.secret) >= 32
    assert a.key_id == key_id(a.secret)
    assert a.secret.hex() not in repr(a)
    loaded = load_agents(tmp_path)
    assert set(loaded) == {a.key_id, b.key_id}
    assert loaded[a.key_id].scope == PORTS and loaded[b.key_id].scope == WEB
    assert loaded[a.key_id].secret == a.secret and loaded[a.key_id].name == "a"
    folder = agents_dir(tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "a.json").stat().st_mode) == 0o600
    revoke_agent(tmp_path, "a")
    assert set(load_agents(tmp_path)) == {b.key_id}
    assert not (folder / "a.json").exists()


def test_add_refuses_a_duplicate_and_a_bad_name(tmp_path: Path) -> None:
    first = add_agent(tmp_path, "a", WEB)
    with pytest.raises(UsageError):
        add_agent(tmp_path, "a", PORTS)
    assert list(load_agents(tmp_path).values())[0].secret == first.secret
    for bad in ("../evil", ".hidden", "seen"):
        with pytest.raises(UsageError):
            add_agent(tmp_path, bad, WEB)
    assert sorted(os.listdir(agents_dir(tmp_path))) == ["a.json"]


def test_revoke_refuses_an_unknown_or_bad_name(tmp_path: Path) -> None:
    add_agent(tmp_path, "a", WEB)
    (tmp_path / "outside.json").write_text("{}")
    for name in ("b", "../outside", "seen", ""):
        with pytest.raises(UsageError):
            revoke_agent(tmp_path, name)
    assert (tmp_path / "outside.json").exists()
    with pytest.raises(UsageError):
        revoke_agent(tmp_path / "elsewhere", "a")


@pytest.mark.parametrize(
    "corrupt",
    [
        "not json",
        "[]",
        "{}",
        '{"name": "a", "secret": "AAAA", "created": 1, "services": [], "ports": null, '
        '"max_ports": 0, "rate": null}',  # a secret of the wrong size
    ],
)
def test_a_corrupt_credential_is_a_usage_error_naming_it(tmp_path: Path, corrupt: str) -> None:
    add_agent(tmp_path, "good", WEB)
    path = agents_dir(tmp_path) / "a.json"
    path.write_text(corrupt)
    os.chmod(path, 0o600)
    with pytest.raises(UsageError) as caught:
        load_agents(tmp_path)
    assert caught.value.args and "a.json" in caught.value.args[0]


def test_a_credential_naming_another_agent_is_refused(tmp_path: Path) -> None:
    add_agent(tmp_path, "a", WEB)
    folder = agents_dir(tmp_path)
    os.rename(folder / "a.json", folder / "b.json")
    with pytest.raises(UsageError):
        load_agents(tmp_path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o666])
def test_a_credential_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    add_agent(tmp_path, "a", WEB)
    os.chmod(agents_dir(tmp_path) / "a.json", mode)
    with pytest.raises(UsageError):
        load_agents(tmp_path)


def test_other_files_in_the_folder_are_not_credentials(tmp_path: Path) -> None:
    a = add_agent(tmp_path, "a", WEB)
    folder = agents_dir(tmp_path)
    (folder / "notes.txt").write_text("hello")
    (folder / ".a.json.tmp").write_text("half written")
    record_seen(tmp_path, {"a": 1.0})
    assert set(load_agents(tmp_path)) == {a.key_id}


def test_the_fingerprint_changes_on_add_and_revoke_only(tmp_path: Path) -> None:
    add_agent(tmp_path, "a", WEB)
    first = agents_fingerprint(tmp_path)
    assert agents_fingerprint(tmp_path) == first
    record_seen(tmp_path, {"a": 5.0})  # the LL's own writes are not a change
    assert agents_fingerprint(tmp_path) == first
    add_agent(tmp_path, "b", WEB)
    second = agents_fingerprint(tmp_path)
    assert second != first
    revoke_agent(tmp_path, "b")
    third = agents_fingerprint(tmp_path)
    assert third != second
    revoke_agent(tmp_path, "a")
    add_agent(tmp_path, "a", PORTS)  # the same name again, with a new secret
    assert agents_fingerprint(tmp_path) != third


# -- last seen --------------------------------------------------------------------------


def test_record_and_read_seen(tmp_path: Path) -> None:
    record_seen(tmp_path, {"a": 1.0})  # no agents folder: nothing to write
    assert read_seen(tmp_path) == {} and not agents_dir(tmp_path).exists()
    add_agent(tmp_path, "a", WEB)
    record_seen(tmp_path, {"a": 10.0})
    record_seen(tmp_path, {"b": 20.5})
    assert read_seen(tmp_path) == {"a": 10.0, "b": 20.5}
    record_seen(tmp_path, {"a": 30.0})
    assert read_seen(tmp_path) == {"a": 30.0, "b": 20.5}
    seen = agents_dir(tmp_path) / "seen.json"
    assert stat.S_IMODE(seen.stat().st_mode) == 0o600
    assert [p.name for p in agents_dir(tmp_path).iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("garbage", {}), ("[1, 2]", {}), ('{"a": "x", "b": 2, "c": null}', {"b": 2.0})],
)
def test_a_bad_seen_file_reads_as_what_it_can(tmp_path: Path, text: str, expected: dict) -> None:
    add_agent(tmp_path, "a", WEB)
    (agents_dir(tmp_path) / "seen.json").write_text(text)
    assert read_seen(tmp_path) == expected
    record_seen(tmp_path, {"a": 1.0})
    assert read_seen(tmp_path) == expected | {"a": 1.0}
    assert json.loads((agents_dir(tmp_path) / "seen.json").read_text())["a"] == 1.0
