"""
Tests for L{punchd.rendezvous.server.RendezvousProtocol}, driven datagram by
datagram with a fake clock and a fake UDP transport.

Agent requests are built the way L{punchd.agent.rendezvous_client} builds
them (USERNAME, SEQUENCE, NONCE, MESSAGE-INTEGRITY-SHA256 under the derived
key, FINGERPRINT), so these tests pin the wire contract, not just the code.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pytest
from twisted.internet.task import Clock

from punchd import stun, wire
from punchd.agent.rendezvous_client import CONNECT_BACKOFF
from punchd.config import PeerEntry
from punchd.gather import build_gather_request, parse_gather_answer
from punchd.keys import PrivateKey, PublicKey, derive_rendezvous_key
from punchd.relay import RelayRefused
from punchd.rendezvous.answers import RECENT_ANSWER_SECONDS
from punchd.rendezvous.auth import BAD_SEQUENCE, NONCE_BUCKET, NONCE_BUCKETS_VALID, SEQUENCE_AHEAD
from punchd.rendezvous.gathering import GATHER_BURST, GATHER_RATE
from punchd.rendezvous.introductions import INCOMING_BACKOFF
from punchd.rendezvous.limits import SourceLimiter
from punchd.rendezvous.registry import MemoryRegistry
from punchd.rendezvous.server import MIN_LIFETIME, Directory, RendezvousProtocol
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind

SERVER_KEY = PrivateKey.generate()
#: Whole seconds, so that the binary fractions the tests advance by stay exact.
START = 1_700_000_000.0
ERROR_RATE = 5.0
ERROR_BURST = 10.0

Address = tuple[str, int]
Sent = list[tuple[bytes, Address]]
Attributes = Sequence[tuple[int, bytes]] | Callable[[bytes], Sequence[tuple[int, bytes]]]


class FakeDatagramTransport:
    """
    Records what the protocol writes; Twisted's testing module has no UDP fake.
    """

    def __init__(self) -> None:
        self.written: Sent = []

    def write(self, data: bytes, addr: Address) -> None:
        self.written.append((data, addr))

    def take(self) -> Sent:
        written, self.written = self.written, []
        return written


@dataclass
class Agent:
    """
    The client side of one agent, reduced to building its signed requests.
    """

    name: str
    address: Address
    network: str = "default"
    private: PrivateKey = field(default_factory=PrivateKey.generate)
    sequence: int = 1_000_000
    nonce: bytes | None = None

    @property
    def public(self) -> PublicKey:
        return self.private.public_key()

    @cached_property
    def key(self) -> bytes:
        return derive_rendezvous_key(self.private, SERVER_KEY.public_key(), self.name)

    def entry(self) -> PeerEntry:
        return PeerEntry(self.name, self.public, self.network)

    def request(
        self,
        method: int,
        attributes: Attributes = (),
        *,
        transaction_id: bytes | None = None,
        sequence: int | None = None,
        key: bytes | None = None,
    ) -> tuple[bytes, bytes]:
        """
        A transaction id and the signed request, numbered like the agent numbers them.
        """
        tid = transaction_id or stun.new_transaction_id()
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        header = [
            (Attr.USERNAME, self.name.encode("ascii")),
            (Attr.SEQUENCE, stun.encode_u64(sequence)),
        ]
        # Always a NONCE, blank until the server issued one, as the agent does:
        # the server never answers with more bytes than it got.
        header.append((Attr.NONCE, self.nonce if self.nonce is not None else bytes(20)))
        body = list(attributes(tid) if callable(attributes) else attributes)
        return tid, wire.signed(method, MessageClass.REQUEST, tid, header + body, key or self.key)


def directory_of(agents: Sequence[Agent]) -> Directory:
    return Directory(SERVER_KEY, {a.name: a.entry() for a in agents})


class Harness:
    """
    One RendezvousProtocol on a fake clock and transport, and helpers to talk to it.
    """

    def __init__(
        self,
        agents: Sequence[Agent] = (),
        *,
        binding_rate: float = 0.0,
        binding_burst: float = 1.0,
        max_pending: int = 256,
        max_lifetime: int = 600,
        relay: Any = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.registry = MemoryRegistry()
        self.protocol = RendezvousProtocol(
            directory_of(agents),
            self.registry,
            self.clock,
            binding_limiter=SourceLimiter(binding_rate, binding_burst, self.clock.seconds),
            error_limiter=SourceLimiter(ERROR_RATE, ERROR_BURST, self.clock.seconds),
            max_pending=max_pending,
            max_lifetime=max_lifetime,
            relay=relay,
        )
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def receive(self, data: bytes, source: Address) -> Sent:
        self.protocol.datagramReceived(data, source)
        return self.transport.take()

    def answer_of(self, agent: Agent, tid: bytes, sent: Sent) -> stun.Message:
        """
        The one reply in C{sent}: to the agent, for C{tid}, signed under its key.
        """
        assert len(sent) == 1, sent
        data, address = sent[0]
        assert address == agent.address
        message = stun.parse(data)
        assert message.transaction_id == tid
        assert message.cls in (MessageClass.SUCCESS, MessageClass.ERROR)
        assert stun.verify_integrity_sha256(message, agent.key)
        assert message.attributes[-1][0] == Attr.FINGERPRINT
        return message

    def ask(self, agent: Agent, method: int, attributes: Attributes = ()) -> stun.Message:
        tid, data = agent.request(method, attributes)
        return self.answer_of(agent, tid, self.receive(data, agent.address))

    def register(self, agent: Agent, lifetime: int = 60) -> stun.Message:
        """
        Register as the agent does: take the 438's nonce and try again.
        """
        attributes = [(Attr.LIFETIME, stun.encode_u32(lifetime))]
        answer = self.ask(agent, Method.REGISTER, attributes)
        if answer.cls == MessageClass.ERROR and error_code(answer) == 438:
            agent.nonce = answer.get(Attr.NONCE)
            answer = self.ask(agent, Method.REGISTER, attributes)
        assert answer.cls == MessageClass.SUCCESS, wire.error_of(answer)
        return answer

    def nonce_for(self, agent: Agent) -> None:
        """
        Get a nonce without registering: any request without one earns a 438.
        """
        answer = self.ask(agent, Method.PEERS)
        assert error_code(answer) == 438
        agent.nonce = answer.get(Attr.NONCE)

    def peers(self, agent: Agent, after: str | None = None) -> stun.Message:
        attributes = [] if after is None else [(Attr.PEER, after.encode("ascii"))]
        return self.ask(agent, Method.PEERS, attributes)

    def no_state(self) -> None:
        assert self.registry.count == 0
        assert len(self.protocol.answers) == 0
        assert self.protocol.pending_introductions() == 0


def error_code(message: stun.Message) -> int:
    assert message.cls == MessageClass.ERROR
    return wire.error_of(message)[0]


def names_in(message: stun.Message) -> list[str]:
    return [v.decode("ascii") for v in message.get_all(Attr.PEER)]


def binding_request(
    fingerprint: bool = False, attributes: Sequence[tuple[int, bytes]] = ()
) -> bytes:
    return stun.build(
        Method.BINDING,
        MessageClass.REQUEST,
        stun.new_transaction_id(),
        attributes,
        fingerprint=fingerprint,
    )


def other_slot(host: str, slots: int = 4096) -> str:
    """
    An IP whose limiter bucket is not C{host}'s (the hash is seeded per process).
    """
    for i in range(1, 255):
        candidate = f"198.51.100.{i}"
        if hash(candidate) % slots != hash(host) % slots:
            return candidate
    raise AssertionError("no address in another bucket")


# -- Binding ---------------------------------------------------------------


@pytest.mark.parametrize("source", [("198.51.100.7", 40000), ("2001:db8::7", 40001)])
@pytest.mark.parametrize("fingerprint", [False, True])
def test_binding_is_answered_statelessly(source: Address, fingerprint: bool) -> None:
    h = Harness([Agent("alice", ("192.0.2.1", 1000))])
    request = binding_request(fingerprint)
    sent = h.receive(request, source)
    assert len(sent) == 1 and sent[0][1] == source
    response = stun.parse(sent[0][0])
    assert (response.method, response.cls) == (Method.BINDING, MessageClass.SUCCESS)
    assert response.transaction_id == request[8:20]
    xor = response.get(Attr.XOR_MAPPED_ADDRESS)
    assert xor is not None
    assert stun.decode_xor_address(xor, response.transaction_id) == source
    assert response.has(Attr.FINGERPRINT) is fingerprint
    h.no_state()


def test_binding_with_unknown_required_attribute_gets_420() -> None:
    h = Harness()
    request = binding_request(True, [(0x7F01, b"x" * 16)])
    sent = h.receive(request, ("192.0.2.9", 9))
    assert len(sent) == 1
    assert len(sent[0][0]) <= len(request)
    response = stun.parse(sent[0][0])
    assert response.cls == MessageClass.ERROR and error_code(response) == 420
    unknown = response.get(Attr.UNKNOWN_ATTRIBUTES)
    assert unknown is not None and stun.decode_unknown_attributes(unknown) == [0x7F01]


@pytest.mark.parametrize("fingerprint", [False, True])
@pytest.mark.parametrize("size", [0, 2, 4, 8, 12, 16])
def test_binding_420_is_never_larger_than_the_request(fingerprint: bool, size: int) -> None:
    h = Harness()
    request = binding_request(fingerprint, [(0x7F01, b"x" * size)])
    sent = h.receive(request, ("192.0.2.9", 9))
    assert all(len(reply) <= len(request) for reply, _ in sent)
    assert len(sent) + h.protocol.counters["dropped-reply-larger-than-request"] == 1


def test_binding_replies_are_rate_limited_per_source_ip() -> None:
    h = Harness(binding_rate=10.0, binding_burst=20.0)
    busy = "192.0.2.1"
    answered = sum(len(h.receive(binding_request(), (busy, 1000 + i))) for i in range(50))
    assert answered == 20
    assert h.protocol.counters["binding-rate-limited"] == 30
    # Another source is not held back by the busy one.
    assert len(h.receive(binding_request(), (other_slot(busy), 5000))) == 1
    h.clock.advance(1.0)
    answered = sum(len(h.receive(binding_request(), (busy, 2000 + i))) for i in range(50))
    assert answered == 10


def test_malformed_binding_is_dropped() -> None:
    h = Harness()
    request = bytearray(binding_request(fingerprint=True))
    request[-1] ^= 1
    assert h.receive(bytes(request), ("192.0.2.1", 1)) == []
    assert h.receive(request[:-4], ("192.0.2.1", 1)) == []
    assert h.protocol.counters["dropped-bad-binding"] == 2


def gather_answer(h: Harness, agent: Agent, source: Address, key: bytes | None = None) -> Sent:
    tid, request = build_gather_request(agent.name, key or agent.key)
    sent = h.receive(request, source)
    for data, address in sent:
        assert address == source
        assert len(data) <= len(request)
        assert parse_gather_answer(data, agent.key, tid) == source
    return sent


@pytest.mark.parametrize("source", [("203.0.113.5", 41002), ("2001:db8::5", 41003)])
def test_signed_gather_is_answered_signed_and_outside_the_anonymous_budget(
    source: Address,
) -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice], binding_rate=1.0, binding_burst=1.0)
    # A neighbour on alice's IP drains the anonymous bucket...
    h.receive(binding_request(), (source[0], 9999))
    assert h.receive(binding_request(), (source[0], 9999)) == []
    assert h.protocol.counters["binding-rate-limited"] == 1
    # ...and alice's gathers are still answered (she need not even be registered).
    for _ in range(5):
        assert len(gather_answer(h, alice, source)) == 1
    assert h.protocol.counters["gather"] == 5
    h.no_state()


def test_gather_budget_is_per_name_and_address() -> None:
    alice, bob = Agent("alice", ("203.0.113.5", 41000)), Agent("bob", ("198.51.100.9", 7))
    h = Harness([alice, bob])
    here = ("203.0.113.5", 41002)
    answered = sum(len(gather_answer(h, alice, here)) for _ in range(50))
    assert answered == GATHER_BURST
    assert h.protocol.counters["gather-rate-limited"] == 50 - GATHER_BURST
    # Replays from anywhere else spend other buckets: alice's next socket, and
    # bob on the same address, are answered.
    assert len(gather_answer(h, alice, ("203.0.113.5", 41003))) == 1
    assert len(gather_answer(h, bob, here)) == 1
    h.clock.advance(1.0)
    answered = sum(len(gather_answer(h, alice, here)) for _ in range(50))
    assert answered == GATHER_RATE


@pytest.mark.parametrize("kind", ["unknown name", "wrong key", "tampered", "bad name"])
def test_unauthenticated_gather_is_dropped_and_counted(kind: str) -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    eve = Agent("eve", ("203.0.113.66", 666))
    if kind == "unknown name":
        _, request = build_gather_request("eve", eve.key)
    elif kind == "wrong key":
        _, request = build_gather_request("alice", eve.key)
    elif kind == "tampered":
        _, signed = build_gather_request("alice", alice.key)
        request = with_fingerprint(signed[:36] + b"P" + signed[37:-8])  # SOFTWARE
    else:
        tid = stun.new_transaction_id()
        attributes = [(Attr.USERNAME, b"al/ce"), (Attr.SOFTWARE, b"x")]
        request = wire.signed(Method.BINDING, MessageClass.REQUEST, tid, attributes, alice.key)
    stun.parse(request)
    assert h.receive(request, eve.address) == []
    assert h.protocol.counters["dropped-gather-unauthenticated"] == 1
    assert h.protocol.counters["binding"] == 0
    h.no_state()


def test_binding_with_username_but_no_sha256_integrity_is_an_anonymous_binding() -> None:
    h = Harness([Agent("alice", ("203.0.113.5", 41000))])
    # An ICE check's shape: USERNAME and a SHA-1 MESSAGE-INTEGRITY.
    tid = stun.new_transaction_id()
    request = stun.build(
        Method.BINDING,
        MessageClass.REQUEST,
        tid,
        [(Attr.USERNAME, b"alice:x")],
        integrity_sha1=bytes(20),
        fingerprint=True,
    )
    sent = h.receive(request, ("192.0.2.9", 9))
    assert len(sent) == 1
    response = stun.parse(sent[0][0])
    assert response.cls == MessageClass.SUCCESS and not response.has(Attr.MESSAGE_INTEGRITY_SHA256)
    assert h.protocol.counters["binding"] == 1


# -- registration and authentication ----------------------------------------


def test_first_register_gets_signed_438_then_succeeds_with_the_nonce() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    first = h.ask(alice, Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(120))])
    assert error_code(first) == 438
    nonce = first.get(Attr.NONCE)
    assert nonce is not None and len(nonce) == 20
    h.no_state()
    alice.nonce = nonce
    answer = h.ask(alice, Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(120))])
    assert answer.cls == MessageClass.SUCCESS
    xor = answer.get(Attr.XOR_MAPPED_ADDRESS)
    assert xor is not None
    assert stun.decode_xor_address(xor, answer.transaction_id) == alice.address
    lifetime = answer.get(Attr.LIFETIME)
    assert lifetime is not None and stun.decode_u32(lifetime) == 120
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.address == alice.address
    assert registration.expires == h.clock.seconds() + 120


@pytest.mark.parametrize(("requested", "granted"), [(5, MIN_LIFETIME), (300, 300), (10**6, 600)])
def test_lifetime_is_clamped(requested: int, granted: int) -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice], max_lifetime=600)
    answer = h.register(alice, lifetime=requested)
    value = answer.get(Attr.LIFETIME)
    assert value is not None and stun.decode_u32(value) == granted


def test_nonce_is_bound_to_the_source_address_and_expires() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.nonce_for(alice)
    first_nonce = alice.nonce
    alice.address = ("203.0.113.5", 41001)
    answer = h.ask(alice, Method.REGISTER)
    assert error_code(answer) == 438
    assert answer.get(Attr.NONCE) not in (None, first_nonce)
    assert h.registry.count == 0
    alice.nonce = answer.get(Attr.NONCE)
    h.clock.advance(NONCE_BUCKET * NONCE_BUCKETS_VALID)
    assert error_code(h.ask(alice, Method.REGISTER)) == 438
    assert h.registry.count == 0


def with_trailer(data: bytes, attr_type: int, value: bytes) -> bytes:
    """
    C{data} with one more attribute appended and the header length fixed:
    for trailers that L{stun.build} only writes correctly.
    """
    body = data[20:] + attr_type.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
    return data[:2] + len(body).to_bytes(2, "big") + data[4:20] + body


def with_fingerprint(data: bytes) -> bytes:
    """
    C{data} (without FINGERPRINT) plus a correct one: the forgery gets past parsing.
    """
    stub = with_trailer(data, Attr.FINGERPRINT, b"\x00" * 4)
    crc = zlib.crc32(stub[:-8]) ^ 0x5354554E
    return stub[:-4] + crc.to_bytes(4, "big")


FORGERIES = [
    "unknown user",
    "wrong key",
    "no integrity",
    "tampered",
    "truncated integrity",
    "no username",
    "bad username",
]


def forge(kind: str, alice: Agent) -> bytes:
    eve = Agent("eve", ("203.0.113.66", 666))
    lifetime = [(Attr.LIFETIME, stun.encode_u32(60))]
    tid = stun.new_transaction_id()
    plain = [(Attr.USERNAME, b"alice"), (Attr.SEQUENCE, stun.encode_u64(5)), *lifetime]
    if kind == "unknown user":
        return eve.request(Method.REGISTER, lifetime)[1]
    if kind == "wrong key":
        return alice.request(Method.REGISTER, lifetime, key=eve.key)[1]
    if kind == "no integrity":
        return stun.build(Method.REGISTER, MessageClass.REQUEST, tid, plain, fingerprint=True)
    if kind == "tampered":
        signed = bytearray(alice.request(Method.REGISTER, lifetime)[1])
        signed[43] ^= 1  # the SEQUENCE value, after the 12 bytes of USERNAME "alice"
        return with_fingerprint(bytes(signed[:-8]))
    if kind == "truncated integrity":
        unsigned = stun.build(Method.REGISTER, MessageClass.REQUEST, tid, plain)
        return with_fingerprint(with_trailer(unsigned, Attr.MESSAGE_INTEGRITY_SHA256, bytes(16)))
    sequence = [(Attr.SEQUENCE, stun.encode_u64(5))]
    username = [] if kind == "no username" else [(Attr.USERNAME, b"\xffalice")]
    return stun.build(
        Method.PEERS,
        MessageClass.REQUEST,
        tid,
        username + sequence,
        integrity_sha256=alice.key,
        fingerprint=True,
    )


UNAUTHORIZED_SIZE = len(
    stun.build(Method.REGISTER, MessageClass.ERROR, bytes(12), wire.error_attributes(401))
)


@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_request_creates_no_state_and_gets_a_small_unsigned_401(kind: str) -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    data = forge(kind, alice)
    stun.parse(data)  # well-formed: only the credentials are wrong
    source = ("203.0.113.66", 666)
    sent = h.receive(data, source)
    h.no_state()
    assert h.protocol.counters["dropped-unauthenticated"] == 1
    assert len(sent) == (1 if len(data) >= UNAUTHORIZED_SIZE else 0)
    for reply, address in sent:
        assert address == source
        assert len(reply) <= len(data)
        message = stun.parse(reply)
        assert message.transaction_id == data[8:20]
        assert error_code(message) == 401
        assert not message.has(Attr.MESSAGE_INTEGRITY_SHA256)
    # The forger locked nobody out.
    h.register(alice)
    assert h.registry.count == 1


def test_unauthorized_reply_is_never_larger_than_the_request() -> None:
    h = Harness([Agent("alice", ("203.0.113.5", 41000))])
    tiny = stun.build(Method.REGISTER, MessageClass.REQUEST, bytes(12), [(Attr.USERNAME, b"eve")])
    assert len(tiny) < UNAUTHORIZED_SIZE
    assert h.receive(tiny, ("203.0.113.66", 666)) == []
    assert h.protocol.counters["dropped-unauthenticated"] == 1
    h.no_state()


def test_unauthorized_replies_are_rate_limited_per_source_ip() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])

    def flood(count: int) -> int:
        return sum(
            len(h.receive(forge("wrong key", alice), ("203.0.113.66", 1000 + i)))
            for i in range(count)
        )

    assert flood(25) == ERROR_BURST
    h.clock.advance(1.0)
    assert flood(25) == ERROR_RATE
    assert h.protocol.counters["dropped-unauthenticated"] == 50
    h.no_state()


def test_register_without_sequence_is_a_bad_request() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.nonce_for(alice)
    tid = stun.new_transaction_id()
    attributes = [(Attr.USERNAME, b"alice"), (Attr.NONCE, alice.nonce or b"")]
    data = wire.signed(Method.REGISTER, MessageClass.REQUEST, tid, attributes, alice.key)
    assert error_code(h.answer_of(alice, tid, h.receive(data, alice.address))) == 400
    assert h.registry.count == 0


# -- replays and retransmissions ----------------------------------------------


def test_replayed_register_with_the_same_sequence_is_dropped() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.register(alice, lifetime=60)
    expires = h.registry.lookup("alice", START)
    assert expires is not None
    before = expires.expires
    h.clock.advance(1.0)
    _, replay = alice.request(
        Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(600))], sequence=alice.sequence
    )
    assert h.receive(replay, alice.address) == []
    assert h.protocol.counters["dropped-replay"] == 1
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.expires == before
    # The next number is fine.
    h.register(alice, lifetime=600)
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.expires == h.clock.seconds() + 600


def test_retransmitted_request_gets_the_identical_cached_answer() -> None:
    alice, bob = Agent("alice", ("203.0.113.5", 41000)), Agent("bob", ("198.51.100.9", 7))
    h = Harness([alice, bob])
    h.register(alice)
    tid, data = alice.request(Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(60))])
    first = h.receive(data, alice.address)
    h.answer_of(alice, tid, first)
    h.clock.advance(0.5)
    assert h.receive(data, alice.address) == first
    # The answer stays the one given, even though the peer list changed meanwhile.
    tid, data = alice.request(Method.PEERS)
    first = h.receive(data, alice.address)
    assert names_in(h.answer_of(alice, tid, first)) == []
    h.register(bob)
    assert h.receive(data, alice.address) == first
    assert h.protocol.counters["retransmission"] == 2


def test_restarted_agent_with_a_far_higher_sequence_registers_again() -> None:
    # An agent numbers from time_ns() // 1000 at start: restarted after a week
    # while still registered, its numbers jump by some 6e11.
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.register(alice)
    restarted = Agent("alice", ("203.0.113.5", 41001), private=alice.private)
    restarted.sequence = alice.sequence + 7 * 86400 * 10**6
    h.register(restarted)
    assert h.protocol.counters["internal-error"] == 0
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.address == restarted.address
    # The window still works after the jump.
    _, data = restarted.request(Method.PEERS, sequence=restarted.sequence)
    assert h.receive(data, restarted.address) == []
    assert (
        len(
            h.receive(
                restarted.request(Method.PEERS, sequence=restarted.sequence - 1)[1],
                restarted.address,
            )
        )
        == 1
    )


def test_sign_off_forgets_the_agent_at_once() -> None:
    alice, bob = Agent("alice", ("203.0.113.5", 41000)), Agent("bob", ("198.51.100.9", 7))
    h = Harness([alice, bob])
    h.register(alice, lifetime=600)
    h.register(bob)
    assert names_in(h.peers(bob)) == ["alice"]
    answer = h.ask(alice, Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(0))])
    assert answer.cls == MessageClass.SUCCESS
    assert answer.get(Attr.LIFETIME) == stun.encode_u32(0)
    assert h.registry.lookup("alice", h.clock.seconds()) is None
    assert names_in(h.peers(bob)) == []
    assert error_code(h.ask(bob, Method.CONNECT, connect_attributes("alice"))) == 480
    # Signing off when not registered changes nothing; registering again works.
    h.ask(alice, Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(0))])
    assert h.registry.lookup("alice", h.clock.seconds()) is None
    h.register(alice)
    assert names_in(h.peers(bob)) == ["alice"]


def test_replayed_keepalive_does_not_bring_back_a_signed_off_agent() -> None:
    alice, bob = Agent("alice", ("203.0.113.5", 41000)), Agent("bob", ("198.51.100.9", 7))
    h = Harness([alice, bob])
    h.register(alice)
    # A keepalive captured on the wire, replayed from alice's own address
    # once it has left the answer cache and alice has signed off.
    tid, captured = alice.request(Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(600))])
    h.answer_of(alice, tid, h.receive(captured, alice.address))
    h.clock.advance(RECENT_ANSWER_SECONDS + 1)
    h.protocol.expire()
    h.ask(alice, Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(0))])
    assert h.receive(captured, alice.address) == []
    assert h.registry.lookup("alice", h.clock.seconds()) is None
    h.register(bob)
    assert names_in(h.peers(bob)) == []


def test_stale_nonce_answer_is_never_larger_than_the_request() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    tid = stun.new_transaction_id()
    attributes = [(Attr.USERNAME, b"alice"), (Attr.SEQUENCE, stun.encode_u64(7))]
    bare = wire.signed(Method.REGISTER, MessageClass.REQUEST, tid, attributes, alice.key)
    for reply, _ in h.receive(bare, alice.address):
        assert len(reply) <= len(bare)
    h.no_state()


def test_stale_nonce_answers_are_rate_limited_per_source_ip() -> None:
    agents = [Agent("alice", ("203.0.113.5", 41000 + i)) for i in range(25)]
    h = Harness(agents[:1])
    answered = 0
    for agent in agents:
        _, data = agent.request(Method.PEERS, key=agents[0].key)
        answered += len(h.receive(data, agent.address))
    assert answered == ERROR_BURST
    h.no_state()


def test_sequence_window_accepts_out_of_order_numbers_once() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.register(alice)
    base = alice.sequence
    top = base + 100

    def peers_with(sequence: int) -> Sent:
        _, data = alice.request(Method.PEERS, sequence=sequence)
        return h.receive(data, alice.address)

    def resync(sent: Sent) -> int:
        [(data, _)] = sent
        message = stun.parse(data)
        assert error_code(message) == BAD_SEQUENCE
        value = message.get(Attr.SEQUENCE)
        assert value is not None
        return stun.decode_u64(value)

    assert len(peers_with(top)) == 1
    assert len(peers_with(top - 63)) == 1
    assert peers_with(top - 63) == []
    # Too old to tell: not carried out, but told where to resume.
    assert resync(peers_with(top - 64)) == resync(peers_with(base)) == int(START * 10**6)
    assert len(peers_with(top - 1)) == 1
    assert peers_with(top) == []
    assert h.protocol.counters["dropped-replay"] == 2
    assert h.protocol.counters["sequence-resync"] == 2


def resume_point(answer: stun.Message) -> int:
    assert error_code(answer) == BAD_SEQUENCE
    value = answer.get(Attr.SEQUENCE)
    assert value is not None
    return stun.decode_u64(value)


def test_agent_restarted_behind_its_window_is_told_where_to_resume() -> None:
    # alice once ran with her clock half an hour ahead, then restarted with
    # it set right: her numbers fall far behind the window she left.
    alice = Agent("alice", ("203.0.113.5", 41000), sequence=int(START * 10**6) + 1800 * 10**6)
    h = Harness([alice])
    h.register(alice)
    highest = alice.sequence
    restarted = Agent("alice", ("203.0.113.5", 41001), private=alice.private)
    restarted.sequence = int(START * 10**6)
    h.nonce_for(restarted)
    tid, data = restarted.request(Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(60))])
    sent = h.receive(data, restarted.address)
    assert len(sent[0][0]) <= len(data)
    assert resume_point(h.answer_of(restarted, tid, sent)) == highest + 1
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.address == alice.address
    # Numbering from there, she registers; the old numbers stay refused.
    restarted.sequence = highest
    h.register(restarted)
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.address == restarted.address
    _, old = restarted.request(Method.PEERS, sequence=highest)
    assert h.receive(old, restarted.address) == []


def test_sequence_far_ahead_of_the_clock_is_not_taken() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.register(alice)
    normal = alice.sequence
    alice.sequence = int((START + SEQUENCE_AHEAD) * 10**6) + 86400 * 10**6  # a day ahead
    answer = h.ask(alice, Method.REGISTER)
    assert resume_point(answer) == int(START * 10**6)
    # The window did not move: numbers near the last good one still work.
    alice.sequence = normal
    h.register(alice)
    assert h.protocol.counters["sequence-resync"] == 1
    # Within the allowance is fine.
    alice.sequence = int((START + SEQUENCE_AHEAD / 2) * 10**6)
    h.register(alice)


def test_resync_needs_a_valid_nonce_and_replays_change_nothing() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.register(alice)
    captured_tid, captured = alice.request(
        Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(600))], sequence=alice.sequence - 100
    )
    # From elsewhere: a 438 at most, no word on sequences.
    for reply, _ in h.receive(captured, ("198.51.100.99", 9)):
        message = stun.parse(reply)
        assert error_code(message) == 438 and not message.has(Attr.SEQUENCE)
    # From alice's address: the resync answer, and nothing else happens.
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None
    expires = registration.expires
    h.clock.advance(1.0)
    sent = h.receive(captured, alice.address)
    assert resume_point(h.answer_of(alice, captured_tid, sent)) > alice.sequence
    registration = h.registry.lookup("alice", h.clock.seconds())
    assert registration is not None and registration.expires == expires


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    alice = Agent("alice", ("203.0.113.5", 41000))
    h = Harness([alice])
    h.nonce_for(alice)
    attributes = [(0x4DFF, b"x"), (0xC0DE, b"optional"), (0x7777, b""), (0x4DFF, b"y")]
    answer = h.ask(alice, Method.REGISTER, attributes)
    assert error_code(answer) == 420
    unknown = answer.get(Attr.UNKNOWN_ATTRIBUTES)
    assert unknown is not None
    assert stun.decode_unknown_attributes(unknown) == [0x4DFF, 0x7777]
    h.no_state()


# -- peers ---------------------------------------------------------------------


def test_peers_lists_registered_peers_of_the_same_network_only() -> None:
    alice, bob, carol, dave = (
        Agent(name, ("192.0.2.10", 1000 + i))
        for i, name in enumerate(("alice", "bob", "carol", "dave"))
    )
    mallory = Agent("mallory", ("192.0.2.66", 666), network="elsewhere")
    h = Harness([alice, bob, carol, dave, mallory])
    for agent in (alice, bob, carol, mallory):
        h.register(agent)
    answer = h.peers(alice)
    assert answer.cls == MessageClass.SUCCESS
    assert names_in(answer) == ["bob", "carol"]
    assert not answer.has(Attr.MORE)
    assert names_in(h.peers(mallory)) == []
    assert names_in(h.peers(bob)) == ["alice", "carol"]
    assert names_in(h.peers(alice, after="bob")) == ["carol"]


def test_peers_reply_is_paged_with_more_when_names_do_not_fit() -> None:
    agents = [Agent(f"peer-{i:03d}-" + "x" * 55, (f"192.0.2.{10 + i}", 1000)) for i in range(40)]
    h = Harness(agents)
    for agent in agents:
        h.register(agent)
    asker = agents[17]
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while pages < 10:
        answer = h.peers(asker, after)
        pages += 1
        assert len(answer.raw) <= 1200
        page = names_in(answer)
        assert page
        seen += page
        if not answer.has(Attr.MORE):
            break
        after = page[-1]
    assert pages > 1
    assert seen == sorted(a.name for a in agents if a is not asker)


def test_requests_from_an_unregistered_agent_get_470() -> None:
    alice, bob = Agent("alice", ("203.0.113.5", 41000)), Agent("bob", ("198.51.100.9", 7))
    h = Harness([alice, bob])
    h.register(bob)
    h.nonce_for(alice)
    assert error_code(h.peers(alice)) == 470
    answer = h.ask(alice, Method.CONNECT, connect_attributes("bob"))
    assert error_code(answer) == 470
    assert h.registry.lookup("alice", h.clock.seconds()) is None
    assert h.protocol.pending_introductions() == 0


# -- introductions -------------------------------------------------------------

TUNNEL_ID = bytes(range(16))
A_CANDIDATES = [
    Candidate(CandidateKind.HOST, "10.0.0.1", 5000),
    Candidate(CandidateKind.SRFLX, "203.0.113.5", 41002),
    Candidate(CandidateKind.HOST, "2001:db8::a", 5001),
]
B_CANDIDATES = [
    Candidate(CandidateKind.HOST, "10.1.0.2", 6000),
    Candidate(CandidateKind.SRFLX, "2001:db8::b", 6001),
]


def connect_attributes(
    peer: str,
    service: str = "chat",
    tunnel_id: bytes = TUNNEL_ID,
    candidates: Sequence[Candidate] = A_CANDIDATES,
) -> Callable[[bytes], list[tuple[int, bytes]]]:
    def attributes(tid: bytes) -> list[tuple[int, bytes]]:
        return [
            (Attr.PEER, peer.encode("ascii")),
            (Attr.SERVICE, service.encode("ascii")),
            (Attr.TUNNEL_ID, tunnel_id),
            *wire.encode_candidates(candidates, tid),
        ]

    return attributes


@dataclass
class Introduction:
    h: Harness
    alice: Agent
    bob: Agent
    connect_id: bytes
    connect: bytes
    incoming: stun.Message


def world(**kw: int) -> tuple[Harness, dict[str, Agent]]:
    """
    alice, bob and carol registered in the default network, dave listed but
    offline, mallory registered in another network.
    """
    agents = {
        "alice": Agent("alice", ("203.0.113.5", 41000)),
        "bob": Agent("bob", ("198.51.100.20", 42000)),
        "carol": Agent("carol", ("198.51.100.30", 43000)),
        "dave": Agent("dave", ("198.51.100.40", 44000)),
        "mallory": Agent("mallory", ("192.0.2.66", 666), network="elsewhere"),
    }
    h = Harness(list(agents.values()), **kw)
    for name in ("alice", "bob", "carol", "mallory"):
        h.register(agents[name])
    return h, agents


def start_connect(h: Harness, initiator: Agent, target: Agent) -> Introduction:
    tid, data = initiator.request(Method.CONNECT, connect_attributes(target.name))
    sent = h.receive(data, initiator.address)
    assert len(sent) == 1, sent
    forwarded, address = sent[0]
    assert address == target.address
    return Introduction(h, initiator, target, tid, data, stun.parse(forwarded))


@pytest.fixture
def intro() -> Introduction:
    h, agents = world()
    return start_connect(h, agents["alice"], agents["bob"])


def target_answer(intro: Introduction, cls: MessageClass, attributes: Attributes) -> Sent:
    tid = intro.incoming.transaction_id
    body = attributes(tid) if callable(attributes) else attributes
    data = wire.signed(Method.INCOMING, cls, tid, list(body), intro.bob.key)
    return intro.h.receive(data, intro.bob.address)


RESPONDER_NONCE = bytes(range(100, 116))


def accept(tid: bytes) -> list[tuple[int, bytes]]:
    """
    The target's yes: its candidates and the nonce it salts the tunnel key with.
    """
    return [(Attr.TUNNEL_NONCE, RESPONDER_NONCE), *wire.encode_candidates(B_CANDIDATES, tid)]


@pytest.mark.parametrize(
    ("peer", "change", "code"),
    [
        ("zed", None, 404),
        ("mallory", None, 404),
        ("dave", None, 480),
        ("alice", None, 400),
        ("bob", "no service", 400),
        ("bob", "short tunnel id", 400),
        ("bob", "too many candidates", 400),
    ],
)
def test_connect_errors(peer: str, change: str | None, code: int) -> None:
    h, agents = world()
    alice = agents["alice"]
    attributes = connect_attributes(peer)
    if change == "no service":
        attributes = _without(attributes, Attr.SERVICE)
    elif change == "short tunnel id":
        attributes = connect_attributes(peer, tunnel_id=bytes(15))
    elif change == "too many candidates":
        attributes = connect_attributes(peer, candidates=A_CANDIDATES * 6)
    answer = h.ask(alice, Method.CONNECT, attributes)
    assert error_code(answer) == code
    assert h.protocol.pending_introductions() == 0
    # An error is final, and cached like any answer.
    cached = h.protocol.answers.lookup("alice", answer.transaction_id)
    assert cached is not None and cached.data == answer.raw


@pytest.mark.parametrize("field", [Attr.PEER, Attr.SERVICE], ids=["PEER", "SERVICE"])
@pytest.mark.parametrize("bad", [b"bob\n", b"", b"b" * 65, b"-bob", b"bob/..", b"b\xc3\xa9b"])
def test_connect_with_a_malformed_name_is_a_bad_request(field: int, bad: bytes) -> None:
    h, agents = world()
    alice = agents["alice"]
    attributes = connect_attributes("bob")
    answer = h.ask(
        alice,
        Method.CONNECT,
        lambda tid: [(t, bad if t == field else v) for t, v in attributes(tid)],
    )
    assert error_code(answer) == 400
    assert h.protocol.pending_introductions() == 0


def _without(
    attributes: Callable[[bytes], list[tuple[int, bytes]]], attr_type: int
) -> Callable[[bytes], list[tuple[int, bytes]]]:
    return lambda tid: [(t, v) for t, v in attributes(tid) if t != attr_type]


def test_introduction_is_forwarded_signed_with_the_targets_key(intro: Introduction) -> None:
    incoming = intro.incoming
    assert (incoming.method, incoming.cls) == (Method.INCOMING, MessageClass.REQUEST)
    assert stun.verify_integrity_sha256(incoming, intro.bob.key)
    assert not stun.verify_integrity_sha256(incoming, intro.alice.key)
    assert incoming.attributes[-1][0] == Attr.FINGERPRINT
    assert incoming.transaction_id != intro.connect_id
    assert incoming.get(Attr.PEER) == b"alice"
    assert incoming.get(Attr.SERVICE) == b"chat"
    assert incoming.get(Attr.TUNNEL_ID) == TUNNEL_ID
    assert incoming.get(Attr.PUBLIC_KEY) == intro.alice.public.raw
    # Re-encoded under the new transaction id (the IPv6 one would decode wrong otherwise).
    assert wire.decode_candidates(incoming) == A_CANDIDATES
    assert not incoming.has(Attr.USERNAME) and not incoming.has(Attr.SEQUENCE)
    assert not incoming.has(Attr.WAIT)
    assert intro.h.protocol.pending_introductions() == 1
    assert intro.h.protocol.pending_for("alice") == intro.h.protocol.pending_for("bob") == 1


def test_accepted_introduction_answers_the_initiator(intro: Introduction) -> None:
    sent = target_answer(intro, MessageClass.SUCCESS, accept)
    answer = intro.h.answer_of(intro.alice, intro.connect_id, sent)
    assert (answer.method, answer.cls) == (Method.CONNECT, MessageClass.SUCCESS)
    assert answer.get(Attr.PUBLIC_KEY) == intro.bob.public.raw
    assert answer.get(Attr.TUNNEL_NONCE) == RESPONDER_NONCE
    assert wire.decode_candidates(answer) == B_CANDIDATES
    assert intro.h.protocol.pending_introductions() == 0
    assert intro.h.protocol.pending_for("alice") == intro.h.protocol.pending_for("bob") == 0
    # The target's retransmitted answer changes nothing; no retransmission follows.
    assert target_answer(intro, MessageClass.SUCCESS, accept) == []
    intro.h.clock.advance(INCOMING_BACKOFF.total())
    assert intro.h.transport.take() == []
    # A late retransmission of the Connect gets the very same answer.
    intro.h.clock.advance(RECENT_ANSWER_SECONDS / 2)
    intro.h.protocol.expire()
    assert intro.h.receive(intro.connect, intro.alice.address) == sent


@pytest.mark.parametrize("nonce", [None, bytes(15), bytes(17)], ids=["none", "short", "long"])
def test_acceptance_without_a_proper_tunnel_nonce_is_refused(
    intro: Introduction, nonce: bytes | None
) -> None:
    def answer(tid: bytes) -> list[tuple[int, bytes]]:
        kept = [(t, v) for t, v in accept(tid) if t != Attr.TUNNEL_NONCE]
        return kept if nonce is None else [(Attr.TUNNEL_NONCE, nonce), *kept]

    sent = target_answer(intro, MessageClass.SUCCESS, answer)
    reply = intro.h.answer_of(intro.alice, intro.connect_id, sent)
    assert (reply.method, error_code(reply)) == (Method.CONNECT, 403)
    assert not reply.has(Attr.PUBLIC_KEY)
    assert intro.h.protocol.pending_introductions() == 0


def test_wait_is_forwarded_only_when_asked_for() -> None:
    h, agents = world()
    alice, bob = agents["alice"], agents["bob"]
    plain = start_connect(h, alice, bob)
    assert not plain.incoming.has(Attr.WAIT)
    _, data = alice.request(
        Method.CONNECT, lambda tid: [*connect_attributes("bob")(tid), (Attr.WAIT, b"")]
    )
    sent = h.receive(data, alice.address)
    assert len(sent) == 1 and sent[0][1] == bob.address
    incoming = stun.parse(sent[0][0])
    assert incoming.has(Attr.WAIT)
    assert stun.verify_integrity_sha256(incoming, bob.key)


def test_answer_not_signed_by_the_target_is_ignored(intro: Introduction) -> None:
    tid = intro.incoming.transaction_id
    forged = wire.signed(Method.INCOMING, MessageClass.SUCCESS, tid, accept(tid), intro.alice.key)
    assert intro.h.receive(forged, intro.bob.address) == []
    assert intro.h.protocol.pending_introductions() == 1
    answer = intro.h.answer_of(
        intro.alice, intro.connect_id, target_answer(intro, MessageClass.SUCCESS, accept)
    )
    assert answer.cls == MessageClass.SUCCESS


@pytest.mark.parametrize(("given", "forwarded"), [(460, 460), (403, 403), (486, 486), (500, 403)])
def test_target_error_is_forwarded(intro: Introduction, given: int, forwarded: int) -> None:
    sent = target_answer(intro, MessageClass.ERROR, wire.error_attributes(given))
    answer = intro.h.answer_of(intro.alice, intro.connect_id, sent)
    assert (answer.method, error_code(answer)) == (Method.CONNECT, forwarded)
    assert not answer.has(Attr.PUBLIC_KEY)
    assert intro.h.protocol.pending_introductions() == 0


def test_unanswered_introduction_is_retransmitted_then_times_out(intro: Introduction) -> None:
    h = intro.h
    step = 0.0625
    delays = INCOMING_BACKOFF.delays()
    for i, delay in enumerate(delays):
        h.clock.advance(delay - step)
        assert h.transport.take() == []
        h.clock.advance(step)
        sent = h.transport.take()
        if i < len(delays) - 1:
            assert sent == [(intro.incoming.raw, intro.bob.address)]
    answer = h.answer_of(intro.alice, intro.connect_id, sent)
    assert (answer.method, error_code(answer)) == (Method.CONNECT, 408)
    heard = round(INCOMING_BACKOFF.total())
    assert wire.error_of(answer)[1] == f"bob's agent has not been heard from for {heard} s"
    assert h.protocol.pending_introductions() == 0
    assert h.protocol.pending_for("alice") == h.protocol.pending_for("bob") == 0
    # The late answer of the target is not news any more.
    assert target_answer(intro, MessageClass.SUCCESS, accept) == []


def test_introduction_is_held_and_delivered_when_the_target_registers_again() -> None:
    # bob's NAT rebooted right after he registered: the Incoming is lost
    # until his next keepalive opens a new mapping, on another port.
    h, agents = world()
    alice, bob = agents["alice"], agents["bob"]
    h.clock.advance(5.0)
    intro = start_connect(h, alice, bob)
    for delay in INCOMING_BACKOFF.delays()[:-2]:
        h.clock.advance(delay)
    # Retransmitted meanwhile, to the old address.
    assert h.transport.take() == [(intro.incoming.raw, intro.bob.address)] * 8
    bob.address = ("198.51.100.20", 42077)
    h.nonce_for(bob)
    tid, data = bob.request(Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(60))])
    sent = h.receive(data, bob.address)
    assert (intro.incoming.raw, bob.address) in sent
    assert h.protocol.counters["introduction-resent"] == 1
    h.answer_of(bob, tid, [s for s in sent if s[1] == bob.address and s[0] != intro.incoming.raw])
    answer = h.answer_of(
        alice, intro.connect_id, target_answer(intro, MessageClass.SUCCESS, accept)
    )
    assert answer.cls == MessageClass.SUCCESS
    assert h.protocol.pending_introductions() == 0


def test_a_target_that_stays_silent_fails_with_how_long_it_has_been() -> None:
    h, agents = world()
    alice, bob = agents["alice"], agents["bob"]
    h.clock.advance(5.0)
    intro = start_connect(h, alice, bob)
    for delay in INCOMING_BACKOFF.delays():
        h.clock.advance(delay)
    sent = h.transport.take()
    answer = h.answer_of(alice, intro.connect_id, [s for s in sent if s[1] == alice.address])
    assert error_code(answer) == 408
    expected = f"bob's agent has not been heard from for {round(5 + INCOMING_BACKOFF.total())} s"
    assert wire.error_of(answer)[1] == expected


def test_the_hold_fits_in_the_agents_default_connect_and_its_patience() -> None:
    assert INCOMING_BACKOFF.total() < 10.0 < CONNECT_BACKOFF.total()


def test_retransmitted_connect_is_not_forwarded_twice(intro: Introduction) -> None:
    h = intro.h
    assert h.receive(intro.connect, intro.alice.address) == []
    assert h.protocol.pending_introductions() == 1
    # Seen as the retransmission it is, not as a replay attack.
    assert h.protocol.counters["retransmission"] == 1
    assert h.protocol.counters["dropped-replay"] == 0
    h.clock.advance(INCOMING_BACKOFF.delays()[0])
    assert h.transport.take() == [(intro.incoming.raw, intro.bob.address)]
    sent = target_answer(intro, MessageClass.ERROR, wire.error_attributes(460))
    assert error_code(h.answer_of(intro.alice, intro.connect_id, sent)) == 460
    assert h.receive(intro.connect, intro.alice.address) == sent


def test_pending_introductions_are_limited_per_agent() -> None:
    h, agents = world(max_pending=2)
    alice, bob, carol = agents["alice"], agents["bob"], agents["carol"]
    start_connect(h, alice, bob)
    start_connect(h, alice, bob)
    assert error_code(h.ask(alice, Method.CONNECT, connect_attributes("bob"))) == 486
    assert error_code(h.ask(alice, Method.CONNECT, connect_attributes("carol"))) == 486
    # bob is as busy as alice: carol cannot reach him either, but alice is not involved.
    assert error_code(h.ask(carol, Method.CONNECT, connect_attributes("bob"))) == 486
    h.register(agents["dave"])
    start_connect(h, carol, agents["dave"])
    assert h.protocol.pending_introductions() == 3


def test_expiry_forgets_silent_agents() -> None:
    h, agents = world()
    alice, bob, carol = agents["alice"], agents["bob"], agents["carol"]
    h.register(alice, lifetime=MIN_LIFETIME)
    h.register(carol, lifetime=MIN_LIFETIME)
    for _ in range(4):
        h.clock.advance(MIN_LIFETIME / 2)
        h.register(carol, lifetime=MIN_LIFETIME)
        h.protocol.expire()
    assert h.registry.lookup("alice", h.clock.seconds()) is None
    assert h.registry.lookup("carol", h.clock.seconds()) is not None
    assert names_in(h.peers(bob)) == ["carol"]
    assert error_code(h.ask(bob, Method.CONNECT, connect_attributes("alice"))) == 480
    h.clock.advance(60 + RECENT_ANSWER_SECONDS)  # past every lifetime world() gave
    h.protocol.expire()
    assert h.registry.count == 0
    assert len(h.protocol.answers) == 0


def test_reload_drops_removed_and_changed_peers_and_keeps_the_rest() -> None:
    h, agents = world()
    alice, bob, carol, mallory = (agents[n] for n in ("alice", "bob", "carol", "mallory"))
    moved = Agent("mallory", mallory.address, "default", mallory.private, sequence=mallory.sequence)
    rekeyed = Agent("bob", bob.address)
    new = [alice, rekeyed, agents["dave"], moved]
    h.protocol.reload(directory_of(new))
    now = h.clock.seconds()
    assert h.registry.lookup("alice", now) is not None
    for name in ("bob", "carol", "mallory"):
        assert h.registry.lookup(name, now) is None
    # alice carries on without registering again; carol is a stranger now.
    assert names_in(h.peers(alice)) == []
    _, data = carol.request(Method.PEERS)
    sent = h.receive(data, carol.address)
    assert [error_code(stun.parse(d)) for d, _ in sent] == [401]
    assert "carol" not in h.protocol.answers.agents()
    # bob's new key works, his old one does not.
    assert error_code(h.ask(rekeyed, Method.PEERS)) == 438
    bob.nonce = None
    _, data = bob.request(Method.PEERS)
    assert [error_code(stun.parse(d)) for d, _ in h.receive(data, bob.address)] == [401]
    h.register(moved)
    assert names_in(h.peers(alice)) == ["mallory"]


class FailingTransport(FakeDatagramTransport):
    """
    A send buffer that is full for the first C{failures} writes.
    """

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def write(self, data: bytes, addr: Address) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        super().write(data, addr)


def test_a_failed_send_is_counted_and_retransmission_goes_on() -> None:
    h, agents = world()
    alice, bob = agents["alice"], agents["bob"]
    h.transport = FailingTransport(failures=1)
    h.protocol.transport = h.transport  # type: ignore[assignment]
    _, data = alice.request(Method.CONNECT, connect_attributes("bob"))
    assert h.receive(data, alice.address) == []  # the Incoming did not leave
    assert h.protocol.counters["internal-error"] == 0
    assert h.protocol.pending_introductions() == 1
    h.clock.advance(INCOMING_BACKOFF.delays()[0])
    [(forwarded, address)] = h.transport.take()
    assert address == bob.address
    assert stun.parse(forwarded).method == Method.INCOMING


def test_binding_flood_from_many_sources_keeps_no_state() -> None:
    h = Harness(binding_rate=50.0, binding_burst=100.0)
    for i in range(2000):
        h.receive(binding_request(i % 2 == 0), (f"10.{i // 250}.{i % 250}.1", 1024 + i))
        h.receive(os.urandom(i % 64), ("192.0.2.1", 2))
    h.no_state()
    assert h.protocol.counters["binding"] == 2000


def test_register_replies_and_introductions_carry_the_rendezvous_time() -> None:
    """
    Agents judge an Incoming's freshness by the rendezvous' clock, which the
    Register reply tells them: both carry it, signed.
    """
    h, agents = world()
    h.clock.advance(12.5)
    reply = h.register(agents["alice"])
    assert wire.decode_timestamp(reply) == pytest.approx(h.clock.seconds())
    h.clock.advance(3.0)
    introduction = start_connect(h, agents["alice"], agents["bob"])
    assert wire.decode_timestamp(introduction.incoming) == pytest.approx(h.clock.seconds())


class FullRelay:
    """A relay whose every allocation is refused, as when an agent has too many."""

    def allocate(self, tunnel_id: bytes, initiator: str, responder: str) -> tuple[int, int]:
        raise RelayRefused("busy", f"agent {initiator} has 16 relayed tunnels")

    def release(self, tunnel_id: bytes) -> None:
        raise AssertionError("nothing was allocated")


@pytest.mark.parametrize(
    ("relay", "reason"),
    [
        (None, "this rendezvous runs no relay"),
        (FullRelay(), "agent alice has 16 relayed tunnels"),
    ],
    ids=["no relay", "refused"],
)
def test_a_relay_asked_for_and_not_given_is_explained_to_the_initiator(
    relay: Any, reason: str
) -> None:
    agents = {
        "alice": Agent("alice", ("203.0.113.5", 41000)),
        "bob": Agent("bob", ("198.51.100.20", 42000)),
    }
    h = Harness(list(agents.values()), relay=relay)
    for agent in agents.values():
        h.register(agent)
    alice, bob = agents["alice"], agents["bob"]
    attributes = connect_attributes("bob")
    tid, data = alice.request(Method.CONNECT, lambda t: [*attributes(t), (Attr.RELAY, b"")])
    ((forwarded, _),) = h.receive(data, alice.address)
    incoming = stun.parse(forwarded)
    assert not incoming.has(Attr.RELAY_PORT) and not incoming.has(Attr.RELAY_REFUSED)
    sent = target_answer(
        Introduction(h, alice, bob, tid, data, incoming), MessageClass.SUCCESS, accept
    )
    answer = h.answer_of(alice, tid, sent)
    assert answer.cls == MessageClass.SUCCESS and not answer.has(Attr.RELAY_PORT)
    assert answer.get(Attr.RELAY_REFUSED) == reason.encode()
    # Not asked, not explained.
    h2 = Harness(list(agents.values()), relay=relay)
    for agent in agents.values():
        h2.register(agent)
    tid, data = alice.request(Method.CONNECT, connect_attributes("bob", tunnel_id=b"U" * 16))
    ((forwarded, _),) = h2.receive(data, alice.address)
    incoming = stun.parse(forwarded)
    sent = target_answer(
        Introduction(h2, alice, bob, tid, data, incoming), MessageClass.SUCCESS, accept
    )
    answer = h2.answer_of(alice, tid, sent)
    assert answer.cls == MessageClass.SUCCESS and not answer.has(Attr.RELAY_REFUSED)
