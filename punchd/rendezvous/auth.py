"""
Who may ask the rendezvous for something, and whether a request is new.

L{Gate} turns a datagram into an L{AgentRequest} only once its
MESSAGE-INTEGRITY-SHA256 checks out under a key derived from the peers file
(L{Gate.authenticate}), then lets it through only when it is fresh: a valid
address-bound nonce, no unknown attribute, not a retransmission of
something answered or in progress, and a sequence number the agent's
replay window has not seen (L{Gate.admit}).  A number too old for the
window, or far ahead of the server's clock, gets a signed answer naming
where to resume, so that an agent that once ran with a wrong clock is not
locked out.  Until then nothing is kept,
and an unauthenticated sender never gets more bytes back than it sent.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from punchd import stun, wire
from punchd.config import PeerEntry
from punchd.keys import PrivateKey, derive_rendezvous_key
from punchd.rendezvous.answers import RecentAnswers
from punchd.rendezvous.limits import Counters, SourceLimiter
from punchd.rendezvous.registry import ReplayWindow
from punchd.stun import Attr, MessageClass

log = Logger()

NONCE_BUCKET = 60.0
NONCE_BUCKETS_VALID = 5
#: Answered with the SEQUENCE to resume from (docs/protocol.rst).
BAD_SEQUENCE = 439
#: How far ahead of the server's clock an agent's numbers may run.
SEQUENCE_AHEAD = 3600.0
#: Lines about refused requests: one per source address a minute, this many a minute in all.
REFUSAL_LINES_PER_MINUTE = 10

Address = tuple[str, int]


class Directory:
    """
    The peers file as the server uses it: entries and their message keys.
    """

    def __init__(self, server_key: PrivateKey, peers: Mapping[str, PeerEntry]) -> None:
        self._server_key = server_key
        self._peers = dict(peers)
        self._keys: dict[str, bytes] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._peers

    def names(self) -> list[str]:
        return sorted(self._peers)

    def entry(self, name: str) -> PeerEntry | None:
        return self._peers.get(name)

    def key_for(self, name: str) -> bytes | None:
        key = self._keys.get(name)
        if key is None:
            entry = self._peers.get(name)
            if entry is None:
                return None
            try:
                key = derive_rendezvous_key(self._server_key, entry.public_key, name)
            except ValueError:
                log.warn("peer {peer} has an unusable public key", peer=name)
                return None
            self._keys[name] = key
        return key


class Nonces:
    """
    Stateless, address-bound nonces (a minute bucket plus an HMAC of it and
    the source address under a secret that dies with the process).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._secret = os.urandom(32)

    def _mac(self, bucket: int, address: Address) -> bytes:
        message = b"%d|%s|%d" % (bucket, address[0].encode(), address[1])
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:16]

    def issue(self, address: Address) -> bytes:
        bucket = int(self._clock.seconds() // NONCE_BUCKET)
        return bucket.to_bytes(4, "big") + self._mac(bucket, address)

    def valid(self, nonce: bytes | None, address: Address) -> bool:
        if nonce is None or len(nonce) != 20:
            return False
        bucket = int.from_bytes(nonce[:4], "big")
        now = int(self._clock.seconds() // NONCE_BUCKET)
        if not 0 <= now - bucket < NONCE_BUCKETS_VALID:
            return False
        return hmac.compare_digest(nonce[4:], self._mac(bucket, address))


class RefusalLog:
    """
    Says, now and then, that a request was refused and why: an agent whose
    name or key is wrong learns nothing from an unsigned 401 it cannot
    trust, so the admin needs this line.  Per source address (IP and port,
    so that two agents behind one NAT are both named) at most once a
    minute, and a few a minute in all, in constant memory (anyone can send
    these); never a key or a signature.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._per_source = SourceLimiter(1 / 60, 1, clock.seconds)
        rate = REFUSAL_LINES_PER_MINUTE
        self._overall = SourceLimiter(rate / 60, rate, clock.seconds, slots=1)
        self._unlogged = 0

    def refused(self, source: Address, name: str | None, known: bool) -> None:
        address = wire.format_address(source)
        if not self._per_source.allow(address):
            return
        if not self._overall.allow(""):
            self._unlogged += 1
            return
        if name is None:
            why = "without a valid agent name"
        elif not known:
            why = f"as agent {name!r}, which is not in the peers file"
        else:
            why = (
                f"as agent {name!r} with a bad signature (that agent's private key does not "
                "match its public key in the peers file, or its rendezvous_public_key is not ours)"
            )
        unlogged, self._unlogged = self._unlogged, 0
        log.warn(
            "refused a request from {address} {why}{more}",
            address=address,
            why=why,
            more=f" ({unlogged} other sources' refusals not logged)" if unlogged else "",
        )


@dataclass
class AgentRequest:
    """
    An authenticated request: who sent it, from where, and how to answer it.
    """

    name: str
    entry: PeerEntry
    key: bytes = field(repr=False)
    message: stun.Message
    source: Address
    size: int
    sequence: int = -1

    @property
    def transaction_id(self) -> bytes:
        return self.message.transaction_id

    def sign(self, cls: MessageClass, attributes: list[tuple[int, bytes]]) -> bytes:
        return wire.signed(self.message.method, cls, self.transaction_id, attributes, self.key)


class Gate:
    """
    Authentication and admission of agent requests (see the module docstring).

    C{send} sends a datagram; C{answer} sends and remembers a final answer;
    C{in_progress} tells whether a request is still being worked on (an
    introduction), so that its retransmission is not taken for a replay.
    """

    def __init__(
        self,
        directory: Directory,
        clock: IReactorTime,
        counters: Counters,
        error_limiter: SourceLimiter,
        answers: RecentAnswers,
        send: Callable[[bytes, Address], None],
        in_progress: Callable[[str, bytes], bool],
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._counters = counters
        self._error_limiter = error_limiter
        self._answers = answers
        self._send = send
        self._in_progress = in_progress
        self._nonces = Nonces(clock)
        self._refusals = RefusalLog(clock)
        # One window per peer for the life of the process, not per
        # registration: a lapse must not reopen old sequence numbers.
        self._windows: dict[str, ReplayWindow] = {}

    def forget(self, name: str) -> None:
        """
        C{name} left the peers file: its replay window goes with it.
        """
        self._windows.pop(name, None)

    # -- authenticate -----------------------------------------------------

    def authenticate(
        self, message: stun.Message, source: Address, size: int
    ) -> AgentRequest | None:
        """
        The request, if its USERNAME names a peer and its integrity checks
        out under that peer's key; otherwise count it, maybe answer a small
        unsigned 401, and return None.
        """
        try:
            name = wire.decode_name(message.get(Attr.USERNAME), "username")
        except wire.ProtocolError:
            self._counters["refused-bad-username"] += 1
            self._refusals.refused(source, None, False)
            self._unauthorized(message, source, size)
            return None
        entry = self.directory.entry(name)
        key = self.directory.key_for(name)
        if entry is None or key is None or not stun.verify_integrity_sha256(message, key):
            reason = "unknown-name" if entry is None else "bad-signature"
            self._counters["refused-" + reason] += 1
            self._refusals.refused(source, name, entry is not None)
            self._unauthorized(message, source, size)
            return None
        return AgentRequest(name, entry, key, message, source, size)

    def _unauthorized(self, message: stun.Message, source: Address, size: int) -> None:
        self._counters["dropped-unauthenticated"] += 1
        if not self._error_limiter.allow(source[0]):
            return
        reply = stun.build(
            message.method, MessageClass.ERROR, message.transaction_id, wire.error_attributes(401)
        )
        self._send_no_larger(reply, source, size)

    def _send_no_larger(self, reply: bytes, source: Address, size: int) -> None:
        # Anyone may forge a source address or replay a captured request from
        # any address: what goes back to it is never larger than what came.
        if len(reply) <= size:
            self._send(reply, source)
        else:
            self._counters["dropped-reply-larger-than-request"] += 1

    # -- admit --------------------------------------------------------------

    def admit(self, request: AgentRequest, answer: Callable[[AgentRequest, bytes], None]) -> bool:
        """
        Whether C{request} is fresh and new and should be carried out;
        C{answer} sends (and remembers) a final answer to it.
        """
        return (
            self._fresh(request)
            and self._understood(request)
            and not self._repeated(request)
            and self._in_sequence(request, answer)
        )

    def _fresh(self, request: AgentRequest) -> bool:
        if self._nonces.valid(request.message.get(Attr.NONCE), request.source):
            return True
        self._counters["stale-nonce"] += 1
        if self._error_limiter.allow(request.source[0]):
            nonce = self._nonces.issue(request.source)
            stale = request.sign(
                MessageClass.ERROR, [*wire.error_attributes(438), (Attr.NONCE, nonce)]
            )
            self._send_no_larger(stale, request.source, request.size)
        return False

    def _understood(self, request: AgentRequest) -> bool:
        unknown = request.message.unknown_required(wire.KNOWN_ATTRIBUTES)
        if not unknown:
            return True
        self._counters["unknown-attribute"] += 1
        listed = stun.encode_unknown_attributes(unknown)
        reply = request.sign(
            MessageClass.ERROR, [*wire.error_attributes(420), (Attr.UNKNOWN_ATTRIBUTES, listed)]
        )
        self._send(reply, request.source)
        return False

    def _repeated(self, request: AgentRequest) -> bool:
        """
        A retransmission: answered again from the cache, or still being worked on.
        """
        cached = self._answers.lookup(request.name, request.transaction_id)
        if cached is not None:
            if cached.address == request.source:
                self._counters["retransmission"] += 1
                self._send(cached.data, request.source)
            return True
        if self._in_progress(request.name, request.transaction_id):
            self._counters["retransmission"] += 1
            return True
        return False

    def _in_sequence(
        self, request: AgentRequest, answer: Callable[[AgentRequest, bytes], None]
    ) -> bool:
        value = request.message.get(Attr.SEQUENCE)
        if value is None or len(value) != 8:
            answer(request, request.sign(MessageClass.ERROR, wire.error_attributes(400)))
            return False
        request.sequence = stun.decode_u64(value)
        window = self._windows.setdefault(request.name, ReplayWindow())
        if window.too_old(request.sequence) or request.sequence > self._latest_plausible():
            self._resynchronise(request, window)
            return False
        if not window.accept(request.sequence):
            self._counters["dropped-replay"] += 1
            return False
        return True

    def _latest_plausible(self) -> int:
        """
        The highest sequence number an agent whose clock is roughly right
        can use now: agents number from their start time in microseconds.
        """
        return int((self._clock.seconds() + SEQUENCE_AHEAD) * 1_000_000)

    def _resynchronise(self, request: AgentRequest, window: ReplayWindow) -> None:
        """
        Tell an agent whose numbers fell behind its window (it restarted after
        running with a clock far ahead), or run far ahead of the server's clock,
        where to number from.  Only with a valid nonce, signed, rate-limited,
        no larger than the request; nothing changes here, so a replay earns
        only an answer the agent ignores.
        """
        self._counters["sequence-resync"] += 1
        if not self._error_limiter.allow(request.source[0]):
            return
        resume = max(window.highest + 1, int(self._clock.seconds() * 1_000_000))
        reply = request.sign(
            MessageClass.ERROR,
            [
                *wire.error_attributes(BAD_SEQUENCE, "Sequence Out Of Window"),
                (Attr.SEQUENCE, stun.encode_u64(resume)),
            ],
        )
        self._send_no_larger(reply, request.source, request.size)
