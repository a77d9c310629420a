"""
A real relay process on loopback with real UDP sockets: two agents' sockets
bind, a thousand datagrams cross each way unchanged and in order, and a
third socket gets nothing through and no reply.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from netlab.deployment import free_udp_port
from punchd.relay import build_bind, parse_bind_answer

KEYS = {"alice": os.urandom(32), "bob": os.urandom(32)}
TUNNEL = os.urandom(16)
DEADLINE = 30.0


@dataclass
class LiveRelay:
    process: subprocess.Popen[str]
    ports: tuple[int, int]

    def counters(self) -> dict[str, int]:
        assert self.process.stdout is not None
        self.process.terminate()
        self.process.wait(DEADLINE)
        out = self.process.stdout.read()
        result: dict[str, int] = json.loads(out.splitlines()[-1])["counters"]
        return result


@pytest.fixture
def relay() -> Iterator[LiveRelay]:
    low = free_udp_port()
    settings = {
        "interface": "127.0.0.1",
        "ports": f"{min(low, 64000)}-{min(low, 64000) + 1000}",
        "keys": {name: key.hex() for name, key in KEYS.items()},
        "tunnels": [[TUNNEL.hex(), "alice", "bob"]],
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.relay.standalone"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(settings) + "\n")
        process.stdin.close()
        ports = json.loads(process.stdout.readline())["allocations"][0]
        yield LiveRelay(process, (ports[0], ports[1]))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(DEADLINE)
    return sock


def bind(sock: socket.socket, name: str, port: int) -> bytes:
    """
    Bind C{sock} as C{name}'s side, retransmitting like an agent; the
    request sent, once answered with C{sock}'s own address.
    """
    _, request = build_bind(name, KEYS[name], TUNNEL)
    sock.settimeout(0.2)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        sock.sendto(request, ("127.0.0.1", port))
        try:
            answer = sock.recv(2048)
        except TimeoutError:
            continue
        assert len(answer) <= len(request)
        assert parse_bind_answer(answer, KEYS[name]) == sock.getsockname()
        sock.settimeout(DEADLINE)
        return request
    raise AssertionError(f"no bind answer for {name}")


def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65535) for _ in range(count)]


def quiet(sock: socket.socket, seconds: float = 0.5) -> list[Any]:
    """
    Whatever arrives on C{sock} within C{seconds}.
    """
    sock.settimeout(seconds)
    got = []
    try:
        while True:
            got.append(sock.recvfrom(65535))
    except TimeoutError:
        pass
    sock.settimeout(DEADLINE)
    return got


def test_a_thousand_datagrams_each_way_cross_unchanged_and_in_order(relay: LiveRelay) -> None:
    pa, pb = relay.ports
    with udp() as a, udp() as b, udp() as stranger:
        a_bind = bind(a, "alice", pa)
        bind(b, "bob", pb)
        to_b = [b"a%04d" % i + os.urandom(i % 200) for i in range(1000)]
        to_a = [b"b%04d" % i + os.urandom(i % 300) for i in range(1000)]
        got_b: list[bytes] = []
        got_a: list[bytes] = []
        for start in range(0, 1000, 50):  # paced: loopback buffers are small
            for i in range(start, start + 50):
                a.sendto(to_b[i], ("127.0.0.1", pa))
                b.sendto(to_a[i], ("127.0.0.1", pb))
            got_b += receive(b, 50)
            got_a += receive(a, 50)
        assert got_b == to_b and got_a == to_a

        # A stranger: datagrams and a replayed bind to both ports.
        for port in (pa, pb):
            stranger.sendto(b"let me in", ("127.0.0.1", port))
            stranger.sendto(a_bind, ("127.0.0.1", port))
        assert quiet(stranger) == []
        a.sendto(b"still alice's", ("127.0.0.1", pa))
        assert b.recv(2048) == b"still alice's"
        assert quiet(a) == [] and quiet(b, 0.1) == []
    counters = relay.counters()
    assert counters["forwarded"] == 2001
    assert counters["dropped-stranger"] == 2 and counters["dropped-rebind"] == 1
    assert counters["dropped-bind-wrong-name"] == 1  # alice's bind on bob's port
    assert counters["binds"] == 2
