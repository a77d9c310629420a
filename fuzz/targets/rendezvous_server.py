"""
The rendezvous's datagram handler, C{RendezvousProtocol.datagramReceived},
on a fake clock and transport.

An input is up to eight datagrams (L{fuzz.harness.records}).  Each one's
flags byte picks

  - bits 0-1, its source: alice, bob, carol (another network), a stranger;
  - bits 2-3, its authentication: 0 as it is; 1 signed again under the key
    of its USERNAME (or of its source) with a nonce the server issued to
    that source; 2 signed again as bob's answer to the last Incoming the
    server sent him; 3 signed again, nonce as it is;
  - bits 4-7, the seconds to let pass first: 0, or 0.25 * 2**(n-1).

alice and bob are registered in network "default" and carol in "other"
before the first datagram; afterwards the clock runs on, so that
retransmissions, timeouts and expiry run too.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.task import Clock

from fuzz.harness import (
    Address,
    FakeDatagramTransport,
    check_counter,
    no_logged_failures,
    record,
    records,
    resign,
    transaction_ids,
)
from punchd import stun, wire
from punchd.config import PeerEntry
from punchd.keys import PrivateKey, derive_rendezvous_key
from punchd.rendezvous.limits import SourceLimiter
from punchd.rendezvous.registry import MemoryRegistry
from punchd.rendezvous.server import Directory, RendezvousProtocol
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind

START = 1_700_000_000.0
SERVER = PrivateKey(bytes([1] * 32))
AGENTS: dict[str, tuple[PrivateKey, str, Address]] = {
    "alice": (PrivateKey(bytes([2] * 32)), "default", ("192.0.2.10", 40000)),
    "bob": (PrivateKey(bytes([3] * 32)), "default", ("198.51.100.20", 50000)),
    "carol": (PrivateKey(bytes([4] * 32)), "other", ("203.0.113.30", 4000)),
}
STRANGER: Address = ("203.0.113.99", 1234)
SOURCES = [AGENTS["alice"][2], AGENTS["bob"][2], AGENTS["carol"][2], STRANGER]
BY_ADDRESS = {address: name for name, (_, _, address) in AGENTS.items()}
KEYS = {
    name: derive_rendezvous_key(private, SERVER.public_key(), name)
    for name, (private, _, _) in AGENTS.items()
}
DIRECTORY = Directory(
    SERVER,
    {
        name: PeerEntry(name, private.public_key(), network)
        for name, (private, network, _) in AGENTS.items()
    },
)


class Server:
    """
    One fresh rendezvous per input, and what the harness knows of it.
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        registry = MemoryRegistry()
        for name, (_, network, address) in AGENTS.items():
            registry.register(name, network, address, START, 60)
        self.protocol = RendezvousProtocol(
            DIRECTORY,
            registry,
            self.clock,
            binding_limiter=SourceLimiter(20.0, 40.0, self.clock.seconds),
            error_limiter=SourceLimiter(5.0, 10.0, self.clock.seconds),
            max_pending=4,
        )
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        self._nonces: dict[Address, bytes] = {}

    def receive(self, data: bytes, source: Address) -> list[tuple[bytes, Address]]:
        before = len(self.transport.written)
        self.protocol.datagramReceived(data, source)
        return self.transport.written[before:]

    def nonce(self, name: str, source: Address) -> bytes:
        """
        A nonce for C{source}, asked for the way an agent asks: any signed
        request without a valid one earns a 438 that carries one.
        """
        nonce = self._nonces.get(source)
        if nonce is None:
            ask = wire.signed(
                Method.PEERS,
                MessageClass.REQUEST,
                bytes(11) + b"\xff",
                # Shaped like an agent's request: the 438 is never larger than it.
                [
                    (Attr.USERNAME, name.encode()),
                    (Attr.SEQUENCE, bytes(8)),
                    (Attr.NONCE, bytes(20)),
                ],
                KEYS[name],
            )
            answers = self.receive(ask, source)
            nonce = stun.parse(answers[0][0]).get(Attr.NONCE) if answers else None
            self._nonces[source] = nonce or bytes(20)
        return self._nonces[source]

    def last_incoming(self) -> bytes | None:
        bob = AGENTS["bob"][2]
        for data, address in reversed(self.transport.written):
            message = stun.parse(data)
            if address == bob and message.method == Method.INCOMING:
                return message.transaction_id
        return None

    def authenticate(self, flags: int, data: bytes, source: Address) -> bytes | None:
        mode = (flags >> 2) & 3
        if mode == 0:
            return data
        if mode == 2:
            incoming = self.last_incoming()
            if incoming is None:
                return data
            return resign(data, KEYS["bob"], transaction_id=incoming)
        try:
            username = stun.parse(data).get(Attr.USERNAME)
        except stun.StunError:
            return data
        name = username.decode("ascii", "replace") if username else ""
        if name not in KEYS:
            name = BY_ADDRESS.get(source, "alice")
        if mode == 3:
            return resign(data, KEYS[name])
        return resign(data, KEYS[name], replace={Attr.NONCE: self.nonce(name, source)})


