"""docs/quickstart.md, followed literally, command by command, on two hosts: network
namespaces joined by a veth pair, "outside" (gw.example.com) and "inside" (an HTTP
server on 127.0.0.1:7200), clients outside.

The test reads the document: each ```sh block starts with a comment naming where it
runs (`# on the outside host`, `# on the inside host`, `# from a client`) and each
```toml block with the file it is; they run in the order written. What the document
leaves to the reader is done as it says: the token printed by `tcpgc token` is what is
pasted, then the one printed by `tcpgc agent add` (each `read` takes the next line), a
running node is stopped with Ctrl-C (SIGINT) before a new one of the same kind starts on
that host (an agent that exposes a port runs beside the first: it is another agent), and
"try it as in step 4" runs step 4's client block again.
The install block (`# on both hosts: install`) is not run: the checkout is the install.
Commands of a tool that is not installed (`nc`) are skipped, with the reason printed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from docs_shell import Host
from netns import NamespacePair, namespace_pair, skip_unless_possible
from support import RE_CC_JOINED, RE_LL_AGENT_PORT, REPO_ROOT, Process

pytestmark = pytest.mark.netns

QUICKSTART = REPO_ROOT / "docs" / "quickstart.md"
SUBNET = "10.201.92"
OUTSIDE_IP = f"{SUBNET}.1"
HOSTS = f"127.0.0.1 localhost\n::1 localhost\n{OUTSIDE_IP} gw.example.com\n"
PAGE = "hello from the inside server"
READY = 20.0
WHERE = {"# on the outside host": "outside", "# on the inside host": "inside"}
CLIENT = "# from a client"
INSTALL = "# on both hosts: install"


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """Every fenced block: (language, lines)."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    return [(lang, body.splitlines()) for lang, body in found]


@pytest.fixture
def pair() -> Iterator[NamespacePair]:
    skip_unless_possible("the quick start on two hosts")
    if shutil.which("unshare") is None or shutil.which("bash") is None:
        pytest.skip("needs unshare and bash")
    with namespace_pair("q", SUBNET) as ns:
        yield ns


def test_quickstart_blocks_are_all_placed() -> None:
    """Every sh block says where it runs, so the netns test below runs all of them."""
    for lang, lines in blocks(QUICKSTART.read_text()):
        if lang == "sh":
            assert lines[0] in (*WHERE, CLIENT, INSTALL), lines
        if lang == "toml":
            assert re.match(r"# /etc/tcpgc/\S+\.toml", lines[0]), lines


def test_quickstart_literally(pair: NamespacePair, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text(PAGE + "\n")
    server = pair.spawn(
        pair.inside,
        [sys.executable, "-m", "http.server", "7200", "--bind", "127.0.0.1", "-d", str(www)],
        name="http server (inside)",
    )
    server.wait_for(r"Serving HTTP", 10, stream="stdout")
    hosts = {
        "outside": Host(pair, pair.outside, "outside", tmp_path, HOSTS),
        "inside": Host(pair, pair.inside, "inside", tmp_path, HOSTS),
    }
    client = Host(pair, pair.outside, "client", tmp_path, HOSTS)
    running: dict[tuple[str, str], Process] = {}
    token = ""
    agent_token = ""
    client_block: list[str] = []
    ran_client = 0
    reran = False

    def run_client(lines: list[str]) -> None:
        for line in lines[1:]:
            tool = shlex.split(line, comments=True)[0]
            if shutil.which(tool) is None:
                print(f"skipped (no {tool} installed): {line}")
                continue
            result = client.run(line)
            assert result.returncode == 0, (line, result.stderr)
            if tool == "curl":
                assert PAGE in result.stdout, (line, result.stdout, result.stderr)

    for lang, lines in blocks(QUICKSTART.read_text()):
        if lang == "toml":
            for node in running.values():  # "Stop both nodes first (Ctrl-C)"
                node.proc.send_signal(signal.SIGINT)
                assert node.proc.wait(15) == 0, node.output()
            running.clear()
            host = hosts["outside" if "(outside)" in lines[0] else "inside"]
            path = host.path(lines[0][2:].split()[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(host.translate("\n".join(lines) + "\n"))
            continue
        if lang != "sh" or lines[0] == INSTALL:
            continue
        if lines[0] == CLIENT:
            client_block = lines
            run_client(lines)
            ran_client += 1
            continue
        host = hosts[WHERE[lines[0]]]
        for line in lines[1:]:
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] in ("read", "export"):
                host.prelude.append(line)
                continue
            if words[:2] in (["tcpgc", "ll"], ["tcpgc", "cc"]):
                kind = words[1] + (" --expose" if "--expose" in words else "")
                assert (host.name, kind) not in running, f"a second {kind} on {host.name}"
                node = running[host.name, kind] = host.spawn(line)
                node.wait_for(RE_LL_AGENT_PORT if kind == "ll" else RE_CC_JOINED, READY)
                if kind == "cc":
                    running[("outside", "ll")].wait_for(r"agent \S+ connected from", READY)
                if kind == "cc --expose":
                    running[("outside", "ll")].wait_for(r"port \d+ exposed by agent", READY)
                continue
            result = host.run(line)
            assert result.returncode == 0, (host.name, line, result.stdout, result.stderr)
            if words[:2] == ["tcpgc", "token"]:
                token = result.stdout.strip()
                assert re.fullmatch(r"tcpgc1\.\S+", token), result.stdout
                hosts["inside"].stdin.write_text(token + "\n")  # pasted on the inside
            if words[:3] == ["tcpgc", "agent", "add"]:
                agent_token = result.stdout.strip()
                assert re.fullmatch(r"tcpgc1\.\S+", agent_token), result.stdout
                assert agent_token != token, "an agent's token is its own"
                with hosts["inside"].stdin.open("a") as pasted:  # the next `read` takes it
                    pasted.write(agent_token + "\n")
            if words[0] == "curl" and "metrics" in line:
                assert "tcpgc_agents_connected 1.0" in result.stdout, result.stdout
        inside_cc = ("inside", "cc") in running
        if lines[0] == "# on the inside host" and inside_cc and client_block and not reran:
            run_client(client_block)  # "Then try it as in step 4."
            ran_client += 1
            reran = True

    assert token, "no 'tcpgc token' in the quick start"
    assert agent_token, "no 'tcpgc agent add' in the quick start"
    assert ran_client == 3, "step 4's client block twice, then the exposed port's"
    assert set(running) == {("outside", "ll"), ("inside", "cc"), ("inside", "cc --expose")}, running
