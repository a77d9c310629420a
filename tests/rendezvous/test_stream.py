"""
Tests for L{punchd.rendezvous.stream}: agents' TLS streams as the rendezvous
sees them (the TLS layer itself is Twisted's, and left out here), driven
byte by byte with a fake clock and L{StringTransport}.
"""

from __future__ import annotations

import errno

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from punchd import stun
from punchd.framing import Deframer, Relayed, Signalling, parse_frame, relayed_frame, stun_frame
from punchd.rendezvous.stream import (
    CONNECT_RATE,
    MAX_BACKLOG,
    MAX_SIGNALLING,
    StreamFactory,
    StreamLimits,
    StreamProtocol,
    source_key,
)
from punchd.stun import Attr, MessageClass, Method
from tests.rendezvous.test_server import Address, Agent, Harness, binding_request, error_code

ALICE = ("198.51.100.7", 40000)
BOB_UDP = ("203.0.113.9", 50000)
LIMITS = StreamLimits(
    auth_timeout=10.0, idle_timeout=120.0, max_per_source=2, max_connections=4, max_strangers=4
)


def tcp(address: Address) -> IPv4Address | IPv6Address:
    if ":" in address[0]:
        return IPv6Address("TCP", *address)
    return IPv4Address("TCP", *address)


class Connection:
    """
    One stream from C{address}, connected, with the peer's side of it.
    """

    def __init__(self, streams: StreamFactory, address: Address = ALICE) -> None:
        stream = streams.buildProtocol(tcp(address))
        assert stream is not None
        self.stream: StreamProtocol = stream
        self.transport = StringTransport(peerAddress=tcp(address))
        stream.makeConnection(self.transport)
        self._deframer = Deframer()

    def send(self, data: bytes) -> None:
        self.stream.dataReceived(data)

    def frames(self) -> list[Signalling | Relayed]:
        data = self.transport.value()
        self.transport.clear()
        return [parse_frame(p) for p in self._deframer.feed(data)]

    def messages(self) -> list[stun.Message]:
        found = []
        for frame in self.frames():
            assert isinstance(frame, Signalling)
            found.append(stun.parse(frame.message))
        return found

    def ask(self, agent: Agent, method: int, attributes: list[tuple[int, bytes]]) -> stun.Message:
        tid, request = agent.request(method, attributes)
        self.send(stun_frame(request))
        (answer,) = self.messages()
        assert answer.transaction_id == tid and stun.verify_integrity_sha256(answer, agent.key)
        return answer

    def register(self, agent: Agent) -> stun.Message:
        attributes = [(Attr.LIFETIME, stun.encode_u32(60))]
        answer = self.ask(agent, Method.REGISTER, attributes)
        if answer.cls == MessageClass.ERROR and error_code(answer) == 438:
            agent.nonce = answer.get(Attr.NONCE)
            answer = self.ask(agent, Method.REGISTER, attributes)
        assert answer.cls == MessageClass.SUCCESS
        return answer

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.stream.connectionLost(Failure(ConnectionError("gone")))


def setup(agents: list[Agent], limits: StreamLimits = LIMITS) -> tuple[Harness, StreamFactory]:
    h = Harness(agents)
    return h, StreamFactory(h.protocol, h.clock, limits)


# -- frames as datagrams -------------------------------------------------------


def test_a_binding_over_the_stream_is_answered_on_it_with_the_tcp_address() -> None:
    h, streams = setup([])
    c = Connection(streams)
    request = binding_request()
    c.send(stun_frame(request))
    (answer,) = c.messages()
    assert (answer.method, answer.cls) == (Method.BINDING, MessageClass.SUCCESS)
    xor = answer.get(Attr.XOR_MAPPED_ADDRESS)
    assert xor is not None and stun.decode_xor_address(xor, answer.transaction_id) == ALICE
    assert h.transport.take() == []  # nothing went out over UDP


