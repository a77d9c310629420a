"""
Tests for the forwarding fast path (L{punchd.relay.shortcut}): real UDP
sockets on loopback, a fake clock, and a fake reactor whose readers the
test runs by hand, so every datagram is read when the test says so.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import udp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from punchd.relay import RelayService, build_bind, parse_bind_answer
from punchd.relay import shortcut as shortcut_module
from punchd.relay.allocation import Allocation
from punchd.relay.service import SWEEP_INTERVAL
from punchd.relay.shortcut import Shortcut

KEYS = {name: os.urandom(32) for name in ("alice", "bob")}
TUNNEL = b"S" * 16
LOCAL = "127.0.0.1"


@implementer(IReactorFDSet)
class Reactor(Clock):
    """
    A clock that also listens on real UDP ports and keeps their readers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str, maxPacketSize: int
    ) -> udp.Port:
        listening = udp.Port(port, protocol, interface, maxPacketSize, self)
        listening.startListening()  # type: ignore[no-untyped-call]
        return listening

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def removeWriter(self, writer: Any) -> None:
        pass  # nothing here ever writes through the reactor

    def pump(self) -> None:
        """
        Read every socket until none has anything left (loopback delivers
        within the sending call).
        """
        for _ in range(3):
            for reader in list(self.readers):
                if reader in self.readers:
                    reader.doRead()


class Relay:
    def __init__(self, **settings: Any) -> None:
        self.reactor = Reactor()
        low = 20000 + os.getpid() % 20000
        self.service = RelayService(
            KEYS.get, clock=self.reactor, interface=LOCAL, ports=(low, low + 2000), **settings
        )
        self.service.startService()
        self.counters = self.service.counters
        self.a, self.b = self.service.allocate(TUNNEL, "alice", "bob")
        self.alice, self.bob = udp_socket(), udp_socket()

    @property
    def allocation(self) -> Allocation:
        return self.service._allocations[TUNNEL]

    def bind(self, sock: socket.socket, name: str, port: int) -> None:
        _, request = build_bind(name, KEYS[name], TUNNEL)
        sock.sendto(request, (LOCAL, port))
        self.reactor.pump()
        assert parse_bind_answer(sock.recv(2048), KEYS[name]) == sock.getsockname()

    def bound(self) -> Relay:
        self.bind(self.alice, "alice", self.a)
        self.bind(self.bob, "bob", self.b)
        return self

    def close(self) -> None:
        self.service.stopService()
        self.reactor.advance(0)  # the ports close their sockets
        self.alice.close()
        self.bob.close()


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 0))
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    got = []
    while True:
        try:
            got.append(sock.recvfrom(65535))
        except BlockingIOError:
            return got


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay()
    yield r
    r.close()


def shortcuts(relay: Relay) -> list[Shortcut]:
    return [s for s in relay.reactor.readers if isinstance(s, Shortcut)]


def test_bound_sides_forward_through_connected_sockets(relay: Relay) -> None:
    assert shortcuts(relay) == []  # not before both sides bound
    relay.bound()
    assert len(shortcuts(relay)) == 2
    payloads = [b"", b"x", os.urandom(1400), os.urandom(20)]
    for data in payloads:
        relay.alice.sendto(data, (LOCAL, relay.a))
        relay.bob.sendto(data[::-1], (LOCAL, relay.b))
    relay.reactor.pump()
    assert received(relay.bob) == [(data, (LOCAL, relay.b)) for data in payloads]
    assert received(relay.alice) == [(data[::-1], (LOCAL, relay.a)) for data in payloads]
    assert relay.counters["forwarded"] == 8
    assert relay.counters["forwarded-bytes"] == 2 * sum(map(len, payloads))
    assert relay.allocation.active


