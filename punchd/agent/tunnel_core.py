"""
What one tunnel knows, and the work its state machine's behaviours ask for.

L{TunnelCore} owns the data (pairs, checks in flight, the chosen pair, round
trips, confirmations) and does the work through a L{TunnelIO}: it never
touches a socket itself.  Per-state data (L{StateData}) holds what belongs to
one state, timers included; entering a state stops what the previous one
left running.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd import stun
from punchd.agent.api import HandOff, ProgressCallback, TunnelFailed
from punchd.agent.birthday import BirthdayPlan, SocketBudget, Spray
from punchd.agent.gatherers import ReflexiveGatherer, RelayBinder
from punchd.agent.pairs import Address, Pair, Pairs
from punchd.agent.portmap import Mapping, PortMapper
from punchd.agent.tunnel_messages import TunnelSigner
from punchd.keys import PrivateKey, PublicKey
from punchd.retransmit import Backoff, RequestTimedOut, Transactions
from punchd.wire import MAX_CANDIDATES, Candidate, CandidateKind, format_address, mapped_address

if TYPE_CHECKING:
    from punchd.agent.roles import Role
    from punchd.agent.tunnel import TunnelInputs

log = Logger()
S = TypeVar("S", bound="StateData")

PACING = 0.02
GATHER_BACKOFF = Backoff(initial=0.1, maximum=0.4, attempts=5)
RELAY_BIND_BACKOFF = Backoff(initial=0.1, maximum=0.5, attempts=12)
#: Seconds a port mapping is asked for; renewed while a tunnel uses it.
MAPPING_LIFETIME = 120
#: Sockets 0 (IPv4) and 1 (IPv6) are every tunnel's; birthday sockets follow.
EXTRA_SOCKETS = 2
CHECK_BACKOFF = Backoff(initial=0.1, maximum=0.5, attempts=40)
NOMINATE_BACKOFF = Backoff(initial=0.1, maximum=0.4, attempts=16)
GRACE = 0.05
GRACE_MIN = 0.005
WAIT_LIMIT = 1.0
WAIT_MIN = 0.02
LINGER_MIN = 0.005
LINGER_MAX = 0.5
TRIGGER_GAP = 0.01
CONFIRM_COPIES = 3
ABANDON_COPIES = 2
ABANDON_TARGETS = 8


class TunnelIO(Protocol):
    """
    The I/O a tunnel's machine asks of its glue.  Local sockets are numbered;
    a pair names the one it uses.
    """

    def local_for(self, host: str) -> int | None:
        "The socket that speaks C{host}'s address family, if there is one."

    def relay_local(self, relay: Address) -> int | None:
        "The socket for our relay port at C{relay}: a channel of the TLS stream, or C{local_for}."

    def over_stream(self, local: int) -> bool:
        "Whether socket C{local} is a channel of the TLS stream (the relay over TLS)."

    def local_address(self, local: int) -> Address:
        "Where socket C{local} is bound."

    def send(self, local: int, data: bytes, address: Address) -> None:
        "Send best effort; errors are only logged."

    def prime(self, local: int, data: bytes, address: Address, ttl: int) -> None:
        "Send with a TTL that runs out before C{address}'s NAT; best effort."

    def peek(self) -> None:
        "From now on the peer's program may speak: look before consuming."

    def connect(self, local: int, remote: Address) -> None:
        "Let only C{remote}'s datagrams reach socket C{local} from now on."

    def open_extra(self, count: int) -> list[int]:
        "Open C{count} more IPv4 sockets (birthday probing); their numbers."

    def close_extra(self, keep: int | None) -> None:
        "Close the extra sockets, but C{keep}."

    def replay_early(self) -> None:
        "The tunnel key is known: handle what arrived before it."

    def release(self, local: int, remote: Address) -> socket.socket:
        "Give socket C{local}, connected to C{remote}, away; close the others."

    def close(self) -> None:
        "Close every socket."


class Timers:
    """
    The timers of one state, cancelled together when the state is left.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: list[IDelayedCall] = []

    def later(self, delay: float, f: Callable[[], object]) -> IDelayedCall:
        call = self.clock.callLater(delay, f)
        self._calls = [c for c in self._calls if c.active()] + [call]
        return call

    def stop(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []


@dataclass
class StateData:
    """
    What belongs to one state of the machine.
    """

    timers: Timers

    def stop(self) -> None:
        self.timers.stop()


@dataclass
class TunnelCore:
    """
    Everything one tunnel knows; the machine's behaviours work on it.
    """

    clock: IReactorTime
    io: TunnelIO
    role: Role
    peer: str
    service: str
    tunnel_id: bytes
    own_key: PrivateKey
    local_candidates: list[Candidate]
    gatherer: ReflexiveGatherer | None
    relay_binder: RelayBinder | None
    port_mapper: PortMapper | None
    #: Birthday probing's settings (None: off) and the agent's socket budget.
    birthday: BirthdayPlan | None
    birthday_sockets: SocketBudget | None
    birthday_sprays: SocketBudget | None
    #: Our NAT maps per destination (netcheck said so).
    hard: bool
    progress: ProgressCallback
    result: Deferred[HandOff]
    #: How long round one may probe before giving up when nothing got through.
    check_budget: float | None = None
    started_at: float = 0.0
    pairs: Pairs = field(default_factory=Pairs)
    signer: TunnelSigner | None = None
    #: The peer's public IPv4 address and the TTL of our primers toward it,
    #: when we hold our first checks and a router lies between the two NATs
    #: (L{punchd.agent.hops}).
    primer: tuple[str, int] | None = None
    #: What the gatherers found: server-reflexive, port-mapped.
    found: list[Candidate] = field(default_factory=list)
    #: The gateway's mapping of our socket, while we hold one.
    mapping: Mapping | None = None
    #: The pair being nominated or handed off, and since when.
    chosen: Pair | None = None
    chosen_at: float = 0.0
    #: Why the chosen pair's socket could not be connected, if it could not.
    connect_error: OSError | None = None
    #: Requests to servers (the rendezvous, the relay) in flight, and where
    #: each went: only an answer from there counts.
    server_requests: dict[bytes, Address] = field(default_factory=dict)
    rendezvous_rtt: float | None = None
    confirmations: set[bytes] = field(default_factory=set)
    rtt_samples: list[float] = field(default_factory=list)
    peer_gave_up: bool = False
    #: We said our last words: no more answers to the peer's checks.
    done_answering: bool = False
    #: Birthday sockets this tunnel holds of the agent's budget.
    extra_sockets: int = 0
    #: This tunnel holds one of the agent's birthday sprays.
    spraying: bool = False
    deadline: IDelayedCall | None = None
    state: StateData | None = None
    checks: Transactions[tuple[stun.Message, Address]] = field(init=False)
    check_targets: dict[bytes, Pair] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checks = Transactions(self.clock)
        self.started_at = self.clock.seconds()

    @property
    def id_hex(self) -> str:
        return self.tunnel_id.hex()

    # -- states -------------------------------------------------------------

    def timers(self) -> Timers:
        return Timers(self.clock)

    def enter(self, data: S) -> S:
        """
        Leave the current state (stopping what it left running) for C{data}'s.
        """
        if self.state is not None:
            self.state.stop()
        self.state = data
        return data

    def later(self, delay: float, f: Callable[[], object]) -> None:
        "Call C{f} after C{delay}, unless the current state is left first."
        assert self.state is not None
        self.state.timers.later(delay, f)

    def end(self) -> None:
        self.end_birthday()
        if self.state is not None:
            self.state.stop()
            self.state = None
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.checks.cancel_all()

    # -- candidates and keys -------------------------------------------------

    def candidates(self) -> list[Candidate]:
        result = list(self.local_candidates)
        for candidate in self.found:
            if candidate.address not in {c.address for c in result}:
                result.append(candidate)
        return result[:MAX_CANDIDATES]

    def add_remotes(self, candidates: list[Candidate]) -> None:
        for candidate in candidates:
            relay = candidate.kind == CandidateKind.RELAY
            local = self.io.relay_local(candidate.address) if relay else None
            if local is None:
                local = self.io.local_for(candidate.host)
            pair = self.pairs.add(1 if local is None else local, candidate)
            if relay and local is not None:
                self.bind_relay(pair)

    def prime(self) -> None:
        """
        Open our NAT toward the peer's public IPv4 candidates with checks
        whose TTL runs out before they reach the peer's NAT: the peer's
        first checks then find our side open, and nothing of ours reached
        its NAT before it had sent (docs/architecture.rst, "Two open-input
        NATs").
        """
        if self.primer is None or self.signer is None:
            return
        # Only the traced address: the TTL says nothing of the path to another.
        host, ttl = self.primer
        primed = [p for p in self.pairs if p.remote.kind.at_a_nat and p.remote.host == host]
        for pair in primed:
            self.io.prime(
                pair.local, self.signer.check(stun.new_transaction_id(), False), pair.address, ttl
            )
        log.debug(
            "tunnel {id}: primed our NAT toward {n} of the peer's candidates with TTL {ttl}",
            id=self.id_hex[:12],
            n=len(primed),
            ttl=ttl,
        )

    def bind_relay(self, pair: Pair) -> None:
        """
        Bind our socket to our relay port, so that checks (and then the
        program's datagrams) can cross the relay.
        """
        binder = self.relay_binder
        if binder is None:
            return
        transaction_id, request = binder.bind(self.tunnel_id)
        self.server_requests[transaction_id] = pair.address

        def bound(answer: tuple[stun.Message, Address]) -> None:
            log.debug(
                "tunnel {id}: bound at the relay {relay} as {mapped}",
                id=self.id_hex[:12],
                relay=format_address(pair.address),
                mapped=binder.bound(answer[0]),
            )

        def send() -> None:
            self.io.send(pair.local, request, pair.address)

        self.checks.start(transaction_id, send, RELAY_BIND_BACKOFF).addCallbacks(
            bound, lambda f: None
        )

    def release_relay(self) -> None:
        """
        Free a relay allocation we are not going to use, at once.
        """
        binder = self.relay_binder
        if binder is None:
            return
        for pair in self.pairs:
            if pair.remote.kind == CandidateKind.RELAY and pair is not self.chosen:
                for _ in range(ABANDON_COPIES):
                    self.io.send(pair.local, binder.release(self.tunnel_id), pair.address)

    def learn_key(self, peer_key: PublicKey, nonce: bytes) -> None:
        self.signer = TunnelSigner.derive(
            self.own_key, peer_key, self.tunnel_id, nonce, initiator=self.role.nominates
        )
        self.io.replay_early()

    def gather(self, m: TunnelInputs) -> None:
        """
        Ask the rendezvous (our server-reflexive address) and the gateway
        (a port mapping) at once; go on when both have answered.
        """
        found = [self._reflexive(), self._port_mapping()]
        DeferredList(found, consumeErrors=True).addCallback(
            lambda results: m.gathered([c for ok, c in results if ok and c is not None])
        )

    def _port_mapping(self) -> Deferred[Candidate | None]:
        mapper = self.port_mapper
        if mapper is None:
            return succeed(None)

        def mapped(mapping: Mapping | None) -> Candidate | None:
            if mapping is None:
                return None
            if self.result.called:  # over before the gateway answered
                mapping.delete()
                return None
            self.mapping = mapping
            return Candidate(CandidateKind.MAPPED, *mapping.external)

        return mapper.map(self.io.local_address(0)[1], MAPPING_LIFETIME).addCallback(mapped)

    def _reflexive(self) -> Deferred[Candidate | None]:
        """
        Our address as the rendezvous sees this very socket.
        """
        found: Deferred[Candidate | None] = Deferred()
        gatherer = self.gatherer
        local = None if gatherer is None else self.io.local_for(gatherer.server[0])
        if gatherer is None or local is None:
            found.callback(None)
            return found
        transaction_id, request = gatherer.request()
        self.server_requests[transaction_id] = gatherer.server
        sent_at = [self.clock.seconds()]

        def send() -> None:
            sent_at[0] = self.clock.seconds()
            self.io.send(local, request, gatherer.server)

        def mapped(answer: tuple[stun.Message, Address]) -> None:
            self.rendezvous_rtt = self.clock.seconds() - sent_at[0]
            found.callback(gatherer.candidate(answer[0]))

        def unmapped(failure: Failure) -> None:
            if failure.check(RequestTimedOut):
                log.info(
                    "tunnel {id}: no server-reflexive address (rendezvous silent)", id=self.id_hex
                )
                found.callback(None)

        self.checks.start(transaction_id, send, GATHER_BACKOFF).addCallbacks(mapped, unmapped)
        return found

    # -- birthday probing ----------------------------------------------------

    def start_birthday(self, peer_hard: bool, remote: list[Candidate]) -> Spray | None:
        """
        One side hard, the other easy: the hard side opens its sockets
        towards the easy side's public address now, and the easy side gets
        what to probe (the caller paces it).  Returns that spray, if ours.
        """
        plan = self.birthday
        public = [c for c in remote if c.kind == CandidateKind.SRFLX and ":" not in c.host]
        if plan is None or self.hard == peer_hard or not public:
            return None
        log.info(
            "tunnel {id}: birthday probing, this side {side}",
            id=self.id_hex[:12],
            side="hard" if self.hard else "easy",
        )
        if not self.hard:
            sprays = self.birthday_sprays
            if sprays is None or not sprays.take(1):
                log.info("tunnel {id}: this agent sprays enough already", id=self.id_hex[:12])
                return None
            self.spraying = True
            batch = max(1, round(plan.rate * PACING))
            return Spray(public[0].host, plan.budget, batch)
        budget = self.birthday_sockets
        if budget is None or not budget.take(plan.sockets):
            log.info("tunnel {id}: no birthday sockets left in this agent", id=self.id_hex[:12])
            return None
        self.extra_sockets = plan.sockets
        for local in self.io.open_extra(plan.sockets):
            self.pairs.add(local, public[0])
        return None

    def end_birthday(self) -> None:
        """
        Give back what birthday probing held: the spray, or the hard side's
        sockets (all but the chosen pair's).
        """
        if self.spraying and self.birthday_sprays is not None:
            self.birthday_sprays.give(1)
        self.spraying = False
        if self.extra_sockets:
            self.io.close_extra(keep=None if self.chosen is None else self.chosen.local)
            if self.birthday_sockets is not None:
                self.birthday_sockets.give(self.extra_sockets)
            self.extra_sockets = 0

    # -- timing --------------------------------------------------------------

    def wait_time(self) -> float:
        """
        How long a responder told to wait holds its first checks: long enough
        for our answer to reach the initiator through the rendezvous and its
        first checks to leave its NAT (the checks themselves may never get
        here: our own NAT drops them until we have sent).
        """
        rtt = self.rendezvous_rtt if self.rendezvous_rtt is not None else WAIT_LIMIT / 4
        return min(WAIT_LIMIT, max(WAIT_MIN, 3 * rtt + 0.01))

    def grace(self, pair: Pair) -> float:
        """
        How long to wait for a better pair after C{pair} answered: all first
        checks left together, so a better path answers within about one more
        round trip of this one, or not at all.
        """
        patience = pair.remote.kind.patience
        if patience is not None:
            return patience
        return min(GRACE, max(GRACE_MIN, 2 * (pair.rtt or 0.0)))

    def linger_time(self) -> float:
        """
        How long to keep reading before the hand-off: our own late answers and
        the peer's stragglers trail by up to the path's jitter, which the
        slowest round trip we measured bounds.  Capped, because on a busy
        agent the measured RTT is mostly its own queueing.
        """
        rtts = self.pairs.rtts() + self.rtt_samples
        rtt = max(rtts) if rtts else 0.05
        return min(LINGER_MAX, max(LINGER_MIN, 2 * rtt + 0.002))

    # -- endings -------------------------------------------------------------

    def connect_chosen(self) -> bool:
        """
        Let only the chosen remote reach its socket from now on, and start
        looking before consuming: the peer's program may speak next.
        False if the socket could not be connected.
        """
        pair = self.chosen
        assert pair is not None
        try:
            self.io.connect(pair.local, pair.address)
        except OSError as e:
            self.connect_error = e
            return False
        self.io.peek()
        return True

    def send_confirm(self) -> None:
        assert self.signer is not None and self.chosen is not None
        for _ in range(CONFIRM_COPIES):
            self.io.send(self.chosen.local, self.signer.confirm(), self.chosen.address)

    def send_abandon(self) -> None:
        """
        Tell the peer, best effort, over the paths that worked, that this
        tunnel is over: it stops probing and hands nothing to its program.
        """
        if self.signer is None or self.peer_gave_up:
            return
        if self.chosen is not None:
            targets = [self.chosen]
        else:
            targets = [p for p in self.pairs if p.answered or p.heard]
        for pair in targets[:ABANDON_TARGETS]:
            for _ in range(ABANDON_COPIES):
                self.io.send(pair.local, self.signer.abandon(), pair.address)

    def hand_off(self) -> None:
        pair = self.chosen
        assert pair is not None
        try:
            self.end()
            self.release_relay()
            if self.connect_error is not None:
                raise self.connect_error
            sock = self.io.release(pair.local, pair.address)
        except Exception as e:
            # Whatever went wrong, the tunnel must end, and say so.
            why = getattr(e, "strerror", None) or str(e)
            self.fail(TunnelFailed("internal", f"the tunnel socket could not be handed off: {why}"))
            return
        info = self.describe(pair)
        log.info(
            "tunnel {id} to {peer} for {service}: {path} via {remote} "
            "({local_kind} -> {remote_kind}) in {setup_ms} ms{why}",
            id=self.id_hex[:12],
            peer=self.peer,
            service=self.service,
            path=info["path"],
            remote=info["remote"],
            local_kind=info["candidates"]["local"],
            remote_kind=info["candidates"]["remote"],
            setup_ms=info["setup_ms"],
            why=f"; {self.why_relayed()}" if info["path"] != "direct" else "",
        )
        self.result.callback(HandOff(sock, info))

    def describe(self, pair: Pair) -> dict[str, Any]:
        """
        The tunnel as its program sees it.
        """
        local = pair.mapped or self.io.local_address(pair.local)
        relayed = pair.remote.kind == CandidateKind.RELAY
        probes = sum(p.guess for p in self.pairs)
        return {
            **({"birthday_probes": probes} if probes else {}),
            **({"birthday_sockets": self.extra_sockets} if self.extra_sockets else {}),
            "id": self.id_hex,
            "peer": self.peer,
            "service": self.service,
            "role": self.role.name,
            "local": format_address(local),
            "remote": format_address(pair.address),
            "path": self.path(pair),
            **({"relay": format_address(pair.address)} if relayed else {}),
            "candidates": {
                "local": "relay" if relayed else self.local_kind(pair),
                "remote": pair.remote.kind.label,
            },
            "rtt_ms": round((pair.rtt or 0.0) * 1000, 3),
            "setup_ms": round((self.clock.seconds() - self.started_at) * 1000, 3),
        }

    def path(self, pair: Pair) -> str:
        if pair.remote.kind != CandidateKind.RELAY:
            return "direct"
        return "relay-tls" if self.io.over_stream(pair.local) else "relay"

    def why_relayed(self) -> str:
        direct = [p.describe() for p in self.pairs if p.remote.kind != CandidateKind.RELAY]
        return "no direct pair answered: " + ("; ".join(direct) or "the peer offered none")

    def local_kind(self, pair: Pair) -> str:
        if pair.mapped is None:
            return self.found[0].kind.label if self.found else "host"
        if pair.mapped in {c.address for c in self.local_candidates}:
            return "host"
        for candidate in self.found:
            if pair.mapped == candidate.address:
                return candidate.kind.label
        return "prflx"

    def fail(self, error: TunnelFailed) -> None:
        try:
            self.end()
            self.send_abandon()
            self.release_relay()
        finally:
            # Whatever went wrong above, the sockets close and the result fires.
            self.io.close()
            if not self.result.called:
                self.result.errback(error)
        log.info(
            "tunnel {id} to {peer} for {service} failed after {ms} ms: {code}: {message}",
            id=self.id_hex[:12],
            peer=self.peer,
            service=self.service,
            ms=round((self.clock.seconds() - self.started_at) * 1000),
            code=error.code,
            message=error.message,
        )
        self.role.ended(error)


def answer_mapped(pair: Pair, message: stun.Message) -> None:
    """
    Remember our address as the peer saw it in its answer on C{pair}.
    """
    mapped = mapped_address(message)
    if mapped is not None:
        pair.mapped = mapped
