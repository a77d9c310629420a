"""
README.rst's client example, run as printed: bob's part and alice's part as
two programs on two real agents.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab.deployment import Deployment
from punchd import client

README = Path(__file__).resolve().parent.parent / "README.rst"
BOB = "# on bob's host\n"
ALICE = "# on alice's host\n"


def client_example() -> str:
    """
    The literal block after "``punchd.client`` needs only the standard
    library::", dedented.
    """
    text = README.read_text()
    start = text.index("``punchd.client`` needs only the standard library::\n")
    block = re.match(r"[^\n]*\n\n((?:    [^\n]*\n|\n)+)", text[start:])
    assert block is not None
    return textwrap.dedent(block.group(1))


def parts() -> tuple[str, str, str]:
    """
    What both hosts run first, bob's part, and alice's part.
    """
    example = client_example()
    common, rest = example.split(BOB)
    bob, alice = rest.split(ALICE)
    return common, bob, alice


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with Deployment(tmp_path_factory.mktemp("readme")) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.start_rendezvous()
        d.start_agent("alice")
        d.start_agent("bob")
        yield d


def run(d: Deployment, host: str, code: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PUNCHD_SOCKET=d.agents[host].socket_path)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_the_client_example_runs_as_printed(deployment: Deployment) -> None:
    common, bob_part, alice_part = parts()
    bob = run(deployment, "bob", common + bob_part)
    try:
        deadline = time.monotonic() + 15
        while deployment.status("bob")["listening"] != ["chat"]:
            assert bob.poll() is None, bob.communicate()
            assert time.monotonic() < deadline, "bob's part never listened"
            time.sleep(0.05)
        alice = run(deployment, "alice", common + alice_part)
        out, err = alice.communicate(timeout=30)
        assert alice.returncode == 0, err
        assert bob.wait(10) == 0, bob.stderr.read() if bob.stderr else ""
    finally:
        bob.kill()
        bob.communicate()
    path, remote, setup_ms = out.splitlines()[0].split()
    assert path == "direct"
    assert re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+", remote), remote
    assert float(setup_ms) > 0
    assert out.splitlines()[1:] == ["b'hi alice'"]


def test_the_example_receive_sends_keepalives_and_skips_them() -> None:
    """
    The example's receive(), with a short interval: quiet, it sends empty
    datagrams; given one, it waits on for real data.
    """
    namespace: dict[str, Any] = {}
    exec(parts()[0], namespace)
    ours, theirs = socket.socket(type=socket.SOCK_DGRAM), socket.socket(type=socket.SOCK_DGRAM)
    with ours, theirs:
        for s in ours, theirs:
            s.bind(("127.0.0.1", 0))
        ours.connect(theirs.getsockname())
        theirs.connect(ours.getsockname())
        theirs.settimeout(10)
        tunnel = client.Tunnel(ours, {})
        got: list[bytes] = []
        thread = threading.Thread(
            target=lambda: got.append(namespace["receive"](tunnel, 0.1)), daemon=True
        )
        thread.start()
        try:
            assert [theirs.recv(2048), theirs.recv(2048)] == [b"", b""]
            theirs.send(b"")
            theirs.send(b"data")
        finally:
            thread.join(10)
        assert got == [b"data"]
