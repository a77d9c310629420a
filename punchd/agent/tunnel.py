"""
One tunnel being punched, from a fresh socket to a hand-off (docs/protocol.rst).

L{TunnelMachine} is the explicit state machine; L{Tunnel} is the glue that
owns the socket, turns datagrams and timers into the machine's inputs, and
answers the peer's checks (which it does the same way in every state until
the hand-off).  The machine decides; the glue does the I/O.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.api import HandOff, TunnelFailed
from punchd.agent.tunnel_socket import TunnelSocket
from punchd.keys import PrivateKey, PublicKey, derive_tunnel_key
from punchd.retransmit import Backoff, RequestTimedOut, Transactions
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind, format_address

log = Logger()

PACING = 0.02
GATHER_BACKOFF = Backoff(initial=0.1, maximum=0.4, attempts=5)
CHECK_BACKOFF = Backoff(initial=0.1, maximum=0.5, attempts=40)
NOMINATE_BACKOFF = Backoff(initial=0.1, maximum=0.4, attempts=16)
GRACE = 0.05
GRACE_MIN = 0.005
WAIT_LIMIT = 1.0
LINGER_MIN = 0.005
LINGER_MAX = 0.5
WAIT_MIN = 0.02
TRIGGER_GAP = 0.01
# Without a confirmation, the responder hands off only after this long with no
# nomination retransmission: under heavy loss those can be seconds apart, and
# handing off too early lets the rest reach the program.
QUIET = 3.0
CONFIRM_COPIES = 3
MAX_PEER_REFLEXIVE = 8
ABANDON_COPIES = 2
ABANDON_TARGETS = 8
EARLY_BUFFER = 16

Address = tuple[str, int]
#: What an introduction yields the initiator: the peer's candidates, its
#: public key, and the responder's nonce for the tunnel key.
Introduced = tuple[list[Candidate], PublicKey, bytes]


class TunnelMachine(Protocol):
    """
    Inputs of one tunnel's state machine.
    """

    def gathered(self, srflx: Candidate | None) -> None:
        "Our candidates are known."

    def introduced(self, remote: list[Candidate], peer_key: PublicKey, nonce: bytes) -> None:
        "The peer accepted; here are its candidates and key (initiator)."

    def refused(self, code: str, message: str) -> None:
        "The introduction failed (initiator)."

    def checkSucceeded(self, remote: Address) -> None:
        "One of our checks to C{remote} was answered."

    def graceIsOver(self) -> None:
        "Time to pick among the pairs that work (initiator)."

    def nominationAnswered(self) -> None:
        "The peer acknowledged our nomination (initiator)."

    def nominationFailed(self) -> None:
        "The nomination went unanswered (initiator)."

    def nominated(self, remote: Address) -> None:
        "The peer nominated the path from C{remote} (responder)."

    def confirmed(self) -> None:
        "The peer has handed off (responder)."

    def quietPeriodIsOver(self) -> None:
        "No confirmation and no more nominations for a while (responder)."

    def programSpoke(self) -> None:
        "The peer's program sent data on the nominated path."

    def lingerIsOver(self) -> None:
        "Stragglers have had their chance; hand off."

    def deadlineIsReached(self) -> None:
        "The caller's timeout ran out."

    def cancel(self) -> None:
        "The caller gave up."

    def peerGaveUp(self) -> None:
        "The peer's agent abandoned this tunnel."

    def describe(self) -> str:
        "The state's name."


@dataclass
class RemoteState:
    """
    What we know of one remote address: how it was learned and what was heard.
    """

    candidate: Candidate
    checks_sent: int = 0
    answered: bool = False
    heard: bool = False
    rtt: float | None = None
    mapped: Address | None = None
    in_progress: bool = False
    transaction_id: bytes | None = None
    triggered_at: float = float("-inf")

    @property
    def priority(self) -> int:
        """
        Direct LAN over reflexive over relayed; within a type, IPv6 first
        (no NAT in its way, as RFC 8421 prefers for ICE).
        """
        return self.candidate.kind.preference * 2 + (":" in self.candidate.host)


@dataclass
class TunnelCore:
    """
    Everything one tunnel knows; the machine's behaviours work on it.
    """

    glue: Tunnel
    deadline: IDelayedCall | None = None
    timer: IDelayedCall | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class Tunnel:
    """
    The glue around one L{TunnelMachine}: socket, candidates, checks, timers.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        role: str,
        peer: str,
        service: str,
        tunnel_id: bytes,
        own_key: PrivateKey,
        rendezvous: Address | None,
        timeout: float,
        host_addresses: list[str],
        progress: Callable[[dict[str, Any]], None] = lambda event: None,
        introduce: Callable[[list[Candidate]], Deferred[Introduced]] | None = None,
        peer_key: PublicKey | None = None,
        remote_candidates: list[Candidate] | None = None,
        wait_for_peer: bool = False,
        check_budget: float | None = None,
    ) -> None:
        self.reactor = reactor
        self.wait_for_peer = wait_for_peer
        self.check_budget = check_budget
        self.check_timer: IDelayedCall | None = None
        self.rendezvous_rtt: float | None = None
        self.wait_timer: IDelayedCall | None = None
        self.clock: IReactorTime = reactor
        self.role = role
        self.peer = peer
        self.service = service
        self.tunnel_id = tunnel_id
        self.id_hex = tunnel_id.hex()
        self.own_key = own_key
        self.rendezvous = rendezvous
        self.timeout = timeout
        self.progress = progress
        self._introduce = introduce
        self.started_at = self.clock.seconds()
        self.result: Deferred[HandOff] = Deferred(lambda d: self.machine.cancel())
        self.gathered_result: Deferred[list[Candidate]] = Deferred()
        self.socket = TunnelSocket(self._fdset(), self._datagram, self._keep_for_program)
        self.socket6 = self._ipv6_socket() if any(":" in h for h in host_addresses) else None
        self.local_candidates = [
            Candidate(CandidateKind.HOST, h, self._socket_for(h).local[1])
            for h in host_addresses
            if ":" not in h or self.socket6 is not None
        ]
        self.srflx: Candidate | None = None
        self.remotes: dict[Address, RemoteState] = {}
        self.queue: list[Address] = []
        self.transactions: Transactions[tuple[stun.Message, Address]] = Transactions(self.clock)
        self.key: bytes | None = None
        self.early: list[tuple[bytes, Address]] = []
        self.confirmations: set[bytes] = set()
        self.gather_id: bytes | None = None
        self.check_targets: dict[bytes, Address] = {}
        self.peer_gave_up = False
        self.rtt_samples: list[float] = []
        self.nominated_at: float | None = None
        self.pacer: LoopingCall | None = None
        self.grace_timer: IDelayedCall | None = None
        self.nominated_remote: Address | None = None
        self.intro_deferred: Deferred[Introduced] | None = None
        self.core = TunnelCore(self)
        self.machine: TunnelMachine = build_tunnel_machine(self.core)
        # The responder's half of the tunnel key's salt, fresh per introduction.
        self.nonce = os.urandom(wire.TUNNEL_ID_LENGTH) if role == "responder" else b""
        if peer_key is not None:
            self.set_peer_key(peer_key, self.nonce)
        for candidate in remote_candidates or []:
            self.add_remote(candidate)
        for each in self.sockets():
            each.start_reading()
        self.core.deadline = self.clock.callLater(timeout, self.machine.deadlineIsReached)
        self._gather()

    def _fdset(self) -> IReactorFDSet:
        fdset: IReactorFDSet = self.reactor
        return fdset

    # -- sockets: one per address family ---------------------------------

    def _ipv6_socket(self) -> TunnelSocket | None:
        try:
            return TunnelSocket(
                self._fdset(), self._datagram, self._keep_for_program, family=socket.AF_INET6
            )
        except OSError as e:
            log.info("no IPv6 candidates: {error}", error=e)
            return None

    def sockets(self) -> list[TunnelSocket]:
        return [self.socket] if self.socket6 is None else [self.socket, self.socket6]

    def _socket_for(self, host: str) -> TunnelSocket:
        if ":" in host and self.socket6 is not None:
            return self.socket6
        return self.socket

    def send(self, data: bytes, address: Address) -> None:
        if ":" in address[0] and self.socket6 is None:
            return
        self._socket_for(address[0]).send(data, address)

    def peek_before_reading(self) -> None:
        """
        From now on the peer's program may speak: look before consuming.
        """
        for each in self.sockets():
            each.peeking = True

    # -- identity and keys ----------------------------------------------

    @property
    def peer_role(self) -> str:
        return "b" if self.role == "initiator" else "a"

    @property
    def own_role(self) -> str:
        return "a" if self.role == "initiator" else "b"

    def set_peer_key(self, peer_key: PublicKey, nonce: bytes) -> None:
        self.key = derive_tunnel_key(self.own_key, peer_key, self.tunnel_id, nonce)
        early, self.early = self.early, []
        for data, source in early:
            self._datagram(data, source)

    # -- candidates ------------------------------------------------------

    def _gather(self) -> None:
        if self.rendezvous is None:
            self.machine.gathered(None)
            return
        transaction_id = stun.new_transaction_id()
        self.gather_id = transaction_id
        request = stun.build(Method.BINDING, MessageClass.REQUEST, transaction_id, fingerprint=True)
        rendezvous = self.rendezvous
        sent_at = [self.clock.seconds()]

        def send() -> None:
            sent_at[0] = self.clock.seconds()
            self.send(request, rendezvous)

        d = self.transactions.start(transaction_id, send, GATHER_BACKOFF)

        def mapped(answer: tuple[stun.Message, Address]) -> None:
            message, _ = answer
            self.rendezvous_rtt = self.clock.seconds() - sent_at[0]
            value = message.get(Attr.XOR_MAPPED_ADDRESS)
            srflx = None
            if message.cls == MessageClass.SUCCESS and value is not None:
                try:
                    host, port = stun.decode_xor_address(value, message.transaction_id)
                    srflx = Candidate(CandidateKind.SRFLX, host, port)
                except stun.StunError:
                    pass
            self.machine.gathered(srflx)

        def unmapped(failure: Failure) -> None:
            if failure.check(RequestTimedOut):
                log.info(
                    "tunnel {id}: no server-reflexive address (rendezvous silent)", id=self.id_hex
                )
                self.machine.gathered(None)

        d.addCallbacks(mapped, unmapped)

    def candidates(self) -> list[Candidate]:
        result = list(self.local_candidates)
        if self.srflx is not None and self.srflx.address not in {c.address for c in result}:
            result.append(self.srflx)
        return result[: wire.MAX_CANDIDATES]

    def add_remote(self, candidate: Candidate) -> RemoteState:
        address = wire.normalize_address(candidate.address)
        state = self.remotes.get(address)
        if state is None:
            state = RemoteState(Candidate(candidate.kind, *address))
            self.remotes[address] = state
            self.queue.append(address)
            self.queue.sort(key=lambda a: -self.remotes[a].priority)
        elif state.candidate.kind == CandidateKind.PRFLX and candidate.kind != CandidateKind.PRFLX:
            state.candidate = Candidate(candidate.kind, *address)
        return state

    def best_possible(self) -> int:
        return max(
            (r.priority for r in self.remotes.values() if not r.answered),
            default=-1,
        )

    # -- checks ----------------------------------------------------------

    def start_checks(self) -> None:
        """
        Check every known remote at once (there are at most a few dozen tiny
        datagrams), then pace checks of remotes learned later.
        """
        if self.wait_timer is not None and self.wait_timer.active():
            self.wait_timer.cancel()
        if self.pacer is None:
            for address in list(self.queue):
                remote = self.remotes[address]
                if not (remote.in_progress or remote.answered):
                    self._check(address, remote, nominate=False)
            self.queue.clear()
            self.pacer = LoopingCall(self._pace)
            self.pacer.clock = self.clock
            self.pacer.start(PACING, now=False)

    def round_spent(self) -> None:
        """
        The round's probing budget ran out.  If nothing at all got through,
        give up now so that another round can try the other order; if
        anything did, the path is just lossy: keep going to the deadline.
        """
        if any(r.heard or r.answered for r in self.remotes.values()):
            return
        self.machine.deadlineIsReached()

    def wait_time(self) -> float:
        """
        How long a responder told to wait holds its first checks: long enough
        for our answer to reach the initiator through the rendezvous and its
        first checks to leave its NAT (the checks themselves may never get
        here: our own NAT drops them until we have sent).
        """
        rtt = self.rendezvous_rtt if self.rendezvous_rtt is not None else WAIT_LIMIT / 4
        return min(WAIT_LIMIT, max(WAIT_MIN, 3 * rtt + 0.01))

    def grace(self, remote: Address) -> float:
        """
        How long to wait for a better pair after C{remote} answered: all
        first checks left together, so a better path answers within about
        one more round trip of this one, or not at all.
        """
        rtt = self.remotes[remote].rtt or 0.0
        return min(GRACE, max(GRACE_MIN, 2 * rtt))

    def stop_checks(self) -> None:
        if self.wait_timer is not None and self.wait_timer.active():
            self.wait_timer.cancel()
        if self.pacer is not None and self.pacer.running:
            self.pacer.stop()
        self.pacer = None
        self.queue.clear()
        if self.grace_timer is not None and self.grace_timer.active():
            self.grace_timer.cancel()
        self.grace_timer = None
        self.transactions.cancel_all()

    def _pace(self) -> None:
        while self.queue:
            address = self.queue.pop(0)
            remote = self.remotes[address]
            if remote.in_progress or remote.answered:
                continue
            self._check(address, remote, nominate=False)
            return

    def _check_request(self, nominate: bool) -> tuple[bytes, bytes]:
        assert self.key is not None
        transaction_id = stun.new_transaction_id()
        attributes: list[tuple[int, bytes]] = [
            (Attr.USERNAME, f"{self.id_hex}:{self.own_role}".encode("ascii")),
            (Attr.PRIORITY, stun.encode_u32(CandidateKind.PRFLX.preference << 24)),
        ]
        if nominate:
            attributes.append((Attr.USE_CANDIDATE, b""))
        data = wire.signed(
            Method.BINDING, MessageClass.REQUEST, transaction_id, attributes, self.key
        )
        return transaction_id, data

    def _check(
        self, address: Address, remote: RemoteState, nominate: bool
    ) -> Deferred[tuple[stun.Message, Address]]:
        transaction_id, data = self._check_request(nominate)
        # Only an answer from where the check went counts (as in ICE).
        self.check_targets[transaction_id] = address
        remote.in_progress = True
        remote.transaction_id = transaction_id

        last_sent = [self.clock.seconds()]

        def send() -> None:
            remote.checks_sent += 1
            last_sent[0] = self.clock.seconds()
            self.send(data, address)

        d = self.transactions.start(
            transaction_id, send, self.nominate_backoff(remote) if nominate else CHECK_BACKOFF
        )

        def answered(answer: tuple[stun.Message, Address]) -> tuple[stun.Message, Address]:
            message, _ = answer
            remote.in_progress = False
            remote.answered = True
            # The latest send is the likeliest one answered (Karn's caveat aside).
            remote.rtt = self.clock.seconds() - last_sent[0]
            log.debug(
                "tunnel {id}: {remote} answered after {sends} sends, rtt {rtt:.1f} ms",
                id=self.id_hex[:12],
                remote=remote.candidate,
                sends=remote.checks_sent,
                rtt=remote.rtt * 1000,
            )
            value = message.get(Attr.XOR_MAPPED_ADDRESS)
            if value is not None:
                try:
                    remote.mapped = stun.decode_xor_address(value, message.transaction_id)
                except stun.StunError:
                    pass
            return answer

        def failed(failure: Failure) -> Failure:
            remote.in_progress = False
            return failure

        d.addCallbacks(answered, failed)
        if not nominate:
            d.addCallbacks(lambda _: self.machine.checkSucceeded(address), lambda f: None)
        return d

    def nominate_backoff(self, remote: RemoteState) -> Backoff:
        """
        Retransmit the nomination no sooner than the path can answer: an
        early resend on a slow path only earns a second answer that could
        arrive after the hand-off.
        """
        rtt = remote.rtt or 0.0
        initial = min(1.0, max(NOMINATE_BACKOFF.initial, 2 * rtt))
        return Backoff(initial, max(NOMINATE_BACKOFF.maximum, initial), NOMINATE_BACKOFF.attempts)

    def nominate(self, address: Address) -> None:
        self.stop_checks()
        self.nominated_remote = address
        remote = self.remotes[address]
        remote.in_progress = False
        self.progress({"event": "nominating", "remote": format_address(address)})
        log.debug("tunnel {id}: nominating {remote}", id=self.id_hex[:12], remote=remote.candidate)
        self._check(address, remote, nominate=True).addCallbacks(
            lambda _: self.machine.nominationAnswered(),
            lambda f: self.machine.nominationFailed() if f.check(RequestTimedOut) else None,
        )

    def send_confirm(self) -> None:
        assert self.key is not None and self.nominated_remote is not None
        for _ in range(CONFIRM_COPIES):
            data = wire.signed(
                Method.CONFIRM,
                MessageClass.INDICATION,
                stun.new_transaction_id(),
                [(Attr.USERNAME, f"{self.id_hex}:{self.own_role}".encode("ascii"))],
                self.key,
            )
            self.send(data, self.nominated_remote)

    def linger_time(self) -> float:
        """
        How long to keep reading before the hand-off: our own late answers and
        the peer's stragglers trail by up to the path's jitter, which the
        slowest round trip we measured bounds.  Capped, because on a busy
        agent the measured RTT is mostly its own queueing.
        """
        rtts = [r.rtt for r in self.remotes.values() if r.rtt is not None] + self.rtt_samples
        rtt = max(rtts) if rtts else 0.05
        return min(LINGER_MAX, max(LINGER_MIN, 2 * rtt + 0.002))

    # -- datagrams in ----------------------------------------------------

    def _authentic(self, message: stun.Message) -> bool:
        if self.key is None:
            return False
        username = message.get(Attr.USERNAME)
        return username == f"{self.id_hex}:{self.peer_role}".encode("ascii") and (
            stun.verify_integrity_sha256(message, self.key)
        )

    def ours(self, data: bytes, source: Address) -> bool:
        """
        Is this datagram punchd's own (a check, an answer, a confirmation)
        rather than the peer program's?
        """
        try:
            message = stun.parse(data)
        except stun.StunError:
            return False
        if message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            # An answer to our gathering request or to one of our checks.
            tid = message.transaction_id
            return tid == self.gather_id or tid in self.check_targets
        return self._authentic(message)

    def _keep_for_program(self, data: bytes, source: Address) -> bool:
        keep = (
            self.nominated_remote is not None
            and wire.normalize_address(source) == self.nominated_remote
            and not self.ours(data, source)
        )
        if keep:
            # The socket stops reading to leave this datagram queued: hand off now.
            self.machine.programSpoke()
        return keep

    def _datagram(self, data: bytes, source: Address) -> None:
        try:
            self._handle(data, wire.normalize_address(source))
        except Exception:
            log.failure("tunnel {id}: unexpected error handling a datagram", id=self.id_hex)

    def _handle(self, data: bytes, source: Address) -> None:
        try:
            message = stun.parse(data)
        except stun.StunError:
            return
        if message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            transaction_id = message.transaction_id
            if transaction_id not in self.transactions:
                return
            if transaction_id == self.gather_id:
                # The one unsigned exchange: plain STUN with the rendezvous.
                if message.method == Method.BINDING and source == self.rendezvous:
                    self.transactions.answer(transaction_id, (message, source))
                return
            if (
                message.cls == MessageClass.SUCCESS
                and self.check_targets.get(transaction_id) == source
                and self.key is not None
                and stun.verify_integrity_sha256(message, self.key)
            ):
                self.transactions.answer(transaction_id, (message, source))
            return
        if self.key is None:
            if len(self.early) < EARLY_BUFFER:
                self.early.append((data, source))
            return
        if not self._authentic(message):
            return
        if message.method == Method.BINDING and message.cls == MessageClass.REQUEST:
            self._answer_check(message, source)
        elif message.method == Method.ABANDON and message.cls == MessageClass.INDICATION:
            self.machine.peerGaveUp()
        elif message.method == Method.CONFIRM and message.cls == MessageClass.INDICATION:
            self.confirmations.add(message.transaction_id)
            if source == self.nominated_remote:
                if self.nominated_at is not None and len(self.confirmations) == 1:
                    # Our answer to the nomination went out, the confirmation
                    # came back: a round trip on this very path.
                    self.rtt_samples.append(self.clock.seconds() - self.nominated_at)
                self.machine.confirmed()

    def _answer_check(self, message: stun.Message, source: Address) -> None:
        assert self.key is not None
        remote = self.remotes.get(source)
        if remote is None:
            learned = sum(r.candidate.kind == CandidateKind.PRFLX for r in self.remotes.values())
            if learned >= MAX_PEER_REFLEXIVE:
                # A peer behind NATs shows up from a few addresses, not dozens:
                # a replayed check from everywhere must not make us check
                # (and answer) everywhere.
                return
            remote = self.add_remote(Candidate(CandidateKind.PRFLX, *source))
            log.debug(
                "tunnel {id}: learned peer-reflexive {address}",
                id=self.id_hex,
                address=format_address(source),
            )
        remote.heard = True
        answer = wire.signed(
            Method.BINDING,
            MessageClass.SUCCESS,
            message.transaction_id,
            [(Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(*source, message.transaction_id))],
            self.key,
        )
        self.send(answer, source)
        if message.has(Attr.USE_CANDIDATE) and self.role == "responder":
            self.machine.nominated(source)
        elif self.wait_timer is not None and self.wait_timer.active():
            self.start_checks()
        elif self.pacer is not None and not remote.answered:
            self._trigger(source, remote)

    def _trigger(self, address: Address, remote: RemoteState) -> None:
        """
        The peer's check just came through from C{address}, so the path is
        open now: check back at once (ICE's triggered check) instead of
        waiting for the pacer or for a retransmission timer.
        """
        now = self.clock.seconds()
        if remote.in_progress:
            if remote.transaction_id is not None and now - remote.triggered_at >= TRIGGER_GAP:
                remote.triggered_at = now
                self.transactions.resend(remote.transaction_id)
            return
        if address in self.queue:
            self.queue.remove(address)
        remote.triggered_at = now
        self._check(address, remote, nominate=False)

    # -- endings ---------------------------------------------------------

    def local_kind(self, remote: RemoteState) -> str:
        if remote.mapped is None:
            return "srflx" if self.srflx is not None else "host"
        if remote.mapped in {c.address for c in self.local_candidates}:
            return "host"
        if self.srflx is not None and remote.mapped == self.srflx.address:
            return "srflx"
        return "prflx"

    def hand_off(self) -> None:
        address = self.nominated_remote
        assert address is not None
        remote = self.remotes[address]
        self.stop_checks()
        chosen = self._socket_for(address[0])
        try:
            sock = chosen.release(address, self.ours)
        except OSError as e:
            self.fail("internal", f"the tunnel socket could not be handed off: {e.strerror}")
            return
        for other in self.sockets():
            if other is not chosen:
                other.close()
        setup = self.clock.seconds() - self.started_at
        info = {
            "id": self.id_hex,
            "peer": self.peer,
            "service": self.service,
            "role": self.role,
            "local": format_address(remote.mapped)
            if remote.mapped
            else format_address(chosen.local),
            "remote": format_address(address),
            "path": "direct",
            "candidates": {"local": self.local_kind(remote), "remote": remote.candidate.kind.label},
            "rtt_ms": round((remote.rtt or 0.0) * 1000, 3),
            "setup_ms": round(setup * 1000, 3),
        }
        log.info(
            "tunnel {id} to {peer} for {service}: direct via {remote} "
            "({local_kind} -> {remote_kind}) in {setup_ms} ms",
            id=self.id_hex[:12],
            peer=self.peer,
            service=self.service,
            remote=info["remote"],
            local_kind=info["candidates"]["local"],  # type: ignore[index]
            remote_kind=info["candidates"]["remote"],  # type: ignore[index]
            setup_ms=info["setup_ms"],
        )
        self.result.callback(HandOff(sock, info))

    def explain(self) -> str:
        """
        Why no path was found: what was tried and what was heard.
        """
        if not self.remotes:
            return "the peer offered no candidates"
        parts = []
        for address, remote in self.remotes.items():
            heard = "answered" if remote.answered else ("heard from" if remote.heard else "silent")
            label = f"{remote.candidate.kind.label} {format_address(address)}"
            parts.append(f"{label}: {remote.checks_sent} checks, {heard}")
        heard_any = any(r.heard for r in self.remotes.values())
        answered_any = any(r.answered for r in self.remotes.values())
        if answered_any:
            why = "a path answered but the nomination was lost"
        elif heard_any:
            why = (
                "the peer's checks reached us but our checks never reached it (its NAT filters us)"
            )
        else:
            why = (
                "no check got through either way "
                "(both NATs filter, or a symmetric NAT hides the port)"
            )
        return f"no direct path to {self.peer}: {why}; tried " + "; ".join(parts)

    def send_abandon(self) -> None:
        """
        Tell the peer, best effort, over the paths that worked, that this
        tunnel is over: it stops probing and hands nothing to its program.
        """
        if self.key is None or self.peer_gave_up:
            return
        if self.nominated_remote is not None:
            targets = [self.nominated_remote]
        else:
            targets = [a for a, r in self.remotes.items() if r.answered or r.heard]
        for address in targets[:ABANDON_TARGETS]:
            for _ in range(ABANDON_COPIES):
                data = wire.signed(
                    Method.ABANDON,
                    MessageClass.INDICATION,
                    stun.new_transaction_id(),
                    [(Attr.USERNAME, f"{self.id_hex}:{self.own_role}".encode("ascii"))],
                    self.key,
                )
                self.send(data, address)

    def fail(self, code: str, message: str) -> None:
        self.stop_checks()
        self.send_abandon()
        if self.intro_deferred is not None:
            d, self.intro_deferred = self.intro_deferred, None
            d.cancel()
        for each in self.sockets():
            each.close()
        log.info(
            "tunnel {id} to {peer} for {service} failed after {ms} ms: {code}: {message}",
            id=self.id_hex[:12],
            peer=self.peer,
            service=self.service,
            ms=round((self.clock.seconds() - self.started_at) * 1000),
            code=code,
            message=message,
        )
        if not self.result.called:
            self.result.errback(TunnelFailed(code, message))
        if self.role == "responder" and not self.gathered_result.called:
            # Only a responder's introduction waits on it; an initiator's
            # failure here would be logged as an unhandled error.
            self.gathered_result.errback(TunnelFailed(code, message))

    def introduce(self) -> None:
        assert self._introduce is not None
        candidates = self.candidates()
        self.progress({"event": "gathered", "candidates": [str(c) for c in candidates]})
        d = self._introduce(candidates)
        self.intro_deferred = d

        def ok(result: Introduced) -> None:
            self.intro_deferred = None
            self.machine.introduced(*result)

        def no(failure: Failure) -> None:
            self.intro_deferred = None
            if failure.check(CancelledError):
                return
            if isinstance(failure.value, TunnelFailed):
                self.machine.refused(failure.value.code, failure.value.message)
            else:
                self.machine.refused(
                    "timeout", f"the rendezvous did not answer ({failure.getErrorMessage()})"
                )

        d.addCallbacks(ok, no)

    def cleanup(self) -> None:
        if self.core.deadline is not None and self.core.deadline.active():
            self.core.deadline.cancel()
        if self.check_timer is not None and self.check_timer.active():
            self.check_timer.cancel()
        self.core.cancel_timer()


