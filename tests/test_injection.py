"""
A stranger floods every UDP port on this host while tunnels are set up: as a
local user can, reading the ports of the agents' tunnel sockets from
/proc/net/udp.  Nothing it sends may ever reach a program through its tunnel.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.deployment import Deployment
from punchd import client

MARK = b"INJECTED"
TUNNELS = 20
EXCHANGED = 30
#: Datagrams per port per round: more than a tunnel socket used to drain.
BURST = 300
FIRST = b"a>first"


def socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def bound_ports(table: str, pids: list[int]) -> set[int]:
    """
    The local ports of the processes' UDP sockets, from C{/proc/net/udp} or
    C{udp6}: what any local user can read.
    """
    inodes = socket_inodes(pids)
    ports = set()
    for line in Path(table).read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Flooder:
    """
    Sends junk to every UDP port of the agents on loopback (both families),
    over and over, until stopped; a bounded number of rounds at most.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.sent = 0
        self.ports: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flooder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4,
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6,
        ):
            v4.bind(("127.0.0.1", 0))
            v6.bind(("::1", 0))
            targets = ((v4, "127.0.0.1", "/proc/net/udp"), (v6, "::1", "/proc/net/udp6"))
            for _ in range(100_000):
                if self._stop.is_set():
                    return
                for sock, host, table in targets:
                    for port in bound_ports(table, self.pids):
                        self.ports.add(port)
                        for _ in range(BURST):
                            try:
                                sock.sendto(MARK, (host, port))
                                self.sent += 1
                            except OSError:
                                break
                time.sleep(0.002)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with Deployment(tmp_path_factory.mktemp("inject"), keepalive=2.0) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.start_rendezvous()
        d.start_agent("alice")
        d.start_agent("bob")
        yield d


def tunnel_pair(d: Deployment) -> tuple[client.Tunnel, client.Tunnel]:
    with client.listen("chat", socket_path=d.agents["bob"].socket_path) as listener:
        accepted: list[client.Tunnel] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=10)))
        thread.start()
        try:
            ours = client.connect("bob", "chat", socket_path=d.agents["alice"].socket_path)
            # At once, while bob's agent may still hold its end: the program's
            # first words make it hand off with the flood still arriving.
            ours.socket.send(FIRST)
        finally:
            thread.join(15)
    assert accepted, "bob's listener got no tunnel"
    return ours, accepted[0]


def received_all(sock: socket.socket, expected: list[bytes]) -> list[bytes]:
    """
    What C{sock} receives until every expected datagram arrived, plus anything
    left queued right after.
    """
    got: list[bytes] = []
    sock.settimeout(5)
    try:
        while not set(expected) <= set(got):
            got.append(sock.recv(2048))
    except TimeoutError:
        return got
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(2048))
    except BlockingIOError:
        pass
    return got


def test_a_flood_from_elsewhere_never_reaches_a_program(deployment: Deployment) -> None:
    pids = [a.process.pid for a in deployment.agents.values() if a.process is not None]
    injected: list[bytes] = []
    with Flooder(pids) as flood:
        for _ in range(TUNNELS):
            a, b = tunnel_pair(deployment)
            with a, b:
                to_b = [FIRST] + [b"a>%d" % i for i in range(EXCHANGED)]
                to_a = [b"b>%d" % i for i in range(EXCHANGED)]
                for data in to_b[1:]:
                    a.socket.send(data)
                for data in to_a:
                    b.socket.send(data)
                for sock, expected in ((b.socket, to_b), (a.socket, to_a)):
                    got = received_all(sock, expected)
                    injected += [g for g in got if g == MARK]
                    assert not injected, f"{len(injected)} injected datagrams reached a program"
                    assert [g for g in got if g != MARK] == expected
    # Two tunnel sockets per tunnel and side came and went under the flood.
    assert len(flood.ports) > TUNNELS, "the flood missed the tunnel sockets"
    assert injected == []
