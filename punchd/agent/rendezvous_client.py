"""
The agent's main UDP socket: authenticated requests to the rendezvous, and
the introductions it forwards to us.

This is the transport under the registration machine and the tunnels: it
signs, numbers, retransmits and matches requests, follows the server's
nonces, and never acts on a datagram that does not verify.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.stream import RendezvousStream
from punchd.retransmit import Backoff, Transactions
from punchd.stun import Attr, MessageClass, Method

log = Logger()

# 8.1 s in all.
REQUEST_BACKOFF = Backoff(initial=0.3, maximum=1.5, attempts=7)
# 11.1 s: longer than the rendezvous holds an introduction for a silent peer
# (8.75 s), so that its answer (a 408 at worst) still finds us waiting; the
# tunnel's own timeout ends it sooner when the program asked for less.
CONNECT_BACKOFF = Backoff(initial=0.3, maximum=1.5, attempts=9)
RECENT_INCOMING = 256
STALE_NONCE = 438
BAD_SEQUENCE = 439
UNAUTHORIZED = 401
#: Unsigned 401s one request must draw (and nothing signed) before it ends as refused.
REFUSALS_TO_GIVE_UP = 2

#: What an Incoming handler answers: the reply class and its attributes.
IncomingAnswer = tuple[MessageClass, list[tuple[int, bytes]]]
Attributes = Sequence[tuple[int, bytes]] | Callable[[bytes], Sequence[tuple[int, bytes]]]


class RendezvousError(Exception):
    """
    The rendezvous answered a request with an error.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.name = wire.ERROR_NAMES.get(code, "internal")


class Refused(RendezvousError):
    """
    The rendezvous refused our credentials: a request drew only unsigned
    401s.  Anyone on the path could forge those, so this is a strong hint
    (a wrong name or key), not proof; C{str()} says it in words.
    """

    def __init__(self, explanation: str = "the rendezvous refused our credentials") -> None:
        super().__init__(UNAUTHORIZED, "Unauthorized")
        self.args = (explanation,)

    def __str__(self) -> str:
        return str(self.args[0])


