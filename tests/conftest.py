"""Shared by every tier: the tier markers, the end-to-end fixtures (nodes, servers and
whole tunnels, always cleaned up), and a last sweep that kills every process the tests
started and left running, whatever ended the session."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from support import EchoServer, Harness, Tunnel

TESTS_DIR = Path(__file__).resolve().parent

#: Folder under tests/ -> the marker its tests get (registered in pyproject.toml).
TIERS = ("unit", "sockets", "e2e", "netns")


# ---------------------------------------------------------------------------- tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier, so `-m unit` (or `-m "not netns"`) selects
    by tier; a test module outside the tier folders is an error, not a silent gap."""
    misplaced: set[str] = set()
    for item in items:
        try:
            tier = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue  # not under tests/: someone ran a file from elsewhere on purpose
        if tier in TIERS:
            item.add_marker(tier)
        else:
            misplaced.add(str(item.path.relative_to(TESTS_DIR)))
    if misplaced:
        raise pytest.UsageError(
            "test modules must live in a tier folder (tests/unit, tests/sockets, tests/e2e, "
            "tests/netns; see tests/README.md): " + ", ".join(sorted(misplaced))
        )


# ---------------------------------------------------------------------------- leftovers


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # ppid is the 2nd field after "(comm)"; comm may contain spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    tree = _children_by_parent()
    found: list[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(tree.get(child, []))
    return found


def kill_leftover_processes() -> list[int]:
    """SIGKILL every descendant of this process, and the process group of each that
    leads its own (socat forks per connection; a group outlives its leader), then reap
    our direct children. Returns the pids found."""
    if not os.path.isdir("/proc"):
        return []
    me = os.getpid()
    leftovers = _descendants(me)
    for pid in leftovers:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone, or started as another user and gone with its parent
    for pid in leftovers:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our direct child: its own parent (killed too) or init reaps it
    return leftovers


def _terminate_as_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (CI's `timeout`, a cancelled job) would end pytest at once, skipping every
    # teardown; as an interrupt, fixtures are torn down and the sweep below runs.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture's own teardown: nothing a test started may outlive pytest (an
    orphaned busy node would go on burning CPU on a shared machine)."""
    leftovers = kill_leftover_processes()
    if leftovers and exitstatus == 0:
        # Teardown should have stopped them: say so, without failing a passing run.
        print(f"\nkilled {len(leftovers)} processes left running by the tests: {leftovers}")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()
        # On failure, pytest shows captured stdout: put every node's log there.
        print(h.dump())


@pytest.fixture
def echo_server(harness: Harness) -> EchoServer:
    return harness.echo_server()


@pytest.fixture
def tunnel(harness: Harness, echo_server: EchoServer) -> Tunnel:
    """A joined LL + CC pair whose ``default`` service reaches an echo server."""
    return harness.tunnel(echo_server.addr_str)


@pytest.fixture
def write_private_file(tmp_path: Path) -> Callable[[str, str, int], Path]:
    """Write a file with the given mode (tokens must be 0600)."""

    def write(name: str, text: str, mode: int = 0o600) -> Path:
        path = tmp_path / name
        path.write_text(text)
        os.chmod(path, mode)
        return path

    return write