def test_an_agent_registers_and_lists_peers_over_the_stream() -> None:
    alice, bob = Agent("alice", ALICE), Agent("bob", BOB_UDP)
    h, streams = setup([alice, bob])
    h.register(bob)
    c = Connection(streams)
    answer = c.register(alice)
    xor = answer.get(Attr.XOR_MAPPED_ADDRESS)
    assert xor is not None and stun.decode_xor_address(xor, answer.transaction_id) == ALICE
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.address == ALICE
    peers = c.ask(alice, Method.PEERS, [])
    assert [v.decode() for v in peers.get_all(Attr.PEER)] == ["bob"]
    assert h.transport.take() == []
    assert c.stream.authenticated and c.stream.names == {"alice"}


def test_an_introduction_reaches_an_agent_registered_over_the_stream() -> None:
    """
    bob (UDP) asks for alice (TLS): the Incoming goes on alice's stream.
    """
    alice, bob = Agent("alice", ALICE), Agent("bob", BOB_UDP)
    h, streams = setup([alice, bob])
    c = Connection(streams)
    c.register(alice)
    h.register(bob)
    _tid, connect = bob.request(
        Method.CONNECT,
        [
            (Attr.PEER, b"alice"),
            (Attr.SERVICE, b"ssh"),
            (Attr.TUNNEL_ID, b"T" * 16),
        ],
    )
    assert h.receive(connect, BOB_UDP) == []
    (incoming,) = c.messages()
    assert (incoming.method, incoming.cls) == (Method.INCOMING, MessageClass.REQUEST)
    assert stun.verify_integrity_sha256(incoming, alice.key)


def test_a_forged_request_does_not_authenticate_the_stream() -> None:
    alice = Agent("alice", ALICE)
    h, streams = setup([alice])
    c = Connection(streams)
    _, forged = alice.request(Method.REGISTER, key=b"k" * 32)
    c.send(stun_frame(forged))
    assert [error_code(m) for m in c.messages()] == [401]
    assert not c.stream.authenticated
    assert h.protocol.counters["refused-bad-signature"] == 1
    # A valid signature without a valid nonce (a replay, or the first try)
    # is not an accepted request either.
    _, replayed = alice.request(Method.REGISTER)
    c.send(stun_frame(replayed))
    assert [error_code(m) for m in c.messages()] == [438]
    assert not c.stream.authenticated


# -- framing -------------------------------------------------------------------


def test_frames_cut_anywhere_are_put_back_together() -> None:
    _h, streams = setup([])
    c = Connection(streams)
    data = stun_frame(binding_request()) + stun_frame(binding_request())
    for i in range(len(data)):
        c.send(data[i : i + 1])
    assert len(c.messages()) == 2
    assert c.stream._deframer.pending == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00",  # an empty frame
        b"\x00\x03\x80\x00\x01",  # an unknown frame type
        b"\x00\x02\x40\x00",  # a relayed frame without its port
        b"\x00\x03\x40\x00\x00",  # a relayed frame for port 0
        b"\x00\x1bGET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not ours at all
    ],
)
def test_what_is_not_a_frame_closes_the_connection(garbage: bytes) -> None:
    h, streams = setup([])
    c = Connection(streams)
    c.send(stun_frame(binding_request()) + garbage + stun_frame(binding_request()))
    assert c.closed
    assert len(c.messages()) <= 1  # nothing after the garbage is read
    assert h.protocol.counters["tls-closed-frame-error"] == 1


def test_an_oversized_stun_frame_is_dropped_and_counted() -> None:
    h, streams = setup([])
    c = Connection(streams)
    request = stun.build(
        Method.BINDING,
        MessageClass.REQUEST,
        stun.new_transaction_id(),
        [(Attr.SOFTWARE, b"x" * MAX_SIGNALLING)],
    )
    c.send(stun_frame(request))
    assert c.messages() == [] and not c.closed
    assert h.protocol.counters["tls-dropped-oversize"] == 1


