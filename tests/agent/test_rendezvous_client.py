"""
The agent's signalling transport, with a fake clock and a fake UDP transport
standing in for the rendezvous.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.rendezvous_client import (
    REQUEST_BACKOFF,
    IncomingAnswer,
    Refused,
    RendezvousClient,
    RendezvousError,
)
from punchd.retransmit import RequestTimedOut
from punchd.stun import Attr, MessageClass, Method

KEY = bytes(range(32))
WRONG_KEY = bytes(range(1, 33))
SERVER = ("203.0.113.1", 3478)
STRANGER = ("203.0.113.66", 3478)


class FakeTransport:
    """
    Records what the client writes instead of sending it.
    """

    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        self.written.append((data, address))

    def messages(self) -> list[stun.Message]:
        return [stun.parse(data) for data, _ in self.written]


class Handler:
    """
    The agent's side of introductions: counts calls, answers when told.
    """

    def __init__(self) -> None:
        self.calls: list[stun.Message] = []
        self.pending: list[Deferred[IncomingAnswer]] = []

    def __call__(self, message: stun.Message) -> Deferred[IncomingAnswer]:
        self.calls.append(message)
        d: Deferred[IncomingAnswer] = Deferred()
        self.pending.append(d)
        return d


def advance(clock: Clock, amount: float) -> None:
    """
    Move C{clock} on by C{amount}, running each call at its own time.
    """
    target = clock.seconds() + amount
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
        if not due:
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    clock.advance(target - clock.seconds())


def outcome(d: Deferred[stun.Message]) -> list[object]:
    results: list[object] = []
    d.addBoth(results.append)
    return results


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.transport = FakeTransport()
        self.handler = Handler()
        self.client = RendezvousClient("alice", KEY, self.clock, self.handler)
        self.client.makeConnection(self.transport)  # type: ignore[arg-type]
        self.client.server = SERVER

    def last_request(self) -> stun.Message:
        return self.transport.messages()[-1]

    def reply(
        self,
        request: stun.Message,
        cls: MessageClass = MessageClass.SUCCESS,
        attributes: list[tuple[int, bytes]] | None = None,
        key: bytes | None = KEY,
        source: tuple[str, int] = SERVER,
        transaction_id: bytes | None = None,
    ) -> None:
        tid = transaction_id or request.transaction_id
        data = stun.build(
            request.method,
            cls,
            tid,
            attributes or [],
            integrity_sha256=key,
            fingerprint=True,
        )
        self.client.datagramReceived(data, source)

    def incoming(
        self, transaction_id: bytes, key: bytes = KEY, source: tuple[str, int] = SERVER
    ) -> None:
        data = wire.signed(
            Method.INCOMING,
            MessageClass.REQUEST,
            transaction_id,
            [(Attr.PEER, b"bob"), (Attr.SERVICE, b"chat")],
            key,
        )
        self.client.datagramReceived(data, source)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_request_is_signed_under_the_key(rig: Rig) -> None:
    outcome(rig.client.request(Method.PEERS, [(Attr.PEER, b"bob")]))
    ((data, address),) = rig.transport.written
    assert address == SERVER
    message = stun.parse(data)  # also checks FINGERPRINT
    assert message.method == Method.PEERS and message.cls == MessageClass.REQUEST
    assert stun.verify_integrity_sha256(message, KEY)
    assert not stun.verify_integrity_sha256(message, WRONG_KEY)
    assert message.get(Attr.USERNAME) == b"alice"
    assert message.get(Attr.PEER) == b"bob"
    assert message.get(Attr.SEQUENCE) is not None
    # No nonce issued yet: a blank one keeps the request larger than a 438.
    assert message.get(Attr.NONCE) == bytes(20)


def test_attributes_may_depend_on_the_transaction_id(rig: Rig) -> None:
    outcome(rig.client.request(Method.CONNECT, lambda tid: [(Attr.TUNNEL_ID, tid + b"\0" * 4)]))
    message = rig.last_request()
    assert message.get(Attr.TUNNEL_ID) == message.transaction_id + b"\0" * 4


def test_sequence_increases_and_retransmissions_repeat_it(rig: Rig) -> None:
    outcome(rig.client.request(Method.PEERS))
    outcome(rig.client.request(Method.PEERS))
    first, second = rig.transport.messages()
    seq = [stun.decode_u64(m.get(Attr.SEQUENCE) or b"") for m in (first, second)]
    assert seq[1] == seq[0] + 1
    advance(rig.clock, REQUEST_BACKOFF.initial)
    again = rig.transport.written[2:]
    assert [data for data, _ in again] == [first.raw, second.raw]


def test_success_fires_with_the_verified_message(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.REGISTER))
    request = rig.last_request()
    rig.reply(request, attributes=[(Attr.LIFETIME, stun.encode_u32(80))])
    (message,) = results
    assert isinstance(message, stun.Message)
    assert message.get(Attr.LIFETIME) == stun.encode_u32(80)
    advance(rig.clock, 60)
    assert len(rig.transport.written) == 1


def test_responses_are_matched_by_transaction_id(rig: Rig) -> None:
    first = outcome(rig.client.request(Method.PEERS, [(Attr.PEER, b"a")]))
    second = outcome(rig.client.request(Method.PEERS, [(Attr.PEER, b"b")]))
    request_a, request_b = rig.transport.messages()
    rig.reply(request_a, transaction_id=b"z" * 12)
    assert first == [] and second == []
    assert rig.client.counters["dropped-unsolicited"] == 1
    rig.reply(request_b, attributes=[(Attr.PEER, b"for-b")])
    assert first == []
    assert isinstance(second[0], stun.Message) and second[0].get(Attr.PEER) == b"for-b"
    rig.reply(request_a, attributes=[(Attr.PEER, b"for-a")])
    assert isinstance(first[0], stun.Message) and first[0].get(Attr.PEER) == b"for-a"


def test_stale_nonce_retries_at_once_with_the_new_nonce(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.PEERS, [(Attr.PEER, b"bob")]))
    first = rig.last_request()
    rig.reply(
        first,
        MessageClass.ERROR,
        [*wire.error_attributes(438), (Attr.NONCE, b"fresh-nonce-1")],
    )
    assert results == []
    assert len(rig.transport.written) == 2
    retry = rig.last_request()
    assert retry.transaction_id != first.transaction_id
    assert retry.get(Attr.NONCE) == b"fresh-nonce-1"
    assert retry.get(Attr.PEER) == b"bob"
    assert stun.verify_integrity_sha256(retry, KEY)
    # The abandoned transaction is not retransmitted; the new one is.
    advance(rig.clock, REQUEST_BACKOFF.initial)
    assert [m.transaction_id for m in rig.transport.messages()[2:]] == [retry.transaction_id]
    rig.reply(retry)
    assert isinstance(results[0], stun.Message)
    # Later requests carry the nonce from the start.
    outcome(rig.client.request(Method.PEERS))
    assert rig.last_request().get(Attr.NONCE) == b"fresh-nonce-1"


def test_stale_nonce_retries_are_limited(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.PEERS))
    for n in range(3):
        rig.reply(
            rig.last_request(),
            MessageClass.ERROR,
            [*wire.error_attributes(438), (Attr.NONCE, b"nonce-%d" % n)],
        )
    assert len(rig.transport.written) == 3
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(RendezvousError)
    assert failure.value.code == 438


def test_error_response_fails_with_its_code(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.CONNECT))
    rig.reply(rig.last_request(), MessageClass.ERROR, wire.error_attributes(480))
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(RendezvousError)
    error = failure.value
    assert (error.code, error.name, error.reason) == (480, "peer-offline", "Peer Offline")


def test_one_unsigned_401_changes_nothing(rig: Rig) -> None:
    """
    Anyone on the path may forge a 401: one alone does not end a request,
    and a signed answer after it still counts.
    """
    results = outcome(rig.client.request(Method.REGISTER))
    request = rig.last_request()
    rig.reply(request, MessageClass.ERROR, wire.error_attributes(401), key=None)
    assert results == []
    assert rig.client.counters["dropped-unauthenticated"] == 1
    rig.reply(request)
    assert isinstance(results[0], stun.Message)


def test_two_unsigned_401s_end_the_request_as_refused(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.REGISTER))
    request = rig.last_request()
    rig.reply(request, MessageClass.ERROR, wire.error_attributes(401), key=None)
    advance(rig.clock, REQUEST_BACKOFF.initial)
    rig.reply(request, MessageClass.ERROR, wire.error_attributes(401), key=None)
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(Refused)
    assert failure.value.name == "unauthorized"
    assert str(failure.value) == "the rendezvous refused our credentials"
    assert len(rig.transport.written) == 2
    advance(rig.clock, REQUEST_BACKOFF.total())
    assert len(rig.transport.written) == 2  # no more retransmissions


def test_unsigned_errors_other_than_401_are_ignored(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.PEERS))
    request = rig.last_request()
    for _ in range(3):
        rig.reply(request, MessageClass.ERROR, wire.error_attributes(480), key=None)
    assert results == []
    advance(rig.clock, REQUEST_BACKOFF.total())
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(RequestTimedOut)


def test_success_signed_with_another_key_is_ignored(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.PEERS))
    rig.reply(rig.last_request(), key=WRONG_KEY)
    assert results == []
    assert rig.client.counters["dropped-unauthenticated"] == 1


def test_request_times_out_after_the_backoff(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.PEERS))
    advance(rig.clock, REQUEST_BACKOFF.total())
    assert len(rig.transport.written) == REQUEST_BACKOFF.attempts
    assert len({data for data, _ in rig.transport.written}) == 1
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(RequestTimedOut)


def test_datagrams_from_strangers_are_dropped(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.PEERS))
    request = rig.last_request()
    rig.reply(request, source=STRANGER)
    rig.incoming(b"i" * 12, source=STRANGER)
    assert results == []
    assert rig.handler.calls == []
    assert len(rig.transport.written) == 1
    assert rig.client.counters["dropped-stranger"] == 2
    rig.reply(request, source=SERVER)
    assert isinstance(results[0], stun.Message)


def test_malformed_and_unexpected_datagrams_are_dropped(rig: Rig) -> None:
    rig.client.datagramReceived(b"\x00\x01 certainly not STUN", SERVER)
    rig.client.datagramReceived(
        stun.build(Method.BINDING, MessageClass.REQUEST, b"q" * 12, fingerprint=True), SERVER
    )
    assert rig.client.counters == {"dropped-malformed": 1, "dropped-unexpected": 1}
    assert rig.transport.written == []


def test_incoming_is_verified_and_answered(rig: Rig) -> None:
    rig.incoming(b"i" * 12)
    (message,) = rig.handler.calls
    assert message.get(Attr.PEER) == b"bob"
    rig.handler.pending[0].callback((MessageClass.SUCCESS, [(Attr.SERVICE, b"chat")]))
    ((data, address),) = rig.transport.written
    assert address == SERVER
    answer = stun.parse(data)
    assert answer.method == Method.INCOMING and answer.cls == MessageClass.SUCCESS
    assert answer.transaction_id == b"i" * 12
    assert stun.verify_integrity_sha256(answer, KEY)
    assert answer.get(Attr.SERVICE) == b"chat"


def test_incoming_with_bad_integrity_is_dropped(rig: Rig) -> None:
    rig.incoming(b"i" * 12, key=WRONG_KEY)
    assert rig.handler.calls == []
    assert rig.transport.written == []
    assert rig.client.counters["dropped-unauthenticated"] == 1


def test_duplicate_incoming_is_answered_from_cache(rig: Rig) -> None:
    rig.incoming(b"i" * 12)
    rig.incoming(b"i" * 12)  # while the handler still works: nothing to say yet
    assert len(rig.handler.calls) == 1
    assert rig.transport.written == []
    rig.handler.pending[0].callback((MessageClass.ERROR, wire.error_attributes(460)))
    rig.incoming(b"i" * 12)
    rig.incoming(b"i" * 12)
    assert len(rig.handler.calls) == 1
    answers = [data for data, _ in rig.transport.written]
    assert len(answers) == 3 and len(set(answers)) == 1
    assert wire.error_of(stun.parse(answers[0]))[0] == 460
    rig.incoming(b"j" * 12)
    assert len(rig.handler.calls) == 2


def test_failing_handler_rejects_the_introduction(rig: Rig) -> None:
    rig.client._on_incoming = lambda message: fail(RuntimeError("boom"))
    rig.incoming(b"i" * 12)
    (answer,) = rig.transport.messages()
    assert answer.cls == MessageClass.ERROR
    assert wire.error_of(answer)[0] == 403
    assert stun.verify_integrity_sha256(answer, KEY)


def test_synchronous_handler(rig: Rig) -> None:
    rig.client._on_incoming = lambda message: succeed((MessageClass.SUCCESS, []))
    rig.incoming(b"i" * 12)
    (answer,) = rig.transport.messages()
    assert answer.cls == MessageClass.SUCCESS


def test_nothing_is_sent_before_the_server_is_known() -> None:
    rig = Rig()
    rig.client.server = None
    results = outcome(rig.client.request(Method.PEERS))
    assert rig.transport.written == []
    rig.client.datagramReceived(b"anything", SERVER)
    assert rig.client.counters["dropped-stranger"] == 1
    rig.client.cancel_all()
    assert isinstance(results[0], Failure)


def test_sequence_resync_numbers_from_where_the_rendezvous_says(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.REGISTER, [(Attr.LIFETIME, b"\0\0\0\x3c")]))
    first = rig.last_request()
    resume = 1_700_000_000_000_000
    rig.reply(
        first,
        MessageClass.ERROR,
        [*wire.error_attributes(439), (Attr.SEQUENCE, stun.encode_u64(resume))],
    )
    assert results == []
    retry = rig.last_request()
    assert retry.transaction_id != first.transaction_id
    assert retry.get(Attr.SEQUENCE) == stun.encode_u64(resume)
    assert retry.get(Attr.LIFETIME) == b"\0\0\0\x3c"
    rig.reply(retry)
    assert isinstance(results[0], stun.Message)
    outcome(rig.client.request(Method.PEERS))
    assert rig.last_request().get(Attr.SEQUENCE) == stun.encode_u64(resume + 1)


def test_sequence_resync_is_followed_once_per_request_and_only_when_signed(rig: Rig) -> None:
    results = outcome(rig.client.request(Method.PEERS))
    before = rig.last_request().get(Attr.SEQUENCE)
    resync = [*wire.error_attributes(439), (Attr.SEQUENCE, stun.encode_u64(5))]
    rig.reply(rig.last_request(), MessageClass.ERROR, resync, key=None)
    assert len(rig.transport.written) == 1 and results == []
    rig.reply(rig.last_request(), MessageClass.ERROR, resync)
    assert len(rig.transport.written) == 2
    assert rig.last_request().get(Attr.SEQUENCE) == stun.encode_u64(5) != before
    rig.reply(rig.last_request(), MessageClass.ERROR, resync)
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(RendezvousError)
    assert failure.value.code == 439