def one_input(data: bytes) -> None:
    with transaction_ids(), no_logged_failures():
        server = Server()
        for flags, payload in records(data):
            steps = flags >> 4
            if steps:
                server.clock.advance(0.25 * 2 ** (steps - 1))
            source = SOURCES[flags & 3]
            datagram = server.authenticate(flags, payload, source)
            server.receive(datagram if datagram is not None else payload, source)
        for _ in range(8):
            server.clock.advance(2.0)
        server.protocol.expire()
        server.protocol.stop()
        check_counter(server.protocol.counters)


# -- seeds --------------------------------------------------------------------

TID = bytes.fromhex("a1a2a3a4a5a6a7a8a9aaabac")
SIGNED = 1 << 2  # flags: sign again, with a fresh nonce
AS_BOB = 2 << 2  # flags: bob's answer to the last Incoming


def _request(name: str, method: int, attributes: list[tuple[int, bytes]], n: int = 1) -> bytes:
    tid = TID[:-1] + bytes((n,))
    header = [
        (Attr.USERNAME, name.encode()),
        (Attr.SEQUENCE, stun.encode_u64(1_700_000_000_000_000 + n)),
        (Attr.NONCE, bytes(20)),
    ]
    body = attributes
    if method == Method.CONNECT:
        candidates = [
            Candidate(CandidateKind.HOST, "192.168.1.10", 40000),
            Candidate(CandidateKind.SRFLX, "192.0.2.10", 40000),
        ]
        body = [*attributes, *wire.encode_candidates(candidates, tid)]
    return wire.signed(method, MessageClass.REQUEST, tid, header + body, KEYS[name])


def _connect(n: int, peer: bytes = b"bob") -> bytes:
    return _request(
        "alice",
        Method.CONNECT,
        [(Attr.PEER, peer), (Attr.SERVICE, b"chat"), (Attr.TUNNEL_ID, bytes(range(16)))],
        n,
    )


def _incoming_answer(cls: MessageClass, attributes: list[tuple[int, bytes]]) -> bytes:
    return wire.signed(Method.INCOMING, cls, TID, attributes, KEYS["bob"])


def seeds() -> Iterable[bytes]:
    register = _request("alice", Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(60))])
    binding = stun.build(Method.BINDING, MessageClass.REQUEST, TID, fingerprint=True)
    accept = _incoming_answer(
        MessageClass.SUCCESS,
        [
            (Attr.TUNNEL_NONCE, bytes(16)),
            *wire.encode_candidates([Candidate(CandidateKind.HOST, "10.0.0.2", 50000)], TID),
        ],
    )
    yield record(0, binding)
    yield record(0, stun.build(Method.BINDING, MessageClass.REQUEST, TID, [(0x7777, b"x")]))
    yield record(0, register)  # no nonce yet: earns a 438
    yield record(3, register)  # from a stranger's address
    yield record(SIGNED, register)
    yield record(SIGNED, register) + record(SIGNED | 0x10, register)  # a retransmission
    yield record(SIGNED, _request("alice", Method.REGISTER, [(Attr.LIFETIME, bytes(4))], 2))
    yield record(SIGNED, _request("alice", Method.PEERS, [], 3))
    yield record(SIGNED, _request("alice", Method.PEERS, [(Attr.PEER, b"aaa")], 4))
    yield record(SIGNED | 2, _request("carol", Method.PEERS, [(0x7777, b"x")], 5))
    yield record(SIGNED, _connect(6)) + record(AS_BOB | 1, accept)
    yield record(SIGNED, _connect(7)) + record(
        AS_BOB | 1, _incoming_answer(MessageClass.ERROR, wire.error_attributes(460))
    )
    yield record(SIGNED, _connect(8)) + record(0x80, b"")  # bob never answers: a 408
    yield record(SIGNED, _connect(9, b"carol"))
    yield record(SIGNED, _connect(10, b"alice"))
    yield b"".join(record(SIGNED, _connect(20 + i)) for i in range(6))  # past max_pending