class RendezvousClient(DatagramProtocol):
    """
    Speaks for one agent to one rendezvous server.
    """

    noisy = False

    def __init__(
        self,
        name: str,
        key: bytes,
        clock: IReactorTime,
        on_incoming: Callable[[stun.Message], Deferred[IncomingAnswer]],
    ) -> None:
        self.name = name
        self._key = key
        self._clock = clock
        self._on_incoming = on_incoming
        self.server: tuple[str, int] | None = None
        #: The TLS connection to the rendezvous, when UDP to it is blocked:
        #: requests and answers travel on it instead (punchd.agent.stream).
        self.stream: RendezvousStream | None = None
        self._nonce: bytes | None = None
        self._sequence = time.time_ns() // 1000
        self._transactions: Transactions[stun.Message] = Transactions(clock)
        self._incoming: OrderedDict[bytes, bytes | None] = OrderedDict()
        self._refusals: dict[bytes, int] = {}
        self.counters: Counter[str] = Counter()

    # -- requests ---------------------------------------------------------

    def request(
        self,
        method: int,
        attributes: Attributes = (),
        backoff: Backoff | None = None,
    ) -> Deferred[stun.Message]:
        """
        Send an authenticated request; fire with the verified success
        response, or fail with L{RendezvousError} or L{RequestTimedOut}.
        C{attributes} may be a function of the transaction id, for values
        (like candidates) encoded with it.  C{backoff} defaults to
        L{CONNECT_BACKOFF} for Connect, L{REQUEST_BACKOFF} otherwise.
        """
        if backoff is None:
            backoff = CONNECT_BACKOFF if method == Method.CONNECT else REQUEST_BACKOFF
        return self._attempt(method, attributes, backoff, {STALE_NONCE: 2, BAD_SEQUENCE: 1})

    def _attempt(
        self,
        method: int,
        attributes: Attributes,
        backoff: Backoff,
        retries: dict[int, int],
    ) -> Deferred[stun.Message]:
        transaction_id = stun.new_transaction_id()
        self._sequence += 1
        header: list[tuple[int, bytes]] = [
            (Attr.USERNAME, self.name.encode("ascii")),
            (Attr.SEQUENCE, stun.encode_u64(self._sequence)),
        ]
        # Always a NONCE, even a blank one before the server has issued any:
        # the server's 438 answer is never larger than the request it answers.
        header.append((Attr.NONCE, self._nonce if self._nonce is not None else bytes(20)))
        body = list(attributes(transaction_id) if callable(attributes) else attributes)
        data = wire.signed(method, MessageClass.REQUEST, transaction_id, header + body, self._key)
        d = self._transactions.start(transaction_id, lambda: self._send(data), backoff)

        def answered(message: stun.Message) -> stun.Message | Deferred[stun.Message]:
            if message.cls == MessageClass.SUCCESS:
                return message
            code, reason = wire.error_of(message)
            if code == UNAUTHORIZED:
                raise Refused()
            if retries.get(code, 0) > 0 and self._follow(code, message):
                left = {c: n - (c == code) for c, n in retries.items()}
                return self._attempt(method, attributes, backoff, left)
            raise RendezvousError(code, reason)

        return d.addCallback(answered)

    def _follow(self, code: int, message: stun.Message) -> bool:
        """
        Take a (verified) 438's fresh nonce, or a 439's sequence number to
        resume from; True if the request should go again at once (each has
        its own budget of retries per request, in C{_attempt}).
        """
        nonce = message.get(Attr.NONCE)
        if code == STALE_NONCE and nonce is not None:
            self._nonce = nonce
            return True
        resume = message.get(Attr.SEQUENCE)
        if code == BAD_SEQUENCE and resume is not None and len(resume) == 8:
            # Our numbers fell behind the window the rendezvous keeps for us
            # (we once ran with a clock far ahead), or ran far ahead of its
            # clock: number from where it says.
            log.info("the rendezvous resynchronised our request numbers")
            self._sequence = stun.decode_u64(resume) - 1
            return True
        return False

    def _send(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.send_signalling(data)
        elif self.transport is not None and self.server is not None:
            try:
                self.transport.write(data, self.server)
            except OSError as e:
                log.debug("send to rendezvous failed: {error}", error=e)

    def cancel_all(self) -> None:
        self._transactions.cancel_all()

    # -- datagrams in -----------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            self._received(datagram, (addr[0], addr[1]))
        except Exception:
            self.counters["internal-error"] += 1
            log.failure("unexpected error handling a datagram from the rendezvous")

    def from_stream(self, message: bytes) -> None:
        """
        A signalling frame from the TLS stream: what the server would have
        sent us over UDP.
        """
        if self.server is not None:
            self.datagramReceived(message, self.server)

    def _received(self, datagram: bytes, source: tuple[str, int]) -> None:
        if self.server is None or wire.normalize_address(source) != self.server:
            self.counters["dropped-stranger"] += 1
            return
        try:
            message = stun.parse(datagram)
        except stun.StunError:
            self.counters["dropped-malformed"] += 1
            return
        if message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            if message.transaction_id not in self._transactions:
                self.counters["dropped-unsolicited"] += 1
                return
            if stun.verify_integrity_sha256(message, self._key):
                self._transactions.answer(message.transaction_id, message)
            else:
                self.counters["dropped-unauthenticated"] += 1
                self._refused(message)
        elif message.cls == MessageClass.REQUEST and message.method == Method.INCOMING:
            if not stun.verify_integrity_sha256(message, self._key):
                self.counters["dropped-unauthenticated"] += 1
                return
            self._incoming_request(message, source)
        else:
            self.counters["dropped-unexpected"] += 1

    def _refused(self, message: stun.Message) -> None:
        """
        An unsigned 401 to a request in flight.  It may be forged, so one
        changes nothing; a second one for the same request, with nothing
        signed in between, ends it as L{Refused}.
        """
        if message.cls != MessageClass.ERROR or wire.error_of(message)[0] != UNAUTHORIZED:
            return
        transaction_id = message.transaction_id
        self.counters["refused"] += 1
        count = self._refusals.get(transaction_id, 0) + 1
        if count < REFUSALS_TO_GIVE_UP:
            if len(self._refusals) >= 64:
                self._refusals = {
                    t: n for t, n in self._refusals.items() if t in self._transactions
                }
            self._refusals[transaction_id] = count
            return
        self._refusals.pop(transaction_id, None)
        self._transactions.answer(transaction_id, message)

    def _incoming_request(self, message: stun.Message, source: tuple[str, int]) -> None:
        transaction_id = message.transaction_id
        if transaction_id in self._incoming:
            answer = self._incoming[transaction_id]
            if answer is not None:
                self._send(answer)
            return
        self._incoming[transaction_id] = None
        while len(self._incoming) > RECENT_INCOMING:
            self._incoming.popitem(last=False)

        def reply(result: IncomingAnswer) -> None:
            cls, attributes = result
            data = wire.signed(Method.INCOMING, cls, transaction_id, attributes, self._key)
            self._incoming[transaction_id] = data
            self._send(data)

        def failed(failure: Failure) -> None:
            log.failure("handling an introduction failed", failure)
            reply((MessageClass.ERROR, wire.error_attributes(403)))

        maybeDeferred(self._on_incoming, message).addCallbacks(reply, failed)
