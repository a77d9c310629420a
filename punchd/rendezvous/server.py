"""
The rendezvous server's UDP protocol: Binding for anyone, registration and
introductions for authenticated agents (docs/protocol.rst).

Nothing here trusts a datagram before its MESSAGE-INTEGRITY-SHA256 checks
out under a key derived from the peers file (L{punchd.rendezvous.auth});
until then the server keeps no state for it.  Size of what goes back to a
sender whose address nothing proves: the anonymous Binding success answer
(the standard STUN service) is up to 12 bytes (IPv4) or 24 bytes (IPv6)
larger than a bare request, and is rate-limited per source IP; every other
reply to such a sender (a Binding 420, a 401, a 438, a gather's answer, a
sequence resynchronisation) is dropped rather than sent when it would be
larger than the request.

Agents' TLS streams (L{punchd.rendezvous.stream}) take the same path: each
frame comes in as a datagram from the stream's TCP peer address, and
L{RendezvousProtocol._send} puts what goes to that address on the stream.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.config import PeerEntry
from punchd.relay import RelayService
from punchd.rendezvous.answers import RecentAnswers
from punchd.rendezvous.auth import AgentRequest, Directory, Gate
from punchd.rendezvous.gathering import GATHER_BURST, GATHER_RATE, Gathers, looks_signed
from punchd.rendezvous.introducer import UNAVAILABLE, Introducer, Remote
from punchd.rendezvous.introductions import Introductions
from punchd.rendezvous.limits import Counters, SourceLimiter
from punchd.rendezvous.registry import IRegistry
from punchd.stun import Attr, MessageClass, Method

if TYPE_CHECKING:
    from punchd.rendezvous.stream import StreamProtocol

__all__ = ["AlternatePort", "Directory", "RendezvousProtocol"]

log = Logger()

PEERS_REPLY_BUDGET = 1100
#: Names one peers page may hold at most (each costs at least 8 bytes),
#: plus the asker's own name and one to tell whether there are more.
PEERS_PAGE = PEERS_REPLY_BUDGET // 8 + 2
MIN_LIFETIME = 10
DEFAULT_LIFETIME = 60
NOT_REGISTERED = 470
RECEIVE_BUFFER = 4 * 1024 * 1024
AGENT_METHODS = frozenset((Method.REGISTER, Method.PEERS, Method.CONNECT))
INCOMING_ANSWERS = frozenset((MessageClass.SUCCESS, MessageClass.ERROR))
BINDING_SUCCESS = b"\x01\x01"


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
        gather_limiter: SourceLimiter | None = None,
        max_pending: int = 256,
        max_lifetime: int = 600,
        relay: RelayService | None = None,
        alternate_port: int = 0,
        remote: Remote | None = None,
        relay_address: str | None = None,
    ) -> None:
        self.relay = relay
        self.registry = registry
        self.alternate_port = alternate_port
        self.clock = clock
        self.counters = Counters()
        self.answers = RecentAnswers(clock)
        self.introductions = Introductions(clock, max_pending)
        #: Agents' TLS streams by TCP peer address: what is sent there goes on them.
        self._streams: dict[tuple[str, int], StreamProtocol] = {}
        #: The stream whose frame is being handled, if any.
        self.via: StreamProtocol | None = None
        self._binding_limiter = binding_limiter
        self._max_lifetime = max_lifetime
        self._gate = Gate(
            directory,
            clock,
            self.counters,
            error_limiter,
            self.answers,
            self._send,
            self.introductions.in_progress,
        )
        if gather_limiter is None:
            gather_limiter = SourceLimiter(GATHER_RATE, GATHER_BURST, clock.seconds)
        self.gather_limiter = gather_limiter
        self._gathers = Gathers(
            lambda: self._gate.directory, gather_limiter, self.counters, self._send
        )
        self._introducer = Introducer(
            lambda: self._gate.directory,
            registry,
            self.introductions,
            self.answers,
            self.counters,
            self._send,
            clock,
            relay=relay,
            remote=remote,
            relay_address=relay_address,
            over_tls=lambda address: address in self._streams,
        )

    @property
    def directory(self) -> Directory:
        return self._gate.directory

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
        if message.cls == MessageClass.REQUEST and message.method in AGENT_METHODS:
            self._agent_request(message, source, len(datagram))
        elif message.method == Method.INCOMING and message.cls in INCOMING_ANSWERS:
            self._introducer.incoming_answer(message)
        else:
            self.counters["dropped-unexpected"] += 1

    def _binding(
        self,
        datagram: bytes,
        source: tuple[str, int],
        gathers: Gathers | None = None,
        send: Callable[[bytes, tuple[str, int]], None] | None = None,
    ) -> None:
        gathers = gathers or self._gathers
        # An agent's signed gather is not charged to its IP's anonymous budget.
        if looks_signed(datagram) and gathers.handle(datagram, source):
            return
        if not self._binding_limiter.allow(source[0]):
            self.counters["binding-rate-limited"] += 1
            return
        response = stun.binding_response(datagram, source[0], source[1])
        if response is None:
            self.counters["dropped-bad-binding"] += 1
            return
        # The success answer is the standard service and may outgrow a bare
        # request (by 12 bytes, 24 over IPv6); anything else never does.
        if response[:2] != BINDING_SUCCESS and len(response) > len(datagram):
            self.counters["dropped-reply-larger-than-request"] += 1
            return
        self.counters["binding"] += 1
        (send or self._send)(response, source)

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

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        """
        Send from this server's socket (for another node's introductions).
        """
        self._send(data, address)

    def incoming_answer(self, message: stun.Message) -> None:
        """
        A target's answer to an Incoming, relayed by the node that holds it.
        """
        self._introducer.incoming_answer(message)

    def _send(self, data: bytes, address: tuple[str, int]) -> None:
        if self._streams:
            stream = self._streams.get(address)
            if stream is not None:
                stream.send_signalling(data)
                return
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

    # -- TLS streams (punchd.rendezvous.stream) -----------------------------

    def attach_stream(self, address: tuple[str, int], stream: StreamProtocol) -> None:
        """
        Send what goes to C{address} on C{stream}, a TLS connection from it
        whose frames come in as datagrams from it.
        """
        self._streams[address] = stream

    def detach_stream(self, stream: StreamProtocol) -> None:
        """
        C{stream} closed: the agents registered through it are offline now
        (their peers see it at once, and nothing is sent to the address).
        """
        if self._streams.get(stream.address) is stream:
            del self._streams[stream.address]
        now = self.clock.seconds()
        for name in stream.names:
            registration = self.registry.lookup(name, now)
            if registration is not None and registration.address == stream.address:
                self.registry.remove(name)
                self.counters["tls-signed-off"] += 1
                log.info("agent {peer} left: its TLS connection closed", peer=name)

    def streams_open(self) -> int:
        return len(self._streams)

    # -- authenticated agent requests ------------------------------------

    def _agent_request(self, message: stun.Message, source: tuple[str, int], size: int) -> None:
        request = self._gate.authenticate(message, source, size)
        if request is not None and self._gate.admit(request, self._answer):
            if self.via is not None:
                # Credited to the stream it came on, never to a stream that
                # only shares its address with a UDP sender.
                self.via.accepted(request.name)
            self._carry_out(request)

    def _answer(self, request: AgentRequest, data: bytes) -> None:
        """
        Send a final answer, and keep it for retransmissions of the request.
        """
        self._send(data, request.source)
        self.answers.remember(request.name, request.transaction_id, request.source, data)

    def _carry_out(self, request: AgentRequest) -> None:
        now = self.clock.seconds()
        method = request.message.method
        registered = self.registry.lookup(request.name, now)
        try:
            if method == Method.REGISTER:
                attributes = self._register(request, registered is None, now)
            elif registered is None:
                attributes = wire.error_attributes(NOT_REGISTERED, "Not Registered")
                self._answer(request, request.sign(MessageClass.ERROR, attributes))
                return
            elif method == Method.PEERS:
                self._peers(request, now)
                return
            else:
                self._introducer.connect(request, now)
                return
        except wire.ProtocolError as e:
            self.counters["bad-request"] += 1
            if method == Method.CONNECT:
                self.counters["introduction-" + wire.ERROR_NAMES.get(e.code, "bad-request")] += 1
            error = wire.error_attributes(e.code, e.reason)
            self._answer(request, request.sign(MessageClass.ERROR, error))
            return
        self._answer(request, request.sign(MessageClass.SUCCESS, attributes))

    def _register(self, request: AgentRequest, new: bool, now: float) -> list[tuple[int, bytes]]:
        name, source = request.name, request.source
        requested = request.message.get(Attr.LIFETIME)
        lifetime = DEFAULT_LIFETIME
        if requested is not None and len(requested) == 4:
            lifetime = stun.decode_u32(requested)
        mapped = (
            Attr.XOR_MAPPED_ADDRESS,
            stun.encode_xor_address(*source, request.transaction_id),
        )
        extra = []
        if self.alternate_port:
            extra.append((Attr.ALTERNATE_PORT, stun.encode_u32(self.alternate_port)))
        if lifetime == 0:
            # The agent is stopping: its peers should see it offline now,
            # not when the registration would have run out.
            if not new:
                self.registry.remove(name)
                self.counters["signed-off"] += 1
                log.info("agent {peer} signed off", peer=name)
            return [mapped, (Attr.LIFETIME, stun.encode_u32(0))]
        lifetime = max(MIN_LIFETIME, min(lifetime, self._max_lifetime))
        network = request.entry.network
        _, moved = self.registry.register(name, network, source, now, lifetime)
        if new:
            self.counters["registered"] += 1
            log.info(
                "agent {peer} registered from {address} (network {network})",
                peer=name,
                address=wire.format_address(source),
                network=network,
            )
        elif moved is not None:
            log.info(
                "agent {peer} moved from {old} to {address}",
                peer=name,
                old=wire.format_address(moved),
                address=wire.format_address(source),
            )
        self.counters["keepalive"] += 1
        self._introducer.heard_from(name)
        return [mapped, (Attr.LIFETIME, stun.encode_u32(lifetime)), wire.timestamp(now), *extra]

    def _peers(self, request: AgentRequest, now: float) -> None:
        """
        Answer one page of the peers list, once the registry has it (at once
        in memory; a Redis round trip for a service of several nodes).
        """
        after_value = request.message.get(Attr.PEER)
        after = wire.decode_name(after_value, "peer") if after_value is not None else ""
        d = self.registry.page(request.entry.network, after, PEERS_PAGE, now)

        def listed(names: list[str]) -> None:
            attributes = self._peer_attributes(request, names)
            self._answer(request, request.sign(MessageClass.SUCCESS, attributes))

        def failed(failure: Failure) -> None:
            self.counters["peers-unavailable"] += 1
            log.warn("cannot list peers: {error}", error=failure.getErrorMessage())
            error = wire.error_attributes(UNAVAILABLE, "Peers List Unavailable")
            self._answer(request, request.sign(MessageClass.ERROR, error))

        d.addCallbacks(listed, failed)

    def _peer_attributes(self, request: AgentRequest, names: list[str]) -> list[tuple[int, bytes]]:
        directory = self.directory
        attributes: list[tuple[int, bytes]] = []
        budget = PEERS_REPLY_BUDGET
        for other in names:
            # Only names of this network in our directory: nothing read from
            # a shared registry shows an agent the directory does not know.
            entry = directory.entry(other)
            if other == request.name or entry is None or entry.network != request.entry.network:
                continue
            encoded = other.encode("ascii")
            cost = 4 + (len(encoded) + 3) // 4 * 4
            if cost > budget:
                attributes.append((Attr.MORE, b""))
                break
            budget -= cost
            attributes.append((Attr.PEER, encoded))
        else:
            if len(names) >= PEERS_PAGE and attributes:
                attributes.append((Attr.MORE, b""))  # the rest were not ours to show
        return attributes

    # -- housekeeping -----------------------------------------------------

    def expire(self) -> None:
        """
        Forget silent agents and old cached answers.
        """
        for name in self.registry.expire(self.clock.seconds()):
            log.info("agent {peer} fell silent and was forgotten", peer=name)
        self.answers.expire()

    def reload(self, directory: Directory) -> None:
        """
        Take a new peers file: agents no longer listed, or listed with
        another key or network, are dropped; the rest stay registered.
        """
        now = self.clock.seconds()
        old = self.directory
        self._gate.directory = directory
        for name in old.names():
            self.peer_changed(name, old.entry(name), directory.entry(name), now)
        log.info("peers file reloaded: {count} peers", count=len(directory.names()))

    def peer_changed(
        self, name: str, before: PeerEntry | None, after: PeerEntry | None, now: float
    ) -> None:
        """
        One directory entry changed: an agent whose key or network changed,
        or that left, is dropped (it registers again if it still may).
        """
        if after != before:
            if self.registry.lookup(name, now) is not None:
                log.info("agent {peer} dropped: peers file changed", peer=name)
            self.registry.remove(name)
            self.answers.forget(name)
        if after is None:
            self._gate.forget(name)

    def stop(self) -> None:
        self.introductions.cancel_all()

    def pending_introductions(self) -> int:
        return len(self.introductions)

    def pending_for(self, name: str) -> int:
        return self.introductions.pending_for(name)


class AlternatePort(DatagramProtocol):
    """
    The second Binding port: answers what the main port answers to Binding
    (anonymous and signed gathers alike), charged to the same per-IP and
    per-agent budgets, and nothing else.  An agent compares the address each
    port sees to learn whether its NAT's mapping varies by destination.
    """

    noisy = False

    def __init__(self, main: RendezvousProtocol) -> None:
        self._main = main
        self._gathers = Gathers(
            lambda: main.directory, main.gather_limiter, main.counters, self._send
        )

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if datagram[:2] != b"\x00\x01":
            self._main.counters["dropped-alternate-not-binding"] += 1
            return
        try:
            self._main._binding(datagram, (addr[0], addr[1]), self._gathers, self._send)
        except Exception:
            self._main.counters["internal-error"] += 1
            log.failure("unexpected error handling a datagram from {source}", source=addr[0])

    def _send(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            if self.transport is not None:
                self.transport.write(data, address)
        except OSError as e:
            self._main.counters[f"send-error-{e.errno}"] += 1