def test_a_relayed_frame_without_a_relay_is_dropped_and_counted() -> None:
    h, streams = setup([])
    c = Connection(streams)
    c.send(relayed_frame(50000, b"data"))
    assert c.frames() == [] and not c.closed
    assert h.protocol.counters["tls-dropped-no-relay"] == 1


# -- deadlines -----------------------------------------------------------------


def test_a_connection_without_an_accepted_request_in_time_is_dropped() -> None:
    h, streams = setup([])
    c = Connection(streams)
    h.clock.advance(LIMITS.auth_timeout - 1)
    c.send(stun_frame(binding_request()))  # anonymous: not an agent's request
    assert not c.closed
    h.clock.advance(1)
    assert c.closed
    c.lose()  # what the transport says next
    assert h.protocol.counters["tls-closed-auth-timeout"] == 1
    assert h.protocol.counters["tls-closed-peer"] == 0  # one reason per connection
    assert h.protocol.streams_open() == 0


def test_a_slow_handshake_or_a_partial_frame_meets_the_same_deadline() -> None:
    h, streams = setup([])
    c = Connection(streams)
    c.send(b"\x00\x40\x00\x01")  # a frame that never completes
    h.clock.advance(LIMITS.auth_timeout)
    assert c.closed


def test_an_accepted_agent_is_kept_while_it_sends_and_closed_when_idle() -> None:
    alice = Agent("alice", ALICE)
    h, streams = setup([alice])
    c = Connection(streams)
    c.register(alice)
    h.clock.advance(LIMITS.auth_timeout + 1)
    assert not c.closed
    for _ in range(5):
        h.clock.advance(LIMITS.idle_timeout - 20)
        c.register(alice)  # a keepalive
        assert not c.closed
    c.send(b"\x00\x40\x00")  # trickled bytes are not frames
    h.clock.advance(LIMITS.idle_timeout - 1)
    assert not c.closed
    h.clock.advance(1)
    assert c.closed
    assert h.protocol.counters["tls-closed-idle"] == 1


# -- caps ----------------------------------------------------------------------


def test_connections_per_source_are_capped() -> None:
    h, streams = setup([])
    first = Connection(streams, ("198.51.100.7", 1))
    Connection(streams, ("198.51.100.7", 2))
    assert streams.buildProtocol(tcp(("198.51.100.7", 3))) is None
    assert h.protocol.counters["tls-refused-per-source"] == 1
    Connection(streams, ("198.51.100.8", 1))  # another source
    first.lose()
    Connection(streams, ("198.51.100.7", 4))


def test_an_ipv6_source_is_its_slash_64() -> None:
    assert source_key("2001:db8:1:2::7") == source_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::"
    assert source_key("2001:db8:1:3::7") != source_key("2001:db8:1:2::7")
    assert source_key("::ffff:198.51.100.7") == "198.51.100.7"
    _h, streams = setup([])
    Connection(streams, ("2001:db8:1:2::7", 1))
    Connection(streams, ("2001:db8:1:2::8", 1))
    assert streams.buildProtocol(tcp(("2001:db8:1:2::9", 1))) is None


def test_connections_in_all_are_capped() -> None:
    h, streams = setup([])
    for i in range(LIMITS.max_connections):
        Connection(streams, (f"198.51.100.{i}", 1))
    assert streams.buildProtocol(tcp(("192.0.2.1", 1))) is None
    assert h.protocol.counters["tls-refused-full"] == 1
    assert h.protocol.streams_open() == LIMITS.max_connections


# -- closing and backpressure --------------------------------------------------


