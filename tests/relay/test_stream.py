"""
Tests for the relay's TLS stream sides (L{RelayService.stream_received}):
a Relayed frame is a datagram to the relay port it names from the stream's
address, a side bound by a stream gets its datagrams as frames, and a
stream's closing frees what it bound.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from punchd.relay import build_bind, parse_bind_answer
from tests.relay.test_service import BOB, KEYS, Address, Relay

TUNNEL = b"S" * 16


class FakeStream:
    """
    What the relay sees of an agent's TLS stream (L{StreamSide}).
    """

    def __init__(self, address: Address) -> None:
        self.address = address
        self.frames: list[tuple[int, bytes]] = []
        self.names: set[str] = set()
        self.backed_up = False

    def send_relayed(self, port: int, datagram: bytes) -> None:
        if self.backed_up:
            raise OSError(errno.ENOBUFS, "backed up")
        self.frames.append((port, datagram))

    def accepted(self, name: str) -> None:
        self.names.add(name)

    def take(self) -> list[tuple[int, bytes]]:
        frames, self.frames = self.frames, []
        return frames


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay(interface="127.0.0.1", ports=(40000, 40999))
    yield r
    r.service.stopService()


def stream_bind(relay: Relay, stream: FakeStream, port: int, name: str = "alice") -> bytes:
    """
    Bind C{port} as C{name} over C{stream}; the answer must come back on it.
    """
    _, request = build_bind(name, KEYS[name], TUNNEL)
    relay.service.stream_received(stream, port, request)
    ((answered_port, answer),) = stream.take()
    assert answered_port == port and len(answer) <= len(request)
    assert parse_bind_answer(answer, KEYS[name]) == stream.address
    return request


def test_a_stream_side_and_a_udp_side_relay_both_ways(relay: Relay) -> None:
    a, b = relay.service.allocate(TUNNEL, "alice", "bob")
    stream = FakeStream(("127.0.0.1", 33000))
    stream_bind(relay, stream, a)
    assert stream.names == {"alice"}
    relay.bind("bob", TUNNEL, b, BOB)
    relay.service.stream_received(stream, a, b"to bob")
    assert relay.ports.sent(b) == [(b"to bob", BOB)]
    relay.ports.deliver(b, b"to alice", BOB)
    assert stream.take() == [(a, b"to alice")]
    assert relay.ports.sent(a) == []  # nothing over UDP to the stream's address
    assert relay.counters["forwarded"] == 2 and relay.counters["binds"] == 2
    # A retransmitted bind over the stream gets its answer there again.
    stream_bind(relay, stream, a)
    assert relay.counters["bind-retransmissions"] == 1


def test_two_stream_sides_relay_to_each_other(relay: Relay) -> None:
    a, b = relay.service.allocate(TUNNEL, "alice", "bob")
    alice, bob = FakeStream(("127.0.0.1", 33000)), FakeStream(("127.0.0.1", 33001))
    stream_bind(relay, alice, a)
    stream_bind(relay, bob, b, "bob")
    relay.service.stream_received(alice, a, b"hi bob")
    relay.service.stream_received(bob, b, b"hi alice")
    assert bob.take() == [(b, b"hi bob")] and alice.take() == [(a, b"hi alice")]


def test_frames_not_for_a_side_the_stream_bound_are_dropped(relay: Relay) -> None:
    a, b = relay.service.allocate(TUNNEL, "alice", "bob")
    stream = FakeStream(("127.0.0.1", 33000))
    other = FakeStream(("127.0.0.1", 33001))
    relay.service.stream_received(stream, 41234, b"x")  # outside the relay's range
    assert relay.counters["dropped-stream-no-port"] == 1
    relay.service.stream_received(stream, a, b"before binding")
    assert relay.counters["dropped-unbound"] == 1
    request = stream_bind(relay, stream, a)
    relay.bind("bob", TUNNEL, b, BOB)
    relay.service.stream_received(stream, b, b"into bob's side")
    relay.service.stream_received(other, a, b"into alice's side")
    assert relay.counters["dropped-stranger"] == 2
    relay.service.stream_received(other, a, request)  # a replayed bind
    assert relay.counters["dropped-rebind"] == 1 and other.take() == []
    # A UDP datagram from the stream's very address is not the stream.
    relay.ports.deliver(a, b"spoofed", stream.address)
    assert relay.ports.sent(b) == [] and relay.counters["dropped-stranger"] == 3
    assert relay.counters["forwarded"] == 0


def test_a_closed_stream_frees_what_it_bound(relay: Relay) -> None:
    a, b = relay.service.allocate(TUNNEL, "alice", "bob")
    _c, _d = relay.service.allocate(b"U" * 16, "carol", "bob")
    stream = FakeStream(("127.0.0.1", 33000))
    stream_bind(relay, stream, a)
    relay.service.stream_closed(stream)
    assert relay.counters["freed-stream-closed"] == 1
    assert relay.service.active() == 1
    assert a not in relay.ports.open and b not in relay.ports.open
    relay.service.stream_received(stream, a, b"late")
    assert relay.counters["dropped-stream-no-port"] == 1
    relay.service.stream_closed(stream)  # twice is harmless
    assert relay.service.active() == 1


def test_a_released_tunnel_is_forgotten_by_its_stream(relay: Relay) -> None:
    a, _b = relay.service.allocate(TUNNEL, "alice", "bob")
    stream = FakeStream(("127.0.0.1", 33000))
    stream_bind(relay, stream, a)
    _, release = build_bind("alice", KEYS["alice"], TUNNEL, release=True)
    relay.service.stream_received(stream, a, release)
    assert relay.counters["freed-released-by-agent"] == 1
    assert relay.service._streams == {}


def test_datagrams_to_a_backed_up_stream_are_dropped_and_counted(relay: Relay) -> None:
    a, b = relay.service.allocate(TUNNEL, "alice", "bob")
    stream = FakeStream(("127.0.0.1", 33000))
    stream_bind(relay, stream, a)
    relay.bind("bob", TUNNEL, b, BOB)
    stream.backed_up = True
    relay.ports.deliver(b, b"dropped", BOB)
    stream.backed_up = False
    relay.ports.deliver(b, b"delivered", BOB)
    assert stream.take() == [(a, b"delivered")]
    assert relay.counters[f"send-error-{errno.ENOBUFS}"] == 1
    assert relay.counters["forwarded"] == 1


def test_a_stream_from_a_forbidden_address_cannot_bind() -> None:
    r = Relay(interface="192.0.2.1", ports=(40000, 40999))
    a, _ = r.service.allocate(TUNNEL, "alice", "bob")
    stream = FakeStream(("127.0.0.1", 33000))  # loopback, on a relay that is not
    _, request = build_bind("alice", KEYS["alice"], TUNNEL)
    r.service.stream_received(stream, a, request)
    assert stream.take() == [] and r.counters["dropped-bind-address"] == 1
    r.service.stopService()