def build_tunnel_machine_factory() -> Callable[[TunnelCore], TunnelMachine]:
    builder = TypeMachineBuilder(TunnelMachine, TunnelCore)
    gathering = builder.state("gathering")
    introducing = builder.state("introducing")
    checking = builder.state("checking")
    nominating = builder.state("nominating")
    awaiting_confirm = builder.state("awaiting confirmation")
    lingering = builder.state("lingering")
    handed_off = builder.state("handed off")
    failed = builder.state("failed")
    live = [gathering, introducing, checking, nominating, awaiting_confirm, lingering]

    @gathering.upon(TunnelMachine.gathered).to(introducing)
    def gathered_then_introduce(
        m: TunnelMachine, core: TunnelCore, srflx: Candidate | None
    ) -> None:
        tunnel = core.glue
        tunnel.srflx = srflx
        if tunnel.role == "initiator":
            tunnel.introduce()
        else:
            if not tunnel.wait_for_peer:
                # Our first checks must leave before our answer can reach the
                # initiator: its checks then find our NAT already open toward
                # it, even if that NAT would let an early arrival claim our
                # mapping (design.md §6) and even if we lose the CPU now.
                tunnel.start_checks()
            tunnel.gathered_result.callback(tunnel.candidates())
            m.introduced([], tunnel.own_key.public_key(), tunnel.nonce)

    @introducing.upon(TunnelMachine.introduced).to(checking)
    def start_checking(
        m: TunnelMachine,
        core: TunnelCore,
        remote: list[Candidate],
        peer_key: PublicKey,
        nonce: bytes,
    ) -> None:
        tunnel = core.glue
        if tunnel.role == "initiator":
            for candidate in remote:
                tunnel.add_remote(candidate)
            tunnel.set_peer_key(peer_key, nonce)
            tunnel.progress({"event": "introduced", "candidates": [str(c) for c in remote]})
        tunnel.progress({"event": "probing", "pairs": len(tunnel.remotes)})
        log.debug(
            "tunnel {id}: checking {count} remotes: {remotes}",
            id=tunnel.id_hex[:12],
            count=len(tunnel.remotes),
            remotes=", ".join(str(r.candidate) for r in tunnel.remotes.values()),
        )
        if tunnel.check_budget is not None:
            # This round may probe for so long; the introduction had its own time.
            tunnel.check_timer = tunnel.clock.callLater(tunnel.check_budget, tunnel.round_spent)
        if tunnel.wait_for_peer:
            tunnel.wait_timer = tunnel.clock.callLater(tunnel.wait_time(), tunnel.start_checks)
        else:
            tunnel.start_checks()

    @introducing.upon(TunnelMachine.refused).to(failed)
    def refused(m: TunnelMachine, core: TunnelCore, code: str, message: str) -> None:
        core.glue.cleanup()
        core.glue.fail(code, message)

    @checking.upon(TunnelMachine.checkSucceeded).loop()
    def consider(m: TunnelMachine, core: TunnelCore, remote: Address) -> None:
        tunnel = core.glue
        if tunnel.role != "initiator":
            return
        preference = tunnel.remotes[remote].priority
        if preference >= tunnel.best_possible():
            m.graceIsOver()
        elif tunnel.grace_timer is None:
            tunnel.grace_timer = tunnel.clock.callLater(tunnel.grace(remote), m.graceIsOver)

    @checking.upon(TunnelMachine.graceIsOver).to(nominating)
    def nominate_best(m: TunnelMachine, core: TunnelCore) -> None:
        tunnel = core.glue
        answered = [a for a, r in tunnel.remotes.items() if r.answered]
        tunnel.nominate(max(answered, key=lambda a: tunnel.remotes[a].priority))

    @nominating.upon(TunnelMachine.nominationAnswered).to(lingering)
    def confirm_and_linger(m: TunnelMachine, core: TunnelCore) -> None:
        tunnel = core.glue
        tunnel.send_confirm()
        tunnel.peek_before_reading()
        core.timer = tunnel.clock.callLater(tunnel.linger_time(), m.lingerIsOver)

    @nominating.upon(TunnelMachine.nominationFailed).to(failed)
    def nomination_lost(m: TunnelMachine, core: TunnelCore) -> None:
        core.glue.cleanup()
        core.glue.fail("unreachable", core.glue.explain())

    @checking.upon(TunnelMachine.nominated).to(awaiting_confirm)
    def await_confirmation(m: TunnelMachine, core: TunnelCore, remote: Address) -> None:
        tunnel = core.glue
        tunnel.stop_checks()
        tunnel.nominated_remote = remote
        tunnel.nominated_at = tunnel.clock.seconds()
        log.debug(
            "tunnel {id}: the peer nominated {remote}",
            id=tunnel.id_hex[:12],
            remote=format_address(remote),
        )
        tunnel.peek_before_reading()
        core.timer = tunnel.clock.callLater(QUIET, m.quietPeriodIsOver)

    @awaiting_confirm.upon(TunnelMachine.nominated).loop()
    def renominated(m: TunnelMachine, core: TunnelCore, remote: Address) -> None:
        core.cancel_timer()
        core.timer = core.glue.clock.callLater(QUIET, m.quietPeriodIsOver)

    @awaiting_confirm.upon(TunnelMachine.confirmed).to(lingering)
    @lingering.upon(TunnelMachine.confirmed).loop()
    def linger(m: TunnelMachine, core: TunnelCore) -> None:
        # Each copy of the confirmation restarts the wait: once every copy is
        # in, only network duplicates can trail, so a short tail will do;
        # until then a copy may just be late (or lost), so wait a full linger.
        tunnel = core.glue
        core.cancel_timer()
        if len(tunnel.confirmations) >= CONFIRM_COPIES:
            wait = LINGER_MIN
        else:
            wait = tunnel.linger_time()
        core.timer = tunnel.clock.callLater(wait, m.lingerIsOver)

    @awaiting_confirm.upon(TunnelMachine.quietPeriodIsOver).to(handed_off)
    @awaiting_confirm.upon(TunnelMachine.programSpoke).to(handed_off)
    @awaiting_confirm.upon(TunnelMachine.deadlineIsReached).to(handed_off)
    @lingering.upon(TunnelMachine.lingerIsOver).to(handed_off)
    @lingering.upon(TunnelMachine.programSpoke).to(handed_off)
    @lingering.upon(TunnelMachine.deadlineIsReached).to(handed_off)
    def hand_off(m: TunnelMachine, core: TunnelCore) -> None:
        core.glue.cleanup()
        core.glue.hand_off()

    @gathering.upon(TunnelMachine.deadlineIsReached).to(failed)
    @introducing.upon(TunnelMachine.deadlineIsReached).to(failed)
    def too_slow(m: TunnelMachine, core: TunnelCore) -> None:
        core.glue.cleanup()
        core.glue.fail("timeout", f"{core.glue.peer} did not answer in time")

    @checking.upon(TunnelMachine.deadlineIsReached).to(failed)
    @nominating.upon(TunnelMachine.deadlineIsReached).to(failed)
    def no_path(m: TunnelMachine, core: TunnelCore) -> None:
        core.glue.cleanup()
        core.glue.fail("unreachable", core.glue.explain())

    for state in live:

        @state.upon(TunnelMachine.cancel).to(failed)
        def cancelled(m: TunnelMachine, core: TunnelCore) -> None:
            core.glue.cleanup()
            core.glue.fail("cancelled", "the tunnel was cancelled")

        @state.upon(TunnelMachine.peerGaveUp).to(failed)
        def abandoned(m: TunnelMachine, core: TunnelCore) -> None:
            tunnel = core.glue
            tunnel.cleanup()
            tunnel.peer_gave_up = True
            if tunnel.role == "initiator":
                tunnel.fail("unreachable", f"{tunnel.explain()}; the peer gave up")
            else:
                tunnel.fail("cancelled", f"{tunnel.peer} gave up on the tunnel")

    ignored = {
        gathering: ["checkSucceeded", "confirmed", "nominated", "programSpoke", "graceIsOver"],
        introducing: ["checkSucceeded", "confirmed", "nominated", "programSpoke", "graceIsOver"],
        checking: ["confirmed", "programSpoke", "gathered"],
        nominating: ["checkSucceeded", "graceIsOver", "confirmed", "nominated", "programSpoke"],
        awaiting_confirm: ["checkSucceeded", "graceIsOver"],
        lingering: [
            "checkSucceeded",
            "graceIsOver",
            "nominated",
            "nominationAnswered",
        ],
    }
    every_input = [
        "gathered",
        "introduced",
        "refused",
        "checkSucceeded",
        "graceIsOver",
        "nominationAnswered",
        "nominationFailed",
        "nominated",
        "confirmed",
        "quietPeriodIsOver",
        "programSpoke",
        "lingerIsOver",
        "deadlineIsReached",
        "cancel",
        "peerGaveUp",
    ]
    for state, names in ignored.items():
        for name in names:
            state.upon(getattr(TunnelMachine, name)).loop().returns(None)
    for state in (handed_off, failed):
        for name in every_input:
            state.upon(getattr(TunnelMachine, name)).loop().returns(None)
    for state in [*live, handed_off, failed]:
        state.upon(TunnelMachine.describe).loop().returns(state.name)

    return builder.build()


build_tunnel_machine = build_tunnel_machine_factory()


def new_tunnel_id() -> bytes:
    return os.urandom(wire.TUNNEL_ID_LENGTH)