def test_a_closed_stream_takes_its_agent_offline_and_its_address_back_to_udp() -> None:
    alice = Agent("alice", ALICE)
    h, streams = setup([alice])
    c = Connection(streams)
    c.register(alice)
    c.lose()
    assert h.registry.lookup("alice", h.clock.seconds()) is None
    assert h.protocol.counters["tls-signed-off"] == 1
    assert h.protocol.counters["tls-closed-peer"] == 1
    assert h.protocol.streams_open() == 0
    h.protocol.send(b"\x00\x01 to udp", ALICE)
    assert h.transport.take() == [(b"\x00\x01 to udp", ALICE)]
    assert c.transport.value() == b""


def test_a_backed_up_stream_refuses_relayed_datagrams_and_is_not_read() -> None:
    h, streams = setup([])
    c = Connection(streams)
    c.stream.send_relayed(50000, b"one")
    c.stream.pauseProducing()  # what the TLS transport does when its buffer is full
    assert c.transport.producerState == "paused"
    with pytest.raises(OSError) as raised:
        c.stream.send_relayed(50000, b"two")
    assert raised.value.errno == errno.ENOBUFS
    c.stream.send_signalling(binding_request())  # an answer is not dropped
    c.stream.resumeProducing()
    assert c.transport.producerState == "producing"
    c.stream.send_relayed(50000, b"three")
    frames = c.frames()
    assert [f.datagram for f in frames if isinstance(f, Relayed)] == [b"one", b"three"]
    assert h.protocol.counters["tls-backed-up"] == 1


def test_strangers_make_room_oldest_first_and_agents_are_not_crowded_out() -> None:
    alice = Agent("alice", ALICE)
    limits = StreamLimits(max_per_source=8, max_connections=16, max_strangers=2)
    h, streams = setup([alice], limits)
    agent = Connection(streams)
    agent.register(alice)
    first = Connection(streams, ("192.0.2.1", 1))
    second = Connection(streams, ("192.0.2.2", 1))
    third = Connection(streams, ("192.0.2.3", 1))
    assert first.closed and not second.closed and not third.closed
    assert not agent.closed
    assert h.protocol.counters["tls-closed-crowded-out"] == 1


def test_new_connections_from_one_source_are_rate_limited() -> None:
    limits = StreamLimits(max_per_source=100, max_connections=100, max_strangers=100)
    h, streams = setup([], limits)
    accepted = 0
    for i in range(20):
        if streams.buildProtocol(tcp(("192.0.2.1", 1000 + i))) is not None:
            accepted += 1
    assert accepted == int(2 * CONNECT_RATE)  # a burst, then the rate
    assert h.protocol.counters["tls-refused-rate"] == 20 - accepted
    assert streams.buildProtocol(tcp(("192.0.2.2", 1))) is not None  # another source
    h.clock.advance(1.0)
    assert streams.buildProtocol(tcp(("192.0.2.1", 2000))) is not None


def test_a_backed_up_stream_is_closed_when_too_much_waits_for_it() -> None:
    h, streams = setup([])
    c = Connection(streams)
    c.stream.pauseProducing()
    message = binding_request()
    for _ in range(MAX_BACKLOG // (len(message) + 2)):
        c.stream.send_signalling(message)
    assert not c.closed
    c.stream.send_signalling(message)
    assert c.closed and h.protocol.counters["tls-closed-backed-up"] == 1


def test_a_udp_request_from_a_streams_address_does_not_authenticate_it() -> None:
    alice = Agent("alice", ALICE)
    h, streams = setup([alice])
    c = Connection(streams)  # from the very address alice's UDP comes from
    lifetime = [(Attr.LIFETIME, stun.encode_u32(60))]
    _tid, request = alice.request(Method.REGISTER, lifetime)
    h.receive(request, ALICE)  # over UDP; the 438 goes to the address, on the stream
    (stale,) = c.messages()
    alice.nonce = stale.get(Attr.NONCE)
    _tid, request = alice.request(Method.REGISTER, lifetime)
    h.receive(request, ALICE)
    assert h.registry.lookup("alice", h.clock.seconds()) is not None  # admitted
    assert not c.stream.authenticated and c.stream.names == set()
