"""Fixtures for the end-to-end tests: nodes, servers and whole tunnels, always cleaned up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import EchoServer, Harness, Tunnel


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
