"""
The agent's rendezvous-client datagram handler,
C{RendezvousClient.datagramReceived}, on a fake clock and transport.

Before the input, the client has three requests out (Register, Peers and a
Connect with candidates).  An input is up to eight datagrams
(L{fuzz.harness.records}); each one's flags byte picks

  - bit 0, its source: the rendezvous or a stranger;
  - bits 1-2, its authentication: 0 as it is; 1 signed again under the
    agent's key; 2 signed again as the answer to one of the requests out
    (bits 3-4 pick which, counting back from the last sent); 3 as 1;
  - bits 5-7, the seconds to let pass first: 0, or 0.3 * 2**(n-1).

Afterwards the clock runs on until every request has been answered or has
timed out; each must end in an answer or one of the documented errors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fuzz.harness import (
    Address,
    Crash,
    FakeDatagramTransport,
    check_counter,
    no_logged_failures,
    record,
    records,
    resign,
    transaction_ids,
)
from punchd import stun, wire
from punchd.agent.rendezvous_client import IncomingAnswer, RendezvousClient, RendezvousError
from punchd.retransmit import Backoff, RequestTimedOut
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind

KEY = bytes(range(100, 132))
SERVER: Address = ("192.0.2.1", 3478)
STRANGER: Address = ("203.0.113.99", 3478)
#: Three sends a second apart: timeouts come soon, and cheaply.
BACKOFF = Backoff(initial=1.0, maximum=1.0, attempts=3)
CANDIDATES = [
    Candidate(CandidateKind.HOST, "192.168.1.10", 40000),
    Candidate(CandidateKind.SRFLX, "2001:db8::10", 40000),
]


def on_incoming(message: stun.Message) -> Deferred[IncomingAnswer]:
    """
    Accept or refuse the way the agent core does, from what the request says.
    """
    try:
        wire.decode_name(message.get(Attr.PEER), "peer")
        wire.decode_name(message.get(Attr.SERVICE), "service")
        wire.decode_tunnel_id(message)
        wire.decode_candidates(message)
    except wire.ProtocolError as e:
        return succeed((MessageClass.ERROR, wire.error_attributes(e.code)))
    return succeed(
        (
            MessageClass.SUCCESS,
            [
                (Attr.TUNNEL_NONCE, bytes(16)),
                *wire.encode_candidates(CANDIDATES, message.transaction_id),
            ],
        )
    )


def _expected(failure: Failure) -> None:
    if not failure.check(RendezvousError, RequestTimedOut, CancelledError):
        raise Crash(f"a request failed with {failure.getTraceback()}")


class Agent:
    """
    One fresh client per input with three requests out.
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.client = RendezvousClient("alice", KEY, self.clock, on_incoming)
        self.client.server = SERVER
        self.transport = FakeDatagramTransport()
        self.client.makeConnection(self.transport)  # type: ignore[arg-type]
        self.results: list[Any] = []
        self.requests = [
            self.client.request(Method.REGISTER, [(Attr.LIFETIME, stun.encode_u32(60))], BACKOFF),
            self.client.request(Method.PEERS, (), BACKOFF),
            self.client.request(
                Method.CONNECT,
                lambda tid: [
                    (Attr.PEER, b"bob"),
                    (Attr.SERVICE, b"chat"),
                    (Attr.TUNNEL_ID, bytes(16)),
                    *wire.encode_candidates(CANDIDATES, tid),
                ],
                BACKOFF,
            ),
        ]
        for d in self.requests:
            d.addCallbacks(self.results.append, _expected)

    def sent_requests(self) -> list[bytes]:
        """
        Transaction ids of the requests sent, most recent first.
        """
        found: list[bytes] = []
        for data, _ in reversed(self.transport.written):
            message = stun.parse(data)
            if message.cls == MessageClass.REQUEST and message.transaction_id not in found:
                found.append(message.transaction_id)
        return found

    def authenticate(self, flags: int, data: bytes) -> bytes | None:
        mode = (flags >> 1) & 3
        if mode == 0:
            return data
        if mode == 2:
            sent = self.sent_requests()
            if sent:
                return resign(data, KEY, transaction_id=sent[((flags >> 3) & 3) % len(sent)])
        return resign(data, KEY)


