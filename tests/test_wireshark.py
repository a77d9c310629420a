"""
Wireshark decodes every datagram of a tunnel's set-up as STUN.

A rendezvous and two agents run as real twistd processes in a network
namespace of the test's own, with only C{lo} in it, so that the capture holds
this test's datagrams and nobody else's (the agents' tunnel sockets get
ephemeral ports no capture filter could name in advance).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from netlab.deployment import Deployment
from punchd import client
from punchd.stun import Method

IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, why: str) -> None:
    """
    Skip without C{condition}, except under CI, where it must hold.
    """
    if not condition:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: install tshark and run as root)")
        pytest.skip(why)


@pytest.fixture
def namespace() -> Iterator[str]:
    need(shutil.which("tshark") is not None, "tshark is not installed")
    need(os.geteuid() == 0, "capturing and namespaces need root")
    name = f"pdws{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def inside(namespace: str) -> Callable[..., subprocess.Popen[bytes]]:
    def launch(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **kwargs)

    return launch


def poll(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Capture:
    """
    dumpcap on the namespace's C{lo}, UDP only, into a pcapng file.
    """

    def __init__(self, namespace: str, path: Path) -> None:
        self.path = path
        self.log = path.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *("ip", "netns", "exec", namespace),
                    "dumpcap",
                    "-i",
                    "lo",
                    "-f",
                    "udp",
                    "-w",
                    str(path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        poll(lambda: b"Capturing on" in self.log.read_bytes(), "dumpcap to start")

    def settle(self, done: Callable[[list[list[str]]], bool]) -> list[list[str]]:
        """
        The frames once C{done} holds and no more arrive: dumpcap hands
        packets over in blocks, so what has been sent is not yet on disk.
        """
        frames: list[list[str]] = []

        def settled() -> bool:
            nonlocal frames
            before, frames = frames, self.decoded()
            return done(frames) and frames == before

        deadline = time.monotonic() + 30
        while not settled() and time.monotonic() < deadline:
            time.sleep(1.0)  # the checks below say what is missing
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)
        return frames

    def decoded(self) -> list[list[str]]:
        """
        Per datagram: frame number, protocol stack, STUN message type, malformed flag.
        """
        fields = ["frame.number", "frame.protocols", "stun.type", "_ws.malformed"]
        shown = subprocess.run(
            ["tshark", "-r", str(self.path), "-T", "fields", "-E", "separator=/t"]
            + [arg for f in fields for arg in ("-e", f)],
            capture_output=True,
            text=True,
            check=True,
        )
        return [line.split("\t") for line in shown.stdout.splitlines()]


def set_up_and_tear_down(d: Deployment, launch: Callable[..., subprocess.Popen[bytes]]) -> None:
    """
    Registration, a peers list, one tunnel handed off to both sides, sign-off.
    """
    d.add_agent("alice")
    d.add_agent("bob")
    d.start_rendezvous(launch=launch)
    d.start_agent("alice", launch=launch)
    d.start_agent("bob", launch=launch)
    alice = d.agents["alice"].socket_path
    assert [p["name"] for p in client.peers(socket_path=alice)] == ["bob"]
    with client.listen("chat", socket_path=d.agents["bob"].socket_path) as listener:
        accepted: list[client.Tunnel] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=20)))
        thread.start()
        try:
            ours = client.connect("bob", "chat", socket_path=alice, timeout=20)
        finally:
            thread.join(25)
    assert accepted, "bob's listener got no tunnel"
    ours.close()
    accepted[0].close()
    d.stop_agent("alice")
    d.stop_agent("bob")


def methods(frames: list[list[str]]) -> set[int]:
    """
    The STUN methods seen: the message type without its class bits.
    """
    types = [int(f[2], 16) for f in frames if len(f) > 2 and f[2]]
    return {(t & 0x000F) | (t & 0x00E0) >> 1 | (t & 0x3E00) >> 2 for t in types}


EXPECTED = {Method.BINDING, Method.REGISTER, Method.PEERS, Method.CONNECT}
EXPECTED |= {Method.INCOMING, Method.CONFIRM}


def test_every_datagram_of_a_tunnel_set_up_decodes_as_stun(namespace: str, tmp_path: Path) -> None:
    capture = Capture(namespace, tmp_path / "setup.pcapng")
    with Deployment(tmp_path / "run", keepalive=1.0) as d:
        set_up_and_tear_down(d, inside(namespace))
    frames = capture.settle(lambda frames: EXPECTED <= methods(frames))
    not_stun = [f for f in frames if "stun" not in f[1].split(":")]
    assert not not_stun, f"not decoded as STUN: {not_stun}"
    malformed = [f for f in frames if "malformed" in f[1] or (len(f) > 3 and f[3])]
    assert not malformed, f"malformed: {malformed}"
    assert EXPECTED <= methods(frames), sorted(hex(m) for m in methods(frames))
    assert len(frames) >= 20, frames
