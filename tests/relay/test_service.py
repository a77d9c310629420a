"""
Tests for L{punchd.relay.service.RelayService}: allocations, binds,
forwarding, limits and timers, driven datagram by datagram with a fake
clock and fake UDP ports.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

from punchd import stun
from punchd.relay import BIND_TIMEOUT, RelayRefused, RelayService, build_bind, parse_bind_answer
from punchd.relay.allocation import RelayPort
from punchd.relay.messages import BIND_TYPE
from punchd.relay.service import SWEEP_INTERVAL
from punchd.stun import Attr

Address = tuple[str, int]
KEYS = {name: os.urandom(32) for name in ("alice", "bob", "carol")}
ALICE = ("198.51.100.7", 40000)
BOB = ("203.0.113.9", 50000)
MALLORY = ("192.0.2.66", 6666)


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Address]] = []

    def write(self, data: bytes, addr: Address) -> None:
        self.written.append((data, addr))


class FakeListening:
    def __init__(self, ports: FakePorts, port: int) -> None:
        self._ports = ports
        self.port = port

    def stopListening(self) -> None:
        del self._ports.open[self.port]


class FakePorts:
    """
    Opens ports by attaching a fake transport; C{taken} ports are in use
    by someone else (EADDRINUSE).
    """

    def __init__(self) -> None:
        self.open: dict[int, RelayPort] = {}
        self.taken: set[int] = set()
        self.transports: dict[int, FakeTransport] = {}

    def __call__(self, port: int, protocol: DatagramProtocol) -> FakeListening:
        if port in self.taken or port in self.open:
            raise CannotListenError("", port, OSError(errno.EADDRINUSE, "in use"))
        assert isinstance(protocol, RelayPort)
        transport = FakeTransport()
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        self.open[port] = protocol
        self.transports[port] = transport
        return FakeListening(self, port)

    def deliver(self, port: int, data: bytes, source: Address) -> None:
        self.open[port].datagramReceived(data, source)

    def sent(self, port: int) -> list[tuple[bytes, Address]]:
        written = self.transports[port].written[:]
        self.transports[port].written.clear()
        return written


class Relay:
    def __init__(self, interface: str = "192.0.2.1", **settings: object) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.ports = FakePorts()
        self.service = RelayService(
            KEYS.get,
            clock=self.clock,
            interface=interface,
            open_port=self.ports,
            **settings,  # type: ignore[arg-type]
        )
        self.service.startService()
        self.counters = self.service.counters

    def bind(
        self, name: str, tunnel: bytes, port: int, source: Address, key: bytes | None = None
    ) -> tuple[bytes, list[tuple[bytes, Address]]]:
        _, request = build_bind(name, key or KEYS[name], tunnel)
        self.ports.deliver(port, request, source)
        return request, self.ports.sent(port)

    def bound_pair(self, tunnel: bytes = b"T" * 16) -> tuple[int, int]:
        a, b = self.service.allocate(tunnel, "alice", "bob")
        self.bind("alice", tunnel, a, ALICE)
        self.bind("bob", tunnel, b, BOB)
        return a, b


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay(ports=(40000, 40999))
    yield r
    r.service.stopService()


# -- allocation -------------------------------------------------------------------


def test_allocate_opens_two_ports_in_range_and_is_idempotent(relay: Relay) -> None:
    a, b = relay.service.allocate(b"1" * 16, "alice", "bob")
    assert a != b and 40000 <= a <= 40999 and 40000 <= b <= 40999
    assert sorted(relay.ports.open) == sorted([a, b])
    assert relay.service.allocate(b"1" * 16, "alice", "bob") == (a, b)
    assert relay.counters["allocations"] == 1 and relay.counters["allocations-active"] == 1


def test_a_tunnel_id_of_another_pair_is_rejected(relay: Relay) -> None:
    relay.service.allocate(b"1" * 16, "alice", "bob")
    with pytest.raises(RelayRefused) as refused:
        relay.service.allocate(b"1" * 16, "carol", "bob")
    assert refused.value.code == "rejected"


def test_release_frees_both_ports_and_is_idempotent(relay: Relay) -> None:
    relay.service.allocate(b"1" * 16, "alice", "bob")
    relay.service.release(b"1" * 16)
    relay.service.release(b"1" * 16)
    relay.service.release(b"never allocated!")
    assert relay.ports.open == {}
    assert relay.counters["allocations-active"] == 0 and relay.counters["freed-released"] == 1


def test_per_agent_quota_counts_either_side() -> None:
    relay = Relay(max_per_agent=2, ports=(40000, 40999))
    relay.service.allocate(b"1" * 16, "alice", "bob")
    relay.service.allocate(b"2" * 16, "carol", "alice")
    for pair in (("alice", "carol"), ("bob", "alice")):
        with pytest.raises(RelayRefused) as refused:
            relay.service.allocate(b"3" * 16, *pair)
        assert refused.value.code == "busy"
    assert relay.service.allocate(b"4" * 16, "bob", "carol")  # bob has one, carol one
    relay.service.release(b"1" * 16)
    assert relay.service.allocate(b"3" * 16, "alice", "bob")
    assert relay.counters["allocations-refused"] == 2


def test_port_range_exhausted_is_busy_and_leaks_nothing() -> None:
    relay = Relay(ports=(40000, 40004))
    relay.service.allocate(b"1" * 16, "alice", "bob")
    relay.service.allocate(b"2" * 16, "alice", "bob")
    with pytest.raises(RelayRefused) as refused:  # one port left: not enough
        relay.service.allocate(b"3" * 16, "alice", "bob")
    assert refused.value.code == "busy"
    assert len(relay.ports.open) == 4
    relay.service.release(b"1" * 16)
    assert relay.service.allocate(b"3" * 16, "alice", "bob")


def test_ports_in_use_elsewhere_are_skipped_and_a_full_system_refuses() -> None:
    relay = Relay(ports=(40000, 40009))
    relay.ports.taken = set(range(40000, 40008))
    assert sorted(relay.service.allocate(b"1" * 16, "alice", "bob")) == [40008, 40009]
    relay.service.release(b"1" * 16)
    relay.ports.taken = set(range(40000, 40009))
    with pytest.raises(RelayRefused):
        relay.service.allocate(b"2" * 16, "alice", "bob")
    assert relay.ports.open == {}


# -- binding ------------------------------------------------------------------------


def test_a_good_bind_is_answered_with_the_mapping_and_never_bigger(relay: Relay) -> None:
    tunnel = os.urandom(16)
    a, _ = relay.service.allocate(tunnel, "alice", "bob")
    request, sent = relay.bind("alice", tunnel, a, ALICE)
    assert len(sent) == 1
    answer, to = sent[0]
    assert to == ALICE and len(answer) <= len(request)
    assert parse_bind_answer(answer, KEYS["alice"]) == ALICE
    assert parse_bind_answer(answer, KEYS["bob"]) is None
    assert relay.counters["binds"] == 1


def test_a_retransmitted_bind_gets_the_same_answer(relay: Relay) -> None:
    tunnel = os.urandom(16)
    a, _ = relay.service.allocate(tunnel, "alice", "bob")
    request, first = relay.bind("alice", tunnel, a, ALICE)
    relay.ports.deliver(a, request, ALICE)
    assert relay.ports.sent(a) == first
    assert relay.counters["bind-retransmissions"] == 1


@pytest.mark.parametrize(
    ("name", "tunnel", "key", "reason"),
    [
        ("bob", None, None, "bind-wrong-name"),  # the other side's agent
        ("carol", None, None, "bind-wrong-name"),
        ("alice", b"X" * 16, None, "bind-wrong-tunnel"),
        ("alice", None, KEYS["carol"], "bind-unauthenticated"),
    ],
)
def test_bad_binds_are_dropped_silently(
    relay: Relay, name: str, tunnel: bytes | None, key: bytes | None, reason: str
) -> None:
    a, _b = relay.service.allocate(b"T" * 16, "alice", "bob")
    _, sent = relay.bind(name, tunnel or b"T" * 16, a, MALLORY, key)
    assert sent == [] and relay.counters[f"dropped-{reason}"] == 1
    assert relay.counters["binds"] == 0
    # Nothing bound: a later genuine bind still works.
    _, sent = relay.bind("alice", b"T" * 16, a, ALICE)
    assert len(sent) == 1


def test_an_unknown_agent_name_cannot_bind() -> None:
    relay = Relay(ports=(40000, 40999))
    a, _ = relay.service.allocate(b"T" * 16, "dave", "bob")  # dave: no key
    _, request = build_bind("dave", os.urandom(32), b"T" * 16)
    relay.ports.deliver(a, request, MALLORY)
    assert relay.ports.sent(a) == [] and relay.counters["dropped-bind-wrong-name"] == 1


def test_a_replayed_bind_from_elsewhere_does_not_rebind(relay: Relay) -> None:
    tunnel = b"T" * 16
    a, b = relay.service.allocate(tunnel, "alice", "bob")
    request, _ = relay.bind("alice", tunnel, a, ALICE)
    relay.bind("bob", tunnel, b, BOB)
    relay.ports.deliver(a, request, MALLORY)
    _, fresh = build_bind("alice", KEYS["alice"], tunnel)
    relay.ports.deliver(a, fresh, MALLORY)
    assert relay.ports.sent(a) == [] and relay.counters["dropped-rebind"] == 2
    relay.ports.deliver(b, b"to alice", BOB)
    assert relay.ports.sent(a) == [(b"to alice", ALICE)]


def test_an_authenticated_release_frees_the_allocation(relay: Relay) -> None:
    tunnel = b"T" * 16
    a, _b = relay.bound_pair(tunnel)
    _, release = build_bind("alice", KEYS["alice"], tunnel, release=True)
    relay.ports.deliver(a, release, MALLORY)  # only from the bound address
    assert relay.counters["dropped-rebind"] == 1 and a in relay.ports.open
    relay.ports.deliver(a, release, ALICE)
    answer, to = relay.ports.transports[a].written[-1]
    assert to == ALICE and len(answer) <= len(release)
    message = stun.parse(answer)
    assert message.get(Attr.LIFETIME) == stun.encode_u32(0)
    assert relay.ports.open == {} and relay.counters["freed-released-by-agent"] == 1
    assert relay.service.active() == 0


# -- forwarding ------------------------------------------------------------------------


def test_datagrams_cross_unchanged_both_ways(relay: Relay) -> None:
    a, b = relay.bound_pair()
    payloads = [b"", b"x", os.urandom(1400), BIND_TYPE + b"looks like a bind", b"\x00\x01" * 10]
    for data in payloads:
        relay.ports.deliver(a, data, ALICE)
        relay.ports.deliver(b, data[::-1], BOB)
    assert relay.ports.sent(b) == [(data, BOB) for data in payloads]
    assert relay.ports.sent(a) == [(data[::-1], ALICE) for data in payloads]
    assert relay.counters["forwarded"] == 2 * len(payloads)
    assert relay.counters["forwarded-bytes"] == 2 * sum(map(len, payloads))


def test_a_bind_from_the_other_side_is_forwarded_not_answered(relay: Relay) -> None:
    """
    From the bound address, only that side's own bind is the relay's; the
    rest is the program's, whatever it looks like.
    """
    tunnel = b"T" * 16
    a, b = relay.bound_pair(tunnel)
    _, carols = build_bind("carol", KEYS["carol"], tunnel)
    relay.ports.deliver(a, carols, ALICE)
    assert relay.ports.sent(b) == [(carols, BOB)] and relay.ports.sent(a) == []


def test_nothing_is_forwarded_before_both_sides_bound(relay: Relay) -> None:
    tunnel = b"T" * 16
    a, b = relay.service.allocate(tunnel, "alice", "bob")
    relay.ports.deliver(a, b"early", ALICE)
    assert relay.counters["dropped-unbound"] == 1
    relay.bind("alice", tunnel, a, ALICE)
    relay.ports.deliver(a, b"early", ALICE)
    relay.ports.deliver(b, b"early", BOB)
    assert relay.counters["dropped-peer-unbound"] == 1
    assert relay.counters["dropped-unbound"] == 2
    assert relay.ports.sent(a) == [] and relay.ports.sent(b) == []


def test_strangers_get_nothing_through_and_no_reply(relay: Relay) -> None:
    a, b = relay.bound_pair()
    for port in (a, b):
        for source in (MALLORY, (ALICE[0], ALICE[1] + 1), (BOB[0], BOB[1] + 1)):
            relay.ports.deliver(port, b"let me in", source)
    relay.ports.deliver(a, b"spoof", BOB)  # the other side's address, on the wrong port
    assert relay.ports.sent(a) == [] and relay.ports.sent(b) == []
    assert relay.counters["dropped-stranger"] == 7
    assert relay.counters["forwarded"] == 0


def test_datagrams_after_free_are_dropped(relay: Relay) -> None:
    tunnel = b"T" * 16
    a, _b = relay.bound_pair(tunnel)
    side = relay.ports.open[a]
    relay.service.release(tunnel)
    side.datagramReceived(b"late", ALICE)  # read in the reactor turn that freed it
    assert relay.counters["dropped-freed"] == 1 and relay.counters["forwarded"] == 0


# -- timers and limits -------------------------------------------------------------------


def test_idle_allocations_are_freed_and_traffic_keeps_them(relay: Relay) -> None:
    a, _b = relay.bound_pair()
    for _ in range(300):  # five minutes of a datagram a second
        relay.ports.deliver(a, b"ping", ALICE)
        relay.clock.advance(1.0)
    assert relay.service.active() == 1
    relay.clock.advance(120 - 2 * SWEEP_INTERVAL)
    assert relay.service.active() == 1
    relay.clock.advance(3 * SWEEP_INTERVAL)
    assert relay.service.active() == 0 and relay.counters["freed-idle"] == 1
    assert relay.ports.open == {}


def test_allocations_not_bound_by_both_time_out() -> None:
    relay = Relay(ports=(40000, 40999), idle_timeout=3600.0)
    tunnel = b"T" * 16
    a, _ = relay.service.allocate(tunnel, "alice", "bob")
    relay.service.allocate(b"U" * 16, "alice", "bob")
    relay.bind("alice", tunnel, a, ALICE)
    relay.clock.advance(BIND_TIMEOUT - SWEEP_INTERVAL)
    assert relay.service.active() == 2
    relay.clock.advance(2 * SWEEP_INTERVAL)
    assert relay.service.active() == 0 and relay.counters["freed-bind-timeout"] == 2


def test_the_rate_limit_drops_the_excess() -> None:
    relay = Relay(ports=(40000, 40999), rate=3000.0)
    a, b = relay.bound_pair()
    for _ in range(5):
        relay.ports.deliver(a, bytes(1000), ALICE)
    relay.ports.deliver(b, bytes(1000), BOB)  # both ways share the allocation's bucket
    assert len(relay.ports.sent(b)) == 3 and relay.ports.sent(a) == []
    assert relay.counters["dropped-rate"] == 3
    relay.clock.advance(1.0)
    for _ in range(4):
        relay.ports.deliver(b, bytes(1000), BOB)
    assert len(relay.ports.sent(a)) == 3


def test_stopping_frees_everything(relay: Relay) -> None:
    relay.bound_pair()
    relay.service.allocate(b"U" * 16, "alice", "carol")
    relay.service.stopService()
    assert relay.ports.open == {} and relay.counters["freed-stopped"] == 2


# -- address rules ------------------------------------------------------------------------

REFUSED_ALWAYS = [
    "0.0.0.0",
    "0.1.2.3",
    "255.255.255.255",
    "224.0.0.1",
    "239.255.255.250",
    "169.254.10.20",
    "240.0.0.1",
    "::",
    "::ffff:0.0.0.0",
    "::ffff:169.254.1.1",
    "::ffff:224.0.0.1",
    "::0.0.0.2",  # IPv4-compatible (::1 itself is loopback)
    "::c000:0201",
    "fe80::1",
    "ff02::1",
    "fec0::1",
]
LOOPBACK = ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"]


@pytest.mark.parametrize("host", REFUSED_ALWAYS + LOOPBACK)
def test_no_unsafe_address_can_bind_to_a_public_relay(relay: Relay, host: str) -> None:
    a, b = relay.service.allocate(b"T" * 16, "alice", "bob")
    _, sent = relay.bind("alice", b"T" * 16, a, (host, 4000))
    assert sent == [] and relay.counters["dropped-bind-address"] == 1
    relay.bind("bob", b"T" * 16, b, BOB)
    relay.ports.deliver(b, b"to nowhere", BOB)
    assert relay.ports.sent(a) == []


@pytest.mark.parametrize("host", REFUSED_ALWAYS)
def test_a_loopback_relay_still_refuses_the_rest(host: str) -> None:
    relay = Relay(interface="127.0.0.1", ports=(40000, 40999))
    a, _ = relay.service.allocate(b"T" * 16, "alice", "bob")
    _, sent = relay.bind("alice", b"T" * 16, a, (host, 4000))
    assert sent == [] and relay.counters["dropped-bind-address"] == 1


@pytest.mark.parametrize("interface", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_binds_only_to_a_loopback_relay(interface: str, host: str) -> None:
    relay = Relay(interface=interface, ports=(40000, 40999))
    a, _ = relay.service.allocate(b"T" * 16, "alice", "bob")
    _, sent = relay.bind("alice", b"T" * 16, a, (host, 4000))
    assert len(sent) == 1
    expected = host.removeprefix("::ffff:")
    assert parse_bind_answer(sent[0][0], KEYS["alice"]) == (expected, 4000)


def test_ipv4_mapped_sources_are_answered_as_ipv4_and_sent_to_as_received() -> None:
    relay = Relay(interface="::", ports=(40000, 40999))
    tunnel = b"T" * 16
    a, b = relay.service.allocate(tunnel, "alice", "bob")
    mapped = ("::ffff:198.51.100.7", 40000)
    _, sent = relay.bind("alice", tunnel, a, mapped)
    assert parse_bind_answer(sent[0][0], KEYS["alice"]) == ALICE and sent[0][1] == mapped
    relay.bind("bob", tunnel, b, BOB)
    relay.ports.deliver(b, b"hi", BOB)
    assert relay.ports.sent(a) == [(b"hi", mapped)]