def one_input(data: bytes) -> None:
    with transaction_ids(), no_logged_failures():
        agent = Agent()
        for flags, payload in records(data):
            steps = flags >> 5
            if steps:
                agent.clock.advance(0.3 * 2 ** (steps - 1))
            datagram = agent.authenticate(flags, payload)
            source = STRANGER if flags & 1 else SERVER
            agent.client.datagramReceived(datagram if datagram is not None else payload, source)
        for _ in range(20):  # each retransmission schedules the next: step by step
            if all(d.called for d in agent.requests):
                break
            agent.clock.advance(1.0)
        if any(not d.called for d in agent.requests):
            raise Crash("a request neither answered nor timed out")
        for message in agent.results:
            if message.cls != MessageClass.SUCCESS:
                raise Crash(f"a request succeeded with a {message.cls!r}")
        check_counter(agent.client.counters)


# -- seeds --------------------------------------------------------------------

TID = bytes.fromhex("b1b2b3b4b5b6b7b8b9babbbc")
ANSWER = 2 << 1  # flags: sign again as the answer to the last request sent


def _answer(method: int, cls: MessageClass, attributes: list[tuple[int, bytes]]) -> bytes:
    return wire.signed(method, cls, TID, attributes, KEY)


def seeds() -> Iterable[bytes]:
    registered = _answer(
        Method.REGISTER,
        MessageClass.SUCCESS,
        [
            (Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address("198.51.100.7", 40000, TID)),
            (Attr.LIFETIME, stun.encode_u32(60)),
        ],
    )
    stale = _answer(
        Method.PEERS,
        MessageClass.ERROR,
        [*wire.error_attributes(438), (Attr.NONCE, bytes(range(20)))],
    )
    peers = _answer(
        Method.PEERS,
        MessageClass.SUCCESS,
        [(Attr.PEER, b"bob"), (Attr.PEER, b"carol"), (Attr.MORE, b"")],
    )
    connected = _answer(
        Method.CONNECT,
        MessageClass.SUCCESS,
        [
            (Attr.PUBLIC_KEY, bytes(32)),
            (Attr.TUNNEL_NONCE, bytes(16)),
            *wire.encode_candidates(CANDIDATES, TID),
        ],
    )
    incoming = wire.signed(
        Method.INCOMING,
        MessageClass.REQUEST,
        TID,
        [
            (Attr.PEER, b"bob"),
            (Attr.SERVICE, b"chat"),
            (Attr.TUNNEL_ID, bytes(range(16))),
            (Attr.PUBLIC_KEY, bytes(32)),
            *wire.encode_candidates(CANDIDATES, TID),
        ],
        KEY,
    )
    # Transaction ids count from 1 in one_input: this answers the Connect, unsigned.
    unsigned_401 = stun.build(
        Method.CONNECT, MessageClass.ERROR, (3).to_bytes(12, "big"), wire.error_attributes(401)
    )
    yield record(ANSWER | (2 << 3), registered)
    yield record(ANSWER | (1 << 3), peers)
    yield record(ANSWER, connected)
    yield record(ANSWER, stale) + record(ANSWER, stale) + record(ANSWER, stale)
    yield record(ANSWER, _answer(Method.CONNECT, MessageClass.ERROR, wire.error_attributes(480)))
    yield record(0, incoming) + record(0x20, incoming)  # and its retransmission
    yield record(2, incoming)
    yield record(1, incoming)  # from a stranger
    yield record(0, unsigned_401)
    yield record(0, stun.build(Method.BINDING, MessageClass.REQUEST, TID))
