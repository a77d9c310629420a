"""
One tunnel being punched, from a fresh socket to a hand-off (docs/protocol.rst).

L{TunnelInputs} is the explicit state machine; its behaviours work on a
L{TunnelCore}, which owns the data.  L{Tunnel} is the glue: it owns the
sockets, turns datagrams and timers into the machine's inputs, and does the
I/O the machine asks for (L{TunnelIO}).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent.api import HandOff, ProgressCallback, TunnelFailed
from punchd.agent.birthday import HARD_SIDE_MARGIN, BirthdayPlan, SocketBudget
from punchd.agent.checks import Checking, check
from punchd.agent.gatherers import ReflexiveGatherer, RelayBinder
from punchd.agent.pairs import Address, Pair
from punchd.agent.portmap import PortMapper
from punchd.agent.roles import Introduced, Role
from punchd.agent.stream_relay import StreamChannel
from punchd.agent.tunnel_core import EXTRA_SOCKETS, StateData, TunnelCore
from punchd.agent.tunnel_socket import TunnelSocket
from punchd.keys import TUNNEL_ID_LENGTH, PrivateKey, PublicKey
from punchd.retransmit import RequestTimedOut
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind, format_address

log = Logger()

# Without a confirmation, the responder hands off only after this long with no
# nomination retransmission: under heavy loss those can be seconds apart, and
# handing off too early lets the rest reach the program.
QUIET = 3.0
EARLY_BUFFER = 16
#: How long the initiator waits, at most, for the responder's last Confirm
#: before handing off.  It comes a round trip after ours unless all three
#: copies are lost; waiting long is cheap then, and a busy responder may be
#: slow to say it.
FINAL_WORD_WAIT = 2.0

#: Makes a tunnel's socket for an address family, given what to do with
#: each datagram read and how to tell one to leave queued for the program.
SocketFactory = Callable[
    [socket.AddressFamily, Callable[[bytes, Address], None], Callable[[bytes, Address], bool]],
    TunnelSocket,
]
#: Makes the channel of the TLS stream for our relay port at an address
#: (the relay over TLS), given the same two functions.
ChannelFactory = Callable[
    [Address, Callable[[bytes, Address], None], Callable[[bytes, Address], bool]],
    StreamChannel,
]


class TunnelInputs(Protocol):
    """
    Inputs of one tunnel's state machine.
    """

    def gathered(self, found: list[Candidate]) -> None:
        "Our candidates beyond the host's are known (server-reflexive, mapped)."

    def introduced(
        self, remote: list[Candidate], peer_key: PublicKey, nonce: bytes, peer_hard: bool = False
    ) -> None:
        "We know the peer's candidates and key (and whether its NAT is hard)."

    def refused(self, code: str, message: str) -> None:
        "The introduction failed (initiator)."

    def peerChecked(self, pair: Pair) -> None:
        "A check from the peer arrived on C{pair} (and was answered)."

    def peerNominated(self, pair: Pair) -> None:
        "The peer nominated C{pair} (responder)."

    def checkSucceeded(self, pair: Pair) -> None:
        "One of our checks on C{pair} was answered."

    def graceIsOver(self) -> None:
        "Time to pick among the pairs that work (initiator)."

    def roundIsSpent(self) -> None:
        "This round's probing budget ran out."

    def nominationAnswered(self) -> None:
        "The peer acknowledged our nomination (initiator)."

    def nominationFailed(self) -> None:
        "The nomination went unanswered (initiator)."

    def confirmed(self) -> None:
        "The peer has handed off, on the chosen pair (responder)."

    def quietPeriodIsOver(self) -> None:
        "No confirmation and no more nominations for a while (responder)."

    def programSpoke(self) -> None:
        "The peer's program sent data on the chosen pair."

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
class Introducing(StateData):
    request: Deferred[Introduced] | None = None

    def stop(self) -> None:
        super().stop()
        if self.request is not None and not self.request.called:
            self.request.cancel()


# -- entering a state: what each state starts, and owns ----------------------


def introduce(m: TunnelInputs, core: TunnelCore, found: list[Candidate]) -> Introducing:
    core.found = found
    data = core.enter(Introducing(core.timers()))
    data.request = core.role.introduce(m, core)
    if data.request is not None:
        data.request.addCallbacks(lambda result: m.introduced(*result), _refusal(m))
    return data


def start_checking(
    m: TunnelInputs,
    core: TunnelCore,
    remote: list[Candidate],
    peer_key: PublicKey,
    nonce: bytes,
    peer_hard: bool = False,
) -> Checking:
    data = core.enter(Checking(core.timers(), core, m.checkSucceeded))
    core.add_remotes(remote)
    core.learn_key(peer_key, nonce)
    spray = core.start_birthday(peer_hard, remote)
    core.progress({"event": "probing", "pairs": len(core.pairs)})
    log.debug(
        "tunnel {id}: checking {count} remotes: {remotes}",
        id=core.id_hex[:12],
        count=len(core.pairs),
        remotes=", ".join(str(p.remote) for p in core.pairs),
    )
    if core.extra_sockets or spray is not None:
        assert core.birthday is not None
        # Past the spray's end no probe can still open a socket's path.
        data.timers.later(core.birthday.duration + HARD_SIDE_MARGIN, core.end_birthday)
    if core.check_budget is not None:
        # This round may probe for so long (birthday probing takes longer);
        # the introduction had its own time.
        budget = core.check_budget
        if core.extra_sockets or spray is not None:
            assert core.birthday is not None
            budget = max(budget, core.birthday.duration + 1.0)
        data.timers.later(budget, m.roundIsSpent)
    if core.role.holds_first_checks:
        core.prime()
        data.hold(core.wait_time())
    else:
        data.start()
    if spray is not None:
        data.start_spray(spray)
    core.role.checks_started(core)
    return data


def nominate(m: TunnelInputs, core: TunnelCore) -> StateData:
    data = core.enter(StateData(core.timers()))
    pair = core.chosen = core.pairs.best_answered()
    core.io.close_extra(keep=pair.local)
    core.progress({"event": "nominating", "remote": format_address(pair.address)})
    log.debug("tunnel {id}: nominating {remote}", id=core.id_hex[:12], remote=pair.remote)
    check(core, pair, nominate=True).addCallbacks(
        lambda _: m.nominationAnswered(),
        lambda f: m.nominationFailed() if f.check(RequestTimedOut) else None,
    )
    return data


def await_confirmation(m: TunnelInputs, core: TunnelCore, pair: Pair) -> StateData:
    data = core.enter(StateData(core.timers()))
    core.chosen, core.chosen_at = pair, core.clock.seconds()
    core.io.close_extra(keep=pair.local)
    log.debug("tunnel {id}: the peer nominated {remote}", id=core.id_hex[:12], remote=pair.remote)
    if not core.connect_chosen():
        m.deadlineIsReached()  # hands off at once, which reports the error
    data.timers.later(QUIET, m.quietPeriodIsOver)
    return data


def linger(m: TunnelInputs, core: TunnelCore) -> StateData:
    return core.enter(StateData(core.timers()))


def _refusal(m: TunnelInputs) -> Callable[[Failure], None]:
    def refused(failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        if isinstance(failure.value, TunnelFailed):
            m.refused(failure.value.code, failure.value.message)
        else:
            why = failure.getErrorMessage()
            m.refused("timeout", f"the rendezvous did not answer ({why})")

    return refused


def build_tunnel_machine_factory() -> Callable[[TunnelCore], TunnelInputs]:
    builder = TypeMachineBuilder(TunnelInputs, TunnelCore)
    gathering = builder.state("gathering")
    introducing = builder.state("introducing", introduce)
    checking = builder.state("checking", start_checking)
    nominating = builder.state("nominating", nominate)
    awaiting = builder.state("awaiting confirmation", await_confirmation)
    lingering = builder.state("lingering", linger)
    handed_off = builder.state("handed off")
    failed = builder.state("failed")
    live: list[Any] = [gathering, introducing, checking, nominating, awaiting, lingering]

    gathering.upon(TunnelInputs.gathered).to(introducing).returns(None)
    introducing.upon(TunnelInputs.introduced).to(checking).returns(None)
    checking.upon(TunnelInputs.graceIsOver).to(nominating).returns(None)
    checking.upon(TunnelInputs.peerNominated).to(awaiting).returns(None)

    @introducing.upon(TunnelInputs.refused).to(failed)
    def refused(
        m: TunnelInputs, core: TunnelCore, data: Introducing, code: str, message: str
    ) -> None:
        core.fail(TunnelFailed(code, message))

    @checking.upon(TunnelInputs.peerChecked).loop()
    def check_back(m: TunnelInputs, core: TunnelCore, data: Checking, pair: Pair) -> None:
        if data.held is not None and data.held.active():
            data.start()
        else:
            data.trigger(pair)

    @checking.upon(TunnelInputs.checkSucceeded).loop()
    def consider(m: TunnelInputs, core: TunnelCore, data: Checking, pair: Pair) -> None:
        if not core.role.nominates:
            return
        if pair.priority >= core.pairs.best_possible():
            m.graceIsOver()
            return
        # The first pair to answer sets the wait for a better one; a better
        # pair answering during a long wait (the relay's) shortens it.
        grace = core.grace(pair)
        if data.grace is None or core.clock.seconds() + grace < data.grace.getTime():
            if data.grace is not None:
                data.grace.cancel()
            data.grace = data.timers.later(grace, m.graceIsOver)

    @checking.upon(TunnelInputs.roundIsSpent).loop()
    def round_spent(m: TunnelInputs, core: TunnelCore, data: Checking) -> None:
        # Nothing at all got through: give up now, so that another round can
        # try the other order.  Anything did: the path is lossy; go on.
        if not core.pairs.anything_heard():
            m.deadlineIsReached()

    @nominating.upon(TunnelInputs.nominationAnswered).to(lingering)
    def confirm(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        if not core.connect_chosen():
            m.deadlineIsReached()  # hands off at once, which reports the error
            return
        core.send_confirm()
        # Until the responder says it is done answering us (or this long).
        core.later(max(FINAL_WORD_WAIT, core.linger_time()), m.lingerIsOver)

    @awaiting.upon(TunnelInputs.peerNominated).loop()
    def renominated(m: TunnelInputs, core: TunnelCore, data: StateData, pair: Pair) -> None:
        data.stop()
        data.timers.later(QUIET, m.quietPeriodIsOver)

    @awaiting.upon(TunnelInputs.confirmed).to(lingering)
    def first_confirmation(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        if len(core.confirmations) == 1:
            # Our answer to the nomination went out, the confirmation came
            # back: a round trip on this very path.
            core.rtt_samples.append(core.clock.seconds() - core.chosen_at)
        # The initiator has chosen and confirmed: it needs no more answers
        # from us, and waits for word that none will come.
        core.done_answering = True
        core.role.last_words(core)
        wait_for_stragglers(m, core)

    @lingering.upon(TunnelInputs.confirmed).loop()
    def another_confirmation(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        data.stop()
        wait_for_stragglers(m, core)

    @awaiting.upon(TunnelInputs.quietPeriodIsOver).to(handed_off)
    @awaiting.upon(TunnelInputs.programSpoke).to(handed_off)
    @awaiting.upon(TunnelInputs.deadlineIsReached).to(handed_off)
    @lingering.upon(TunnelInputs.lingerIsOver).to(handed_off)
    @lingering.upon(TunnelInputs.programSpoke).to(handed_off)
    @lingering.upon(TunnelInputs.deadlineIsReached).to(handed_off)
    def hand_off(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        core.hand_off()

    @gathering.upon(TunnelInputs.deadlineIsReached).to(failed)
    def too_slow_to_gather(m: TunnelInputs, core: TunnelCore) -> None:
        core.fail(TunnelFailed("timeout", f"{core.peer} did not answer in time"))

    @introducing.upon(TunnelInputs.deadlineIsReached).to(failed)
    def too_slow(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        too_slow_to_gather(m, core)

    def no_path(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        core.fail(TunnelFailed("unreachable", core.pairs.explain(core.peer)))

    checking.upon(TunnelInputs.deadlineIsReached).to(failed)(no_path)
    nominating.upon(TunnelInputs.deadlineIsReached).to(failed)(no_path)
    nominating.upon(TunnelInputs.nominationFailed).to(failed)(no_path)

    @gathering.upon(TunnelInputs.cancel).to(failed)
    def cancelled_early(m: TunnelInputs, core: TunnelCore) -> None:
        core.fail(TunnelFailed("cancelled", "the tunnel was cancelled"))

    @gathering.upon(TunnelInputs.peerGaveUp).to(failed)
    def abandoned_early(m: TunnelInputs, core: TunnelCore) -> None:
        core.peer_gave_up = True
        core.fail(core.role.peer_gave_up(core))

    def cancelled(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        cancelled_early(m, core)

    def abandoned(m: TunnelInputs, core: TunnelCore, data: StateData) -> None:
        abandoned_early(m, core)

    introducing.upon(TunnelInputs.cancel).to(failed)(cancelled)
    checking.upon(TunnelInputs.cancel).to(failed)(cancelled)
    nominating.upon(TunnelInputs.cancel).to(failed)(cancelled)
    awaiting.upon(TunnelInputs.cancel).to(failed)(cancelled)
    lingering.upon(TunnelInputs.cancel).to(failed)(cancelled)
    introducing.upon(TunnelInputs.peerGaveUp).to(failed)(abandoned)
    checking.upon(TunnelInputs.peerGaveUp).to(failed)(abandoned)
    nominating.upon(TunnelInputs.peerGaveUp).to(failed)(abandoned)
    awaiting.upon(TunnelInputs.peerGaveUp).to(failed)(abandoned)
    lingering.upon(TunnelInputs.peerGaveUp).to(failed)(abandoned)

    # Whatever is not handled above does not apply in that state: ignore it.
    # (Automat has no public way to list a builder's transitions yet.)
    handled = {(t[0].name, t[1]) for t in builder._automaton.allTransitions()}
    every: list[Any] = [*live, handed_off, failed]
    for state in every:
        state.upon(TunnelInputs.describe).loop().returns(state.name)
        for name in INPUTS:
            if (state.name, name) not in handled:
                state.upon(getattr(TunnelInputs, name)).loop().returns(None)
    return builder.build()


#: Every input but C{describe}.
INPUTS = [
    n for n, v in vars(TunnelInputs).items() if callable(v) and n[0] != "_" and n != "describe"
]


def wait_for_stragglers(m: TunnelInputs, core: TunnelCore) -> None:
    """
    Each Confirm from the peer restarts the wait for stragglers.
    """
    core.later(core.role.straggler_wait(core), m.lingerIsOver)


build_tunnel_machine = build_tunnel_machine_factory()


def new_tunnel_id() -> bytes:
    return os.urandom(TUNNEL_ID_LENGTH)


class Tunnel:
    """
    The glue around one tunnel's machine: its sockets, datagrams in, I/O out.

    Implements L{TunnelIO}.  Socket 0 speaks IPv4, socket 1 (when the host
    has IPv6 addresses) IPv6; birthday probing's sockets come after.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        sockets: SocketFactory,
        role: Role,
        peer: str,
        service: str,
        tunnel_id: bytes,
        own_key: PrivateKey,
        timeout: float,
        host_addresses: list[str],
        gatherer: ReflexiveGatherer | None = None,
        relay_binder: RelayBinder | None = None,
        port_mapper: PortMapper | None = None,
        progress: ProgressCallback = lambda event: None,
        check_budget: float | None = None,
        birthday: BirthdayPlan | None = None,
        birthday_sockets: SocketBudget | None = None,
        birthday_sprays: SocketBudget | None = None,
        hard: bool = False,
        relay_channel: ChannelFactory | None = None,
    ) -> None:
        self._factory = sockets
        self._relay_channel = relay_channel
        self.sockets: list[TunnelSocket | StreamChannel | None] = [
            self._open(sockets, socket.AF_INET, 0),
            None,
        ]
        if any(":" in h for h in host_addresses):
            self.sockets[1] = self._open(sockets, socket.AF_INET6, 1)
        self._early: list[tuple[int, bytes, Address]] = []
        self.result: Deferred[HandOff] = Deferred(lambda d: self.machine.cancel())
        self.core = TunnelCore(
            clock=clock,
            io=self,
            role=role,
            peer=peer,
            service=service,
            tunnel_id=tunnel_id,
            own_key=own_key,
            local_candidates=self._host_candidates(host_addresses),
            gatherer=gatherer,
            relay_binder=relay_binder,
            port_mapper=port_mapper,
            birthday=birthday,
            birthday_sockets=birthday_sockets,
            birthday_sprays=birthday_sprays,
            hard=hard,
            progress=progress,
            result=self.result,
            check_budget=check_budget,
        )
        self.machine: TunnelInputs = build_tunnel_machine(self.core)
        for each in self._live():
            each.start_reading()
        self.core.deadline = clock.callLater(timeout, self.machine.deadlineIsReached)
        self.core.gather(self.machine)

    @property
    def tunnel_id(self) -> bytes:
        return self.core.tunnel_id

    @property
    def peer(self) -> str:
        return self.core.peer

    def _readers(
        self, local: int
    ) -> tuple[Callable[[bytes, Address], None], Callable[[bytes, Address], bool]]:
        """
        What socket C{local} does with a datagram: hand it to the tunnel,
        or (near the hand-off) say whether it stays queued for the program.
        """

        def received(data: bytes, source: Address) -> None:
            self._datagram(local, data, source)

        def keep(data: bytes, source: Address) -> bool:
            return self._keep_for_program(local, data, source)

        return received, keep

    def _open(
        self, factory: SocketFactory, family: socket.AddressFamily, local: int
    ) -> TunnelSocket | None:
        try:
            return factory(family, *self._readers(local))
        except OSError as e:
            if family == socket.AF_INET:
                raise
            log.info("no IPv6 candidates: {error}", error=e)
            return None

    def _host_candidates(self, hosts: list[str]) -> list[Candidate]:
        candidates = []
        for host in hosts:
            local = self.local_for(host)
            if local is not None:
                candidates.append(Candidate(CandidateKind.HOST, host, self.local_address(local)[1]))
        return candidates

    def _live(self) -> list[TunnelSocket | StreamChannel]:
        return [s for s in self.sockets if s is not None]

    # -- TunnelIO -------------------------------------------------------------

    def local_for(self, host: str) -> int | None:
        local = 1 if ":" in host else 0
        return local if local < len(self.sockets) and self.sockets[local] is not None else None

    def relay_local(self, relay: Address) -> int | None:
        if self._relay_channel is None:
            return None
        local = len(self.sockets)
        channel = self._relay_channel(relay, *self._readers(local))
        self.sockets.append(channel)
        channel.start_reading()
        return local

    def over_stream(self, local: int) -> bool:
        return local < len(self.sockets) and isinstance(self.sockets[local], StreamChannel)

    def local_address(self, local: int) -> Address:
        sock = self.sockets[local]
        assert sock is not None
        host, port = sock.local
        return (host, port)

    def send(self, local: int, data: bytes, address: Address) -> None:
        sock = self.sockets[local] if local < len(self.sockets) else None
        if sock is not None:
            sock.send(data, address)

    def prime(self, local: int, data: bytes, address: Address, ttl: int) -> None:
        "Only a UDP socket of ours primes; a TLS stream's channel has no TTL."
        sock = self.sockets[local] if local < len(self.sockets) else None
        if isinstance(sock, TunnelSocket) and sock.family == socket.AF_INET:
            sock.send_primer(data, address, ttl)

    def peek(self) -> None:
        for each in self._live():
            each.peeking = True

    def connect(self, local: int, remote: Address) -> None:
        sock = self.sockets[local]
        assert sock is not None
        sock.connect(remote)

    def open_extra(self, count: int) -> list[int]:
        opened = []
        for _ in range(count):
            local = len(self.sockets)
            try:
                sock = self._open(self._factory, socket.AF_INET, local)
            except OSError as e:
                log.info("tunnel {id}: no more sockets: {error}", id=self.core.id_hex, error=e)
                break
            self.sockets.append(sock)
            if sock is not None:
                sock.start_reading()
                opened.append(local)
        return opened

    def close_extra(self, keep: int | None) -> None:
        for local in range(EXTRA_SOCKETS, len(self.sockets)):
            sock = self.sockets[local]
            if local != keep and isinstance(sock, TunnelSocket):
                sock.close()
                self.sockets[local] = None

    def replay_early(self) -> None:
        early, self._early = self._early, []
        for local, data, source in early:
            self._datagram(local, data, source)

    def release(self, local: int, remote: Address) -> socket.socket:
        chosen = self.sockets[local]
        assert chosen is not None
        sock = chosen.release(remote, self._ours)
        self.close()
        return sock

    def close(self) -> None:
        for each in self._live():
            each.close()

    # -- datagrams in ---------------------------------------------------------

    def _ours(self, data: bytes, source: Address) -> bool:
        """
        Is this datagram punchd's own (a check, an answer, a confirmation)
        rather than the peer program's?
        """
        try:
            message = stun.parse(data)
        except stun.StunError:
            return False
        if message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            tid = message.transaction_id
            return tid in self.core.server_requests or tid in self.core.check_targets
        signer = self.core.signer
        return signer is not None and signer.from_peer(message)

    def _keep_for_program(self, local: int, data: bytes, source: Address) -> bool:
        chosen = self.core.chosen
        keep = (
            chosen is not None
            and (local, wire.normalize_address(source)) == chosen.key
            and not self._ours(data, source)
        )
        if keep:
            # The socket stops reading to leave this datagram queued: hand off now.
            self.machine.programSpoke()
        return keep

    def _datagram(self, local: int, data: bytes, source: Address) -> None:
        try:
            self._handle(local, data, wire.normalize_address(source))
        except Exception:
            log.failure("tunnel {id}: unexpected error handling a datagram", id=self.core.id_hex)

    def _handle(self, local: int, data: bytes, source: Address) -> None:
        try:
            message = stun.parse(data)
        except stun.StunError:
            return
        if message.cls in (MessageClass.SUCCESS, MessageClass.ERROR):
            self._answer(local, message, source)
            return
        signer = self.core.signer
        if signer is None:
            if len(self._early) < EARLY_BUFFER:
                self._early.append((local, data, source))
            return
        if not signer.from_peer(message):
            return
        if message.method == Method.BINDING and message.cls == MessageClass.REQUEST:
            self._peer_check(local, message, source)
        elif message.method == Method.ABANDON and message.cls == MessageClass.INDICATION:
            self.machine.peerGaveUp()
        elif message.method == Method.CONFIRM and message.cls == MessageClass.INDICATION:
            self.core.confirmations.add(message.transaction_id)
            chosen = self.core.chosen
            if chosen is not None and chosen.key == (local, source):
                self.machine.confirmed()

    def _answer(self, local: int, message: stun.Message, source: Address) -> None:
        core, tid = self.core, message.transaction_id
        if tid not in core.checks:
            return
        server = core.server_requests.get(tid)
        if server is not None:
            # The rendezvous' or the relay's: its parser checks its signature.
            if source == server:
                core.checks.answer(tid, (message, source))
            return
        pair = core.check_targets.get(tid)
        signer = core.signer
        if pair is not None and pair.key == (local, source) and signer is not None:
            if signer.answered_by_peer(message):
                core.checks.answer(tid, (message, source))

    def _peer_check(self, local: int, message: stun.Message, source: Address) -> None:
        core = self.core
        assert core.signer is not None
        known = core.pairs.get(local, source) is not None
        if core.done_answering:
            return
        pair = core.pairs.learn(local, source)
        if pair is None:
            return
        if not known:
            log.debug(
                "tunnel {id}: learned peer-reflexive {address}",
                id=core.id_hex,
                address=format_address(source),
            )
        pair.heard = True
        self.send(local, core.signer.answer(message.transaction_id, source), source)
        if message.has(Attr.USE_CANDIDATE) and not core.role.nominates:
            self.machine.peerNominated(pair)
        else:
            self.machine.peerChecked(pair)
