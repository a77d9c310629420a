"""
The rendezvous server's UDP protocol: Binding for anyone, registration and
introductions for authenticated agents (docs/protocol.rst).

Nothing here trusts a datagram before its MESSAGE-INTEGRITY-SHA256 checks
out under a key derived from the peers file; until then the server keeps no
state for it and never answers with more bytes than it got.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.config import PeerEntry
from punchd.keys import PrivateKey, derive_rendezvous_key
from punchd.relay import RelayService
from punchd.rendezvous.limits import Counters, SourceLimiter
from punchd.rendezvous.registry import IRegistry, ReplayWindow
from punchd.retransmit import Backoff, RequestTimedOut, Transactions
from punchd.stun import Attr, MessageClass, Method

log = Logger()

NONCE_BUCKET = 60.0
NONCE_BUCKETS_VALID = 5
RECENT_ANSWERS = 64
RECENT_ANSWER_SECONDS = 30.0
PEERS_REPLY_BUDGET = 1100
MIN_LIFETIME = 10
DEFAULT_LIFETIME = 60
INCOMING_BACKOFF = Backoff(initial=0.25, maximum=1.0, attempts=8)
NOT_REGISTERED = 470
RECEIVE_BUFFER = 4 * 1024 * 1024


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

    def _mac(self, bucket: int, address: tuple[str, int]) -> bytes:
        message = b"%d|%s|%d" % (bucket, address[0].encode(), address[1])
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:16]

    def issue(self, address: tuple[str, int]) -> bytes:
        bucket = int(self._clock.seconds() // NONCE_BUCKET)
        return bucket.to_bytes(4, "big") + self._mac(bucket, address)

    def valid(self, nonce: bytes | None, address: tuple[str, int]) -> bool:
        if nonce is None or len(nonce) != 20:
            return False
        bucket = int.from_bytes(nonce[:4], "big")
        now = int(self._clock.seconds() // NONCE_BUCKET)
        if not 0 <= now - bucket < NONCE_BUCKETS_VALID:
            return False
        return hmac.compare_digest(nonce[4:], self._mac(bucket, address))


@dataclass
class Introduction:
    """
    A Connect waiting for the target's answer.
    """

    initiator: str
    initiator_address: tuple[str, int]
    connect_id: bytes
    target: str
    incoming_id: bytes
    key: bytes = field(repr=False)


class RendezvousProtocol(DatagramProtocol):
    """
    Turns datagrams into registrations, peer lists and introductions.
    """

    noisy = False
    _socket: Any = None

    def __init__(
        self,
        directory: Directory,
        registry: IRegistry,
        clock: IReactorTime,
        *,
        binding_limiter: SourceLimiter,
        error_limiter: SourceLimiter,
        max_pending: int = 256,
        max_lifetime: int = 600,
        relay: RelayService | None = None,
    ) -> None:
        self.directory = directory
        self.relay = relay
        self.registry = registry
        self.clock = clock
        self.counters = Counters()
        self._binding_limiter = binding_limiter
        self._error_limiter = error_limiter
        self._max_pending = max_pending
        self._max_lifetime = max_lifetime
        self._nonces = Nonces(clock)
        self._recent: dict[str, OrderedDict[bytes, tuple[float, tuple[str, int], bytes]]] = {}
        self._introductions: dict[bytes, Introduction] = {}
        self._connecting: set[tuple[str, bytes]] = set()
        self._replay: dict[str, ReplayWindow] = {}
        self._pending_by_agent: dict[str, int] = {}
        self._outgoing: Transactions[stun.Message] = Transactions(clock)

    # -- datagrams in ------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        try:
            self._dispatch(datagram, (addr[0], addr[1]))
        except Exception:
            self.counters["internal-error"] += 1
            log.failure("unexpected error handling a datagram from {source}", source=addr[0])

    def _dispatch(self, datagram: bytes, source: tuple[str, int]) -> None:
        if datagram[:2] == b"\x00\x01":
            self._binding(datagram, source)
            return
        try:
            message = stun.parse(datagram)
        except stun.StunError as e:
            self.counters["dropped-" + type(e).__name__] += 1
            return
        if message.cls == MessageClass.REQUEST and message.method in (
            Method.REGISTER,
            Method.PEERS,
            Method.CONNECT,
        ):
            self._agent_request(message, source, len(datagram))
        elif message.method == Method.INCOMING and message.cls in (
            MessageClass.SUCCESS,
            MessageClass.ERROR,
        ):
            self._incoming_answer(message)
        else:
            self.counters["dropped-unexpected"] += 1

    def _binding(self, datagram: bytes, source: tuple[str, int]) -> None:
        if not self._binding_limiter.allow(source[0]):
            self.counters["binding-rate-limited"] += 1
            return
        response = stun.binding_response(datagram, source[0], source[1])
        if response is None:
            self.counters["dropped-bad-binding"] += 1
            return
        self.counters["binding"] += 1
        self._send(response, source)

    def stopProtocol(self) -> None:
        self._socket = None

    def startProtocol(self) -> None:
        self._socket = getattr(self.transport, "socket", None)
        if self._socket is not None:
            try:
                # ~40 ms of requests at 100,000/s: a scheduling hiccup loses nothing.
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError:
                pass

    def _send(self, data: bytes, address: tuple[str, int]) -> None:
        # Every address here came from recvfrom (directly or through the
        # registry), so the socket is used as is: the transport's checks of
        # the address cost as much as the syscall on the Binding hot path.
        try:
            if self._socket is not None:
                self._socket.sendto(data, address)
            elif self.transport is not None:
                self.transport.write(data, address)
        except OSError as e:
            # A full send buffer or conntrack table: UDP may drop, and the
            # sender retransmits; nothing here may be left half done.
            self.counters[f"send-error-{e.errno}"] += 1

    # -- authenticated agent requests ------------------------------------

    def _unauthorized(self, message: stun.Message, source: tuple[str, int], size: int) -> None:
        self.counters["dropped-unauthenticated"] += 1
        if not self._error_limiter.allow(source[0]):
            return
        reply = stun.build(
            message.method,
            MessageClass.ERROR,
            message.transaction_id,
            wire.error_attributes(401),
        )
        if len(reply) <= size:
            self._send(reply, source)

    def _agent_request(self, message: stun.Message, source: tuple[str, int], size: int) -> None:
        try:
            name = wire.decode_name(message.get(Attr.USERNAME), "username")
        except wire.ProtocolError:
            self._unauthorized(message, source, size)
            return
        key = self.directory.key_for(name)
        if key is None or not stun.verify_integrity_sha256(message, key):
            self._unauthorized(message, source, size)
            return

        def sign(cls: MessageClass, attributes: list[tuple[int, bytes]]) -> bytes:
            return wire.signed(message.method, cls, message.transaction_id, attributes, key)

        def answer(cls: MessageClass, attributes: list[tuple[int, bytes]]) -> None:
            data = sign(cls, attributes)
            self._send(data, source)
            self._remember(name, message.transaction_id, source, data)

        if not self._nonces.valid(message.get(Attr.NONCE), source):
            # Anyone may replay a captured request from any address: the
            # answer is rate-limited and never larger than what came in.
            self.counters["stale-nonce"] += 1
            if self._error_limiter.allow(source[0]):
                stale = sign(
                    MessageClass.ERROR,
                    [*wire.error_attributes(438), (Attr.NONCE, self._nonces.issue(source))],
                )
                if len(stale) <= size:
                    self._send(stale, source)
            return
        unknown = message.unknown_required(wire.KNOWN_ATTRIBUTES)
        if unknown:
            self.counters["unknown-attribute"] += 1
            unknown_reply = sign(
                MessageClass.ERROR,
                [
                    *wire.error_attributes(420),
                    (Attr.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes(unknown)),
                ],
            )
            self._send(unknown_reply, source)
            return
        now = self.clock.seconds()
        recent = self._recent.get(name)
        if recent is not None and message.transaction_id in recent:
            _, answered_to, cached = recent[message.transaction_id]
            if answered_to == source:
                self.counters["retransmission"] += 1
                self._send(cached, source)
            return
        if (name, message.transaction_id) in self._connecting:
            self.counters["retransmission"] += 1
            return
        sequence_value = message.get(Attr.SEQUENCE)
        if sequence_value is None or len(sequence_value) != 8:
            answer(MessageClass.ERROR, wire.error_attributes(400))
            return
        sequence = stun.decode_u64(sequence_value)
        entry = self.directory.entry(name)
        assert entry is not None
        # One window per peer for the life of the process, not per
        # registration: a lapse must not reopen old sequence numbers.
        if not self._replay.setdefault(name, ReplayWindow()).accept(sequence):
            self.counters["dropped-replay"] += 1
            return
        registration = self.registry.lookup(name, now)

        try:
            if message.method == Method.REGISTER:
                registered = self._register(name, entry, message, source, registration is None, now)
                answer(MessageClass.SUCCESS, registered)
            elif registration is None:
                answer(MessageClass.ERROR, wire.error_attributes(NOT_REGISTERED, "Not Registered"))
            elif message.method == Method.PEERS:
                answer(MessageClass.SUCCESS, self._peers(name, entry, message, now))
            else:
                self._connect(name, message, source, key, now)
        except wire.ProtocolError as e:
            self.counters["bad-request"] += 1
            answer(MessageClass.ERROR, wire.error_attributes(e.code, e.reason))

    def _remember(
        self, name: str, transaction_id: bytes, source: tuple[str, int], answer: bytes
    ) -> None:
        """
        Keep an answer, so that a retransmission of its request gets it again.
        """
        recent = self._recent.setdefault(name, OrderedDict())
        recent[transaction_id] = (self.clock.seconds(), source, answer)
        while len(recent) > RECENT_ANSWERS:
            recent.popitem(last=False)

    def _register(
        self,
        name: str,
        entry: PeerEntry,
        message: stun.Message,
        source: tuple[str, int],
        new: bool,
        now: float,
    ) -> list[tuple[int, bytes]]:
        requested = message.get(Attr.LIFETIME)
        lifetime = DEFAULT_LIFETIME
        if requested is not None and len(requested) == 4:
            lifetime = stun.decode_u32(requested)
        if lifetime == 0:
            # The agent is stopping: its peers should see it offline now,
            # not when the registration would have run out.
            if self.registry.lookup(name, now) is not None:
                self.registry.remove(name)
                self.counters["signed-off"] += 1
                log.info("agent {peer} signed off", peer=name)
            return [
                (Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(*source, message.transaction_id)),
                (Attr.LIFETIME, stun.encode_u32(0)),
            ]
        lifetime = max(MIN_LIFETIME, min(lifetime, self._max_lifetime))
        _, moved = self.registry.register(name, entry.network, source, now, lifetime)
        if new:
            self.counters["registered"] += 1
            log.info(
                "agent {peer} registered from {address} (network {network})",
                peer=name,
                address=wire.format_address(source),
                network=entry.network,
            )
        elif moved is not None:
            log.info(
                "agent {peer} moved from {old} to {address}",
                peer=name,
                old=wire.format_address(moved),
                address=wire.format_address(source),
            )
        self.counters["keepalive"] += 1
        return [
            (Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(*source, message.transaction_id)),
            (Attr.LIFETIME, stun.encode_u32(lifetime)),
        ]

    def _peers(
        self, name: str, entry: PeerEntry, message: stun.Message, now: float
    ) -> list[tuple[int, bytes]]:
        after_value = message.get(Attr.PEER)
        after = wire.decode_name(after_value, "peer") if after_value is not None else ""
        attributes: list[tuple[int, bytes]] = []
        budget = PEERS_REPLY_BUDGET
        for other in self.registry.online(entry.network, now):
            if other == name or other <= after:
                continue
            encoded = other.encode("ascii")
            cost = 4 + (len(encoded) + 3) // 4 * 4
            if cost > budget:
                attributes.append((Attr.MORE, b""))
                break
            budget -= cost
            attributes.append((Attr.PEER, encoded))
        return attributes

    # -- introductions ----------------------------------------------------

    def _connect(
        self,
        name: str,
        message: stun.Message,
        source: tuple[str, int],
        key: bytes,
        now: float,
    ) -> None:
        target = wire.decode_name(message.get(Attr.PEER), "peer")
        service = wire.decode_name(message.get(Attr.SERVICE), "service")
        tunnel_id = wire.decode_tunnel_id(message)
        candidates = wire.decode_candidates(message)
        initiator_entry = self.directory.entry(name)
        target_entry = self.directory.entry(target)
        assert initiator_entry is not None
        if target == name:
            raise wire.ProtocolError(400, "cannot connect to yourself")
        if target_entry is None or target_entry.network != initiator_entry.network:
            raise wire.ProtocolError(404, "Peer Unknown")
        registration = self.registry.lookup(target, now)
        target_key = self.directory.key_for(target)
        if registration is None or target_key is None:
            raise wire.ProtocolError(480, "Peer Offline")
        for agent in (name, target):
            if self._pending_by_agent.get(agent, 0) >= self._max_pending:
                self.counters["busy"] += 1
                raise wire.ProtocolError(486, "Busy")

        incoming_id = stun.new_transaction_id()
        introduction = Introduction(name, source, message.transaction_id, target, incoming_id, key)
        self._introductions[incoming_id] = introduction
        self._connecting.add((name, message.transaction_id))
        for agent in (name, target):
            self._pending_by_agent[agent] = self._pending_by_agent.get(agent, 0) + 1
        request = wire.signed(
            Method.INCOMING,
            MessageClass.REQUEST,
            incoming_id,
            [
                (Attr.PEER, name.encode("ascii")),
                (Attr.SERVICE, service.encode("ascii")),
                (Attr.TUNNEL_ID, tunnel_id),
                (Attr.PUBLIC_KEY, initiator_entry.public_key.raw),
                *wire.encode_candidates(candidates, incoming_id),
                *([(Attr.WAIT, b"")] if message.has(Attr.WAIT) else []),
            ],
            target_key,
        )
        target_address = registration.address
        log.debug(
            "introducing {initiator} to {target} for {service}",
            initiator=name,
            target=target,
            service=service,
        )
        self.counters["introduction"] += 1
        d = self._outgoing.start(
            incoming_id, lambda: self._send(request, target_address), INCOMING_BACKOFF
        )
        d.addCallbacks(
            lambda answer: self._introduced(introduction, answer),
            lambda failure: self._not_introduced(introduction, failure),
        )

    def _incoming_answer(self, message: stun.Message) -> None:
        introduction = self._introductions.get(message.transaction_id)
        if introduction is None:
            self.counters["dropped-unsolicited"] += 1
            return
        key = self.directory.key_for(introduction.target)
        if key is None or not stun.verify_integrity_sha256(message, key):
            self.counters["dropped-unauthenticated"] += 1
            return
        self._outgoing.answer(message.transaction_id, message)

    def _finish(
        self, introduction: Introduction, cls: MessageClass, attributes: list[tuple[int, bytes]]
    ) -> None:
        self._introductions.pop(introduction.incoming_id, None)
        self._connecting.discard((introduction.initiator, introduction.connect_id))
        for agent in (introduction.initiator, introduction.target):
            left = self._pending_by_agent.get(agent, 0) - 1
            if left > 0:
                self._pending_by_agent[agent] = left
            else:
                self._pending_by_agent.pop(agent, None)
        answer = wire.signed(
            Method.CONNECT, cls, introduction.connect_id, attributes, introduction.key
        )
        self._remember(
            introduction.initiator, introduction.connect_id, introduction.initiator_address, answer
        )
        self._send(answer, introduction.initiator_address)

    def _introduced(self, introduction: Introduction, answer: stun.Message) -> None:
        if answer.cls == MessageClass.ERROR:
            code, reason = wire.error_of(answer)
            if code not in (403, 460, 486):
                code, reason = 403, "Rejected"
            self.counters["introduction-refused"] += 1
            self._finish(introduction, MessageClass.ERROR, wire.error_attributes(code, reason))
            return
        nonce = answer.get(Attr.TUNNEL_NONCE)
        try:
            candidates = wire.decode_candidates(answer)
            if nonce is None or len(nonce) != wire.TUNNEL_ID_LENGTH:
                raise wire.ProtocolError(400, "missing tunnel nonce")
        except wire.ProtocolError:
            self.counters["introduction-bad-answer"] += 1
            self._finish(introduction, MessageClass.ERROR, wire.error_attributes(403, "Rejected"))
            return
        target_entry = self.directory.entry(introduction.target)
        if target_entry is None:
            self._finish(introduction, MessageClass.ERROR, wire.error_attributes(404))
            return
        self.counters["introduction-accepted"] += 1
        self._finish(
            introduction,
            MessageClass.SUCCESS,
            [
                (Attr.PUBLIC_KEY, target_entry.public_key.raw),
                (Attr.TUNNEL_NONCE, nonce),
                *wire.encode_candidates(candidates, introduction.connect_id),
            ],
        )

    def _not_introduced(self, introduction: Introduction, failure: Failure) -> None:
        if failure.check(RequestTimedOut):
            self.counters["introduction-timeout"] += 1
            self._finish(introduction, MessageClass.ERROR, wire.error_attributes(408))
        else:
            self._introductions.pop(introduction.incoming_id, None)
            self._connecting.discard((introduction.initiator, introduction.connect_id))

    # -- housekeeping -----------------------------------------------------

    def expire(self) -> None:
        """
        Forget silent agents and old cached answers.
        """
        now = self.clock.seconds()
        for name in self.registry.expire(now):
            log.info("agent {peer} fell silent and was forgotten", peer=name)
        for name, recent in list(self._recent.items()):
            while recent and next(iter(recent.values()))[0] < now - RECENT_ANSWER_SECONDS:
                recent.popitem(last=False)
            if not recent:
                del self._recent[name]

    def reload(self, directory: Directory) -> None:
        """
        Take a new peers file: agents no longer listed, or listed with
        another key or network, are dropped; the rest stay registered.
        """
        now = self.clock.seconds()
        old = self.directory
        self.directory = directory
        for name in old.names():
            before, after = old.entry(name), directory.entry(name)
            if after != before:
                if self.registry.lookup(name, now) is not None:
                    log.info("agent {peer} dropped: peers file changed", peer=name)
                self.registry.remove(name)
                self._recent.pop(name, None)
            if after is None:
                self._replay.pop(name, None)
        log.info("peers file reloaded: {count} peers", count=len(directory.names()))

    def stop(self) -> None:
        self._outgoing.cancel_all()

    def pending_introductions(self) -> int:
        return len(self._introductions)

    def pending_for(self, name: str) -> int:
        return self._pending_by_agent.get(name, 0)
