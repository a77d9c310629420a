"""
Connect and Incoming on the wire: the rendezvous forwards an initiator's
Connect to its target as a signed Incoming, and the target's answer back
as the Connect's final answer.  The bookkeeping of what is in flight is
L{Introductions}'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.relay import RelayRefused, RelayService
from punchd.rendezvous.answers import RecentAnswers
from punchd.rendezvous.auth import AgentRequest, Directory
from punchd.rendezvous.introductions import Introduction, Introductions
from punchd.rendezvous.limits import Counters
from punchd.rendezvous.registry import IRegistry, Registration
from punchd.retransmit import RequestTimedOut
from punchd.stun import Attr, MessageClass, Method

#: Bytes of a relay refusal's reason sent to the initiator, at most.
MAX_REFUSAL = 128

log = Logger()

Address = tuple[str, int]
Attributes = list[tuple[int, bytes]]

#: Answered to a Connect for a target on another node while that node
#: cannot be reached (the service's Redis is down).
UNAVAILABLE = 503


class Remote(Protocol):
    """
    The other nodes of a rendezvous service (L{punchd.rendezvous.cluster}).
    """

    def locate(self, name: str) -> Deferred[str | None]:
        "The other node holding C{name}, or None."

    def forward(self, target: str, datagram: bytes) -> None:
        "Send an Incoming to C{target} through the node holding it."

    def heard_from(self, target: str) -> None:
        "C{target} refreshed here: resend what other nodes asked us to deliver."

    def answer(self, message: stun.Message) -> bool:
        "An Incoming answer for another node's introduction: True if it was."


class Introducer:
    """
    Introduces authenticated agents to each other.

    C{directory} is a function because the peers file may be reloaded.
    """

    def __init__(
        self,
        directory: Callable[[], Directory],
        registry: IRegistry,
        introductions: Introductions,
        answers: RecentAnswers,
        counters: Counters,
        send: Callable[[bytes, Address], None],
        clock: IReactorTime,
        relay: RelayService | None = None,
        remote: Remote | None = None,
        over_tls: Callable[[Address], bool] = lambda address: False,
        relay_address: str | None = None,
    ) -> None:
        self._relay_address = relay_address
        self._over_tls = over_tls
        self._clock = clock
        self._relay = relay
        self._remote = remote
        self._directory = directory
        self._registry = registry
        self._introductions = introductions
        self._answers = answers
        self._counters = counters
        self._send = send

    def _target_of(
        self, request: AgentRequest, now: float
    ) -> tuple[str, Registration | None, bytes]:
        """
        The target of a Connect, its registration here (None when it is
        registered on another node) and key; or L{wire.ProtocolError}.
        """
        target = wire.decode_name(request.message.get(Attr.PEER), "peer")
        if target == request.name:
            raise wire.ProtocolError(400, "cannot connect to yourself")
        directory = self._directory()
        entry = directory.entry(target)
        if entry is None or entry.network != request.entry.network:
            raise wire.ProtocolError(404, "Peer Unknown")
        registration = self._registry.lookup(target, now)
        key = directory.key_for(target)
        if key is None or (registration is None and self._remote is None):
            raise wire.ProtocolError(480, "Peer Offline")
        if not self._introductions.has_room(request.name, target):
            self._counters["busy"] += 1
            raise wire.ProtocolError(486, "Busy")
        return target, registration, key

    def connect(self, request: AgentRequest, now: float) -> None:
        """
        Forward a Connect to its target; L{wire.ProtocolError} if it cannot be.
        """
        target, registration, target_key = self._target_of(request, now)
        if registration is None and self._remote is not None:
            self._connect_remote(request, target, target_key, self._remote)
            return
        self._introduce(request, target, registration, target_key)

    def _connect_remote(
        self, request: AgentRequest, target: str, target_key: bytes, remote: Remote
    ) -> None:
        """
        The target is not registered here: introduce it through its node.
        """

        def located(node: str | None) -> None:
            if node is None:
                self._refuse(request, 480, "Peer Offline")
                return
            try:
                self._introduce(request, target, None, target_key)
            except wire.ProtocolError as e:
                self._counters["bad-request"] += 1
                self._refuse(request, e.code, e.reason)

        def unavailable(failure: Failure) -> None:
            self._counters["introduction-unavailable"] += 1
            log.warn(
                "cannot introduce {initiator} to {target} on another node: {error}",
                initiator=request.name,
                target=target,
                error=failure.getErrorMessage(),
            )
            self._refuse(request, UNAVAILABLE, "Other Rendezvous Nodes Unreachable")

        remote.locate(target).addCallbacks(located, unavailable)

    def _refuse(self, request: AgentRequest, code: int, reason: str) -> None:
        answer = request.sign(MessageClass.ERROR, wire.error_attributes(code, reason))
        self._answers.remember(request.name, request.transaction_id, request.source, answer)
        self._send(answer, request.source)

    def _introduce(
        self,
        request: AgentRequest,
        target: str,
        registration: Registration | None,
        target_key: bytes,
    ) -> None:
        message = request.message
        service = wire.decode_name(message.get(Attr.SERVICE), "service")
        tunnel_id = wire.decode_tunnel_id(message)
        candidates = wire.decode_candidates(message)
        introduction = Introduction(
            request.name, request.source, request.transaction_id, target, request.key
        )
        introduction.tunnel_id = tunnel_id
        # Only for a target of this node: the relay runs on the host the
        # target's agent talks to.  A target that reaches us over TLS (UDP
        # blocked) gets one unasked: its tunnels will likely need it.
        if registration is not None and (
            message.has(Attr.RELAY) or self._over_tls(registration.address)
        ):
            self._allocate(introduction, asked=message.has(Attr.RELAY))
        elif message.has(Attr.RELAY):
            # A target of another node binds to our relay, at the address
            # the Incoming names; no address to name, no relay.
            if self._relay_address is None:
                introduction.relay_refused = (
                    "the peer is registered on another node, and this node has no relay_address"
                )
            else:
                self._allocate(introduction, asked=True)
        incoming_id = introduction.incoming_id
        forwarded = wire.signed(
            Method.INCOMING,
            MessageClass.REQUEST,
            incoming_id,
            [
                (Attr.PEER, request.name.encode("ascii")),
                (Attr.SERVICE, service.encode("ascii")),
                (Attr.TUNNEL_ID, tunnel_id),
                (Attr.PUBLIC_KEY, request.entry.public_key.raw),
                *wire.encode_candidates(candidates, incoming_id),
                *([(Attr.WAIT, b"")] if message.has(Attr.WAIT) else []),
                *_flag(message, Attr.HARD_NAT),
                *_relay_port(introduction, 1),
                *self._relay_elsewhere(introduction, registration, incoming_id),
                wire.timestamp(self._clock.seconds()),
            ],
            target_key,
        )
        log.debug(
            "introducing {initiator} to {target} for {service}",
            initiator=request.name,
            target=target,
            service=service,
        )
        self._counters["introduction"] += 1
        last_known = None if registration is None else registration.address

        def send() -> None:
            # To wherever the target registered last: its NAT may have
            # given it a new mapping since (L{heard_from}), or it may have
            # moved to another node of the service.
            nonlocal last_known
            current = self._registry.lookup(target, self._clock.seconds())
            if current is not None:
                last_known = current.address
            elif self._remote is not None:
                self._remote.forward(target, forwarded)
                return
            if last_known is not None:
                self._send(forwarded, last_known)

        d = self._introductions.begin(introduction, send)
        d.addCallbacks(
            lambda answer: self._introduced(introduction, answer),
            lambda failure: self._not_introduced(introduction, failure),
        )

    def heard_from(self, target: str) -> None:
        """
        C{target} registered or refreshed: its NAT has a mapping to us now,
        so an introduction it did not answer (a NAT that rebooted and lost
        the old one drops the Incoming) goes again at once, to where it is.
        """
        for introduction in self._introductions.waiting_for(target):
            self._counters["introduction-resent"] += 1
            self._introductions.resend(introduction)
        if self._remote is not None:
            self._remote.heard_from(target)

    def incoming_answer(self, message: stun.Message) -> None:
        """
        A target's answer to an Incoming: checked, then taken as the final word.
        """
        introduction = self._introductions.get(message.transaction_id)
        if introduction is None:
            if self._remote is None or not self._remote.answer(message):
                self._counters["dropped-unsolicited"] += 1
            return
        key = self._directory().key_for(introduction.target)
        if key is None or not stun.verify_integrity_sha256(message, key):
            self._counters["dropped-unauthenticated"] += 1
            return
        self._introductions.answer(message.transaction_id, message)

    def _relay_elsewhere(
        self, introduction: Introduction, registration: Registration | None, incoming_id: bytes
    ) -> list[tuple[int, bytes]]:
        """
        RELAY-ADDRESS for a target of another node: our relay's address and
        its port, which it could not tell from the node it talks to.
        """
        if registration is not None or introduction.relay_ports is None:
            return []
        assert self._relay_address is not None
        port = introduction.relay_ports[1]
        return [
            (Attr.RELAY_ADDRESS, stun.encode_xor_address(self._relay_address, port, incoming_id))
        ]

    def _allocate(self, introduction: Introduction, asked: bool) -> None:
        """
        Two relay ports for this tunnel, in case no direct pair works; or,
        when there is no relay or it refuses, why not (the tunnel may still
        go direct, and the initiator's failure can say why it did not go
        through the relay).
        """
        if self._relay is None:
            if asked:
                introduction.relay_refused = "this rendezvous runs no relay"
            return
        initiator, target = introduction.initiator, introduction.target
        try:
            introduction.relay_ports = self._relay.allocate(
                introduction.tunnel_id, initiator, target
            )
        except RelayRefused as e:
            self._counters["relay-refused"] += 1
            if asked:
                introduction.relay_refused = e.reason
            log.info(
                "no relay for {initiator} -> {target}: {reason}",
                initiator=initiator,
                target=target,
                reason=e.reason,
            )

    def _finish(
        self, introduction: Introduction, cls: MessageClass, attributes: Attributes
    ) -> None:
        if cls != MessageClass.SUCCESS and introduction.relay_ports and self._relay is not None:
            self._relay.release(introduction.tunnel_id)
        answer = wire.signed(
            Method.CONNECT, cls, introduction.connect_id, attributes, introduction.key
        )
        self._answers.remember(
            introduction.initiator, introduction.connect_id, introduction.initiator_address, answer
        )
        self._send(answer, introduction.initiator_address)

    def _refused(self, introduction: Introduction, answer: stun.Message) -> None:
        code, reason = wire.error_of(answer)
        if code not in (403, 460, 486):
            code, reason = 403, "Rejected"
        self._counters["introduction-refused"] += 1
        self._finish(introduction, MessageClass.ERROR, wire.error_attributes(code, reason))

    def _introduced(self, introduction: Introduction, answer: stun.Message) -> None:
        if answer.cls == MessageClass.ERROR:
            self._refused(introduction, answer)
            return
        try:
            candidates = wire.decode_candidates(answer)
            nonce = wire.decode_tunnel_nonce(answer)
        except wire.ProtocolError:
            self._counters["introduction-bad-answer"] += 1
            self._finish(introduction, MessageClass.ERROR, wire.error_attributes(403, "Rejected"))
            return
        target_entry = self._directory().entry(introduction.target)
        if target_entry is None:
            self._finish(introduction, MessageClass.ERROR, wire.error_attributes(404))
            return
        self._counters["introduction-accepted"] += 1
        self._finish(
            introduction,
            MessageClass.SUCCESS,
            [
                (Attr.PUBLIC_KEY, target_entry.public_key.raw),
                (Attr.TUNNEL_NONCE, nonce),
                *wire.encode_candidates(candidates, introduction.connect_id),
                *_flag(answer, Attr.HARD_NAT),
                *_relay_port(introduction, 0),
                *_relay_refusal(introduction),
            ],
        )

    def _not_introduced(self, introduction: Introduction, failure: Failure) -> None:
        if failure.check(RequestTimedOut):
            self._counters["introduction-timeout"] += 1
            reason = self._silence(introduction.target)
            self._finish(introduction, MessageClass.ERROR, wire.error_attributes(408, reason))

    def _silence(self, target: str) -> str:
        """
        Why an introduction went unanswered, as far as the server can tell.
        """
        now = self._clock.seconds()
        registration = self._registry.lookup(target, now)
        if registration is None and self._remote is not None:
            return f"{target}'s agent did not answer"
        if registration is None:
            return f"{target}'s agent went offline"
        silent = round(now - registration.refreshed)
        return f"{target}'s agent has not been heard from for {silent} s"


def _relay_refusal(introduction: Introduction) -> list[tuple[int, bytes]]:
    """
    RELAY-REFUSED for the initiator, when it asked for a relay and got none.
    """
    if introduction.relay_refused is None:
        return []
    return [(Attr.RELAY_REFUSED, introduction.relay_refused.encode("utf-8")[:MAX_REFUSAL])]


def _relay_port(introduction: Introduction, side: int) -> list[tuple[int, bytes]]:
    """
    The RELAY-PORT attribute for one side (0: the initiator, 1: the target).
    """
    if introduction.relay_ports is None:
        return []
    return [(Attr.RELAY_PORT, stun.encode_u32(introduction.relay_ports[side]))]


def _flag(message: stun.Message, attr: int) -> list[tuple[int, bytes]]:
    """
    An empty flag attribute, passed on from one agent to the other.
    """
    return [(attr, b"")] if message.has(attr) else []