def test_strangers_still_reach_the_slow_path_and_get_nothing(relay: Relay) -> None:
    relay.bound()
    _, replay = build_bind("alice", KEYS["alice"], TUNNEL)
    with udp_socket() as stranger:
        for port in (relay.a, relay.b):
            stranger.sendto(b"let me in", (LOCAL, port))
        stranger.sendto(replay, (LOCAL, relay.a))
        relay.reactor.pump()
        assert received(stranger) == []
    assert received(relay.alice) == [] and received(relay.bob) == []
    assert relay.counters["dropped-stranger"] == 2 and relay.counters["dropped-rebind"] == 1
    assert relay.counters["forwarded"] == 0


def test_binds_from_the_bound_address_are_still_answered_and_released(relay: Relay) -> None:
    relay.bound()
    relay.bind(relay.alice, "alice", relay.a)  # a retransmission
    assert relay.counters["bind-retransmissions"] == 1 and received(relay.bob) == []
    _, release = build_bind("bob", KEYS["bob"], TUNNEL, release=True)
    relay.bob.sendto(release, (LOCAL, relay.b))
    relay.reactor.pump()
    assert parse_bind_answer(relay.bob.recv(2048), KEYS["bob"]) == relay.bob.getsockname()
    assert relay.counters["freed-released-by-agent"] == 1 and relay.reactor.readers == set()
    relay.alice.sendto(b"too late", (LOCAL, relay.a))
    relay.reactor.pump()
    assert received(relay.bob) == []


def test_the_rate_limit_holds_on_the_fast_path() -> None:
    relay = Relay(rate=3000.0).bound()
    try:
        for _ in range(5):
            relay.alice.sendto(bytes(1000), (LOCAL, relay.a))
        relay.reactor.pump()
        assert len(received(relay.bob)) == 3 and relay.counters["dropped-rate"] == 2
        relay.reactor.advance(1.0)
        relay.bob.sendto(bytes(1000), (LOCAL, relay.b))
        relay.reactor.pump()
        assert len(received(relay.alice)) == 1
    finally:
        relay.close()


def test_fast_path_traffic_keeps_the_allocation_and_silence_frees_it(relay: Relay) -> None:
    relay.bound()
    for _ in range(150):
        relay.alice.sendto(b"ping", (LOCAL, relay.a))
        relay.reactor.pump()
        relay.reactor.advance(1.0)
    assert relay.service.active() == 1 and len(received(relay.bob)) == 150
    sockets = [s.sock for s in shortcuts(relay)]
    relay.reactor.advance(120 + 2 * SWEEP_INTERVAL)
    assert relay.service.active() == 0 and relay.counters["freed-idle"] == 1
    assert relay.reactor.readers == set() and all(s.fileno() == -1 for s in sockets)


def test_an_unreachable_peer_is_counted_and_reading_goes_on(relay: Relay) -> None:
    relay.bound()
    relay.bob.close()  # ICMP port unreachable for what the relay sends bob
    for _ in range(3):
        relay.alice.sendto(b"anyone?", (LOCAL, relay.a))
        relay.reactor.pump()
    assert relay.counters[f"send-error-{errno.ECONNREFUSED}"] >= 1
    to_bob = next(s for s in shortcuts(relay) if s.port.side == 1)
    relay.reactor.removeReader(to_bob)  # as the reactor does on a socket error
    relay.alice.sendto(b"anyone?", (LOCAL, relay.a))
    relay.reactor.pump()
    to_bob.connectionLost(Failure(ConnectionDone()))
    assert to_bob in relay.reactor.readers


def test_without_the_fast_path_the_slow_path_forwards(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> socket.socket:
        raise OSError(errno.ENOPROTOOPT, "no SO_REUSEPORT")

    monkeypatch.setattr(shortcut_module, "connected_socket", refuse)
    relay.bound()
    assert shortcuts(relay) == [] and relay.counters["shortcut-unavailable"] == 1
    relay.alice.sendto(b"slowly", (LOCAL, relay.a))
    relay.reactor.pump()
    assert received(relay.bob) == [(b"slowly", (LOCAL, relay.b))]
    assert relay.counters["forwarded"] == 1
