"""
The tunnel machine: two real L{Tunnel}s punching through a simulated network.

Time is a L{Clock}; each tunnel's socket is a L{TunnelSocket} bound to
loopback whose sends go onto a simulated network instead, which delays,
drops, duplicates or reorders them and delivers them the way the reactor
would (peeking near the hand-off).  Hand-off is intercepted: nothing is
ever connected to the documentation addresses used here.
"""

from __future__ import annotations

import gc
import os
import random
import select
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs
from twisted.python.failure import Failure

from punchd import stun, wire
from punchd.agent import pairs
from punchd.agent.api import HandOff, TunnelFailed
from punchd.agent.gatherers import PlainBinding, SignedGather
from punchd.agent.roles import Initiator, Introduced, Responder, Role
from punchd.agent.tunnel import FINAL_WORD_WAIT, QUIET, Tunnel, new_tunnel_id
from punchd.agent.tunnel_core import GATHER_BACKOFF, LINGER_MIN
from punchd.agent.tunnel_socket import TunnelSocket
from punchd.gather import build_gather_answer
from punchd.keys import PrivateKey, derive_tunnel_key
from punchd.retransmit import RequestTimedOut
from punchd.stun import Attr, MessageClass, Method
from punchd.wire import Candidate, CandidateKind

Address = tuple[str, int]

A_HOST = "192.0.2.10"
B_HOST = "192.0.2.20"
RENDEZVOUS = ("203.0.113.1", 3478)
#: The relay ports of the initiator's and the responder's sides.
RELAY_A = ("203.0.113.1", 50001)
RELAY_B = ("203.0.113.1", 50002)
LATENCY = 0.005
INTRO_DELAY = 0.01


class FakeReactor(Clock):
    """
    A clock that also records readers, as the tunnel socket registers itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[object] = set()

    def addReader(self, reader: object) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: object) -> None:
        self.readers.discard(reader)


@dataclass
class Datagram:
    index: int
    sent_at: float
    sender: str
    data: bytes
    dst: Address

    def message(self) -> stun.Message | None:
        try:
            return stun.parse(self.data)
        except stun.StunError:
            return None

    def kind(self) -> str:
        """
        A short name for failure messages: C{check}, C{nominate}, C{answer}...
        """
        message = self.message()
        if message is None:
            return "data"
        if message.method == Method.CONFIRM:
            return "confirm"
        if message.method == Method.ABANDON:
            return "abandon"
        if message.cls == MessageClass.REQUEST:
            return "nominate" if message.has(Attr.USE_CANDIDATE) else "check"
        return "answer"


@dataclass
class FakeSocket:
    """
    What the program gets instead of a connected socket.
    """

    remote: Address
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class Endpoint:
    """
    One tunnel's place on the network: its addresses and its receive queue.
    """

    net: Net
    name: str
    host: str
    on: str
    public: tuple[str, int | None] | None
    reachable: bool
    socket: SimSocket | None = None
    addresses: dict[str, Address] = field(default_factory=dict)
    queue: list[tuple[bytes, Address]] = field(default_factory=list)
    consumed: list[tuple[bytes, Address]] = field(default_factory=list)
    inbox: list[tuple[bytes, Address]] = field(default_factory=list)
    releases: list[Address] = field(default_factory=list)
    released_at: float | None = None
    #: Where the socket is connected: the kernel drops datagrams from elsewhere.
    connected: Address | None = None

    @property
    def address(self) -> Address:
        return self.addresses[self.on]

    def source_for(self, dst: Address) -> Address:
        """
        The address a datagram to C{dst} appears to come from.
        """
        label = self.net.label_of(dst)
        return self.addresses.get(label) or self.addresses.get("wan") or self.address

    def arrive(self, data: bytes, source: Address) -> None:
        if self.connected is not None and source != self.connected:
            return
        self.queue.append((data, source))
        self.pump()

    def pump(self) -> None:
        """
        What the reactor and L{TunnelSocket.doRead} do with queued datagrams.
        """
        sock = self.socket
        assert sock is not None
        while self.queue and not self.releases and sock._reading:
            data, source = self.queue[0]
            if sock.peeking and sock._keep(data, source):
                sock.stop_reading()
                break
            self.queue.pop(0)
            self.consumed.append((data, source))
            sock._received(data, source)
        if self.releases:
            # A connected socket receives from its remote only, for the program.
            remote = self.releases[0]
            self.inbox.extend((d, s) for d, s in self.queue if s == remote)
            self.queue.clear()


class SimSocket(TunnelSocket):
    """
    A real (loopback, never used) socket whose I/O goes to the simulation.
    """

    def __init__(self, reactor: Any, received: Any, keep: Any, net: Net) -> None:
        super().__init__(reactor, received, keep, bind=("127.0.0.1", 0))
        self.real = self.sock
        self.endpoint = net.attach(self)

    def send(self, data: bytes, address: Address) -> None:
        self.endpoint.net.send(self.endpoint, data, address)

    def send_primer(self, data: bytes, address: Address, ttl: int) -> None:
        # A primer dies on the way: it is recorded, never delivered.
        self.endpoint.net.primers.append((self.endpoint.name, address, ttl))

    def connect(self, remote: Address) -> None:
        self.endpoint.connected = remote

    def release(self, remote: Address, ours: Callable[[bytes, Address], bool]) -> socket.socket:
        endpoint = self.endpoint
        self.stop_reading()
        sock, self.sock = self.sock, None
        assert sock is not None
        sock.close()
        endpoint.releases.append(remote)
        endpoint.released_at = endpoint.net.reactor.seconds()
        while endpoint.queue:  # the agent's stragglers are consumed, the program's kept
            data, source = endpoint.queue[0]
            if source == remote and not ours(data, source):
                break
            endpoint.consumed.append(endpoint.queue.pop(0))
        endpoint.pump()
        return FakeSocket(remote)  # type: ignore[return-value]


class Net:
    """
    The simulated network: routes by address, delays by network, and lets a
    test decide each datagram's fate.
    """

    def __init__(self) -> None:
        self.reactor = FakeReactor()
        self.log: list[Datagram] = []
        self.after_release: list[Datagram] = []
        #: (endpoint, destination, TTL) of every primer sent.
        self.primers: list[tuple[str, Address, int]] = []
        self.routes: dict[Address, tuple[Endpoint, str]] = {}
        self.servers: dict[Address, Callable[[bytes, Address], bytes | None]] = {}
        #: Relay ports: where what is sent to each goes, and from which port.
        self.relays: dict[Address, tuple[str, Address]] = {}
        self.latency = {"lan": LATENCY, "wan": LATENCY}
        self.fate: Callable[[Datagram], list[float]] = self.deliver_once
        self.endpoints: dict[str, Endpoint] = {}
        self._next: Endpoint | None = None

    # -- building -------------------------------------------------------------

    def make(
        self,
        name: str,
        host: str,
        *,
        on: str = "lan",
        public: tuple[str, int | None] | None = None,
        reachable: bool = True,
        **kwargs: Any,
    ) -> Tunnel:
        """
        A tunnel on a host at C{host} (on network C{on}), optionally with a
        public address on C{"wan"} (port C{None}: the same as the socket's).
        """
        self._next = Endpoint(self, name, host, on, public, reachable)
        kwargs.setdefault("timeout", 10.0)
        rendezvous = kwargs.pop("rendezvous", None)
        if rendezvous is not None:
            kwargs["gatherer"] = PlainBinding(rendezvous)
        return Tunnel(
            clock=self.reactor,
            sockets=lambda family, received, keep: SimSocket(self.reactor, received, keep, self),
            role=make_role(kwargs),
            host_addresses=[host],
            **kwargs,
        )

    def attach(self, sock: SimSocket) -> Endpoint:
        endpoint, self._next = self._next, None
        assert endpoint is not None
        endpoint.socket = sock
        port = sock.local[1]
        endpoint.addresses[endpoint.on] = (endpoint.host, port)
        if endpoint.reachable:
            self.routes[(endpoint.host, port)] = (endpoint, endpoint.on)
        if endpoint.public is not None:
            address = (endpoint.public[0], endpoint.public[1] or port)
            endpoint.addresses["wan"] = address
            self.routes[address] = (endpoint, "wan")
        self.endpoints[endpoint.name] = endpoint
        return endpoint

    def stun_server(self, address: Address) -> None:
        """
        A plain STUN server at C{address} (on the WAN), like the rendezvous.
        """
        self.servers[address] = lambda data, source: stun.binding_response(data, *source)

    # -- moving datagrams -----------------------------------------------------

    def label_of(self, address: Address) -> str:
        if address in self.servers:
            return "wan"
        route = self.routes.get(address)
        return route[1] if route is not None else "lan"

    def deliver_once(self, datagram: Datagram) -> list[float]:
        return [self.latency[self.label_of(datagram.dst)]]

    def send(self, endpoint: Endpoint, data: bytes, dst: Address) -> None:
        datagram = Datagram(len(self.log), self.reactor.seconds(), endpoint.name, data, dst)
        self.log.append(datagram)
        if endpoint.releases:
            self.after_release.append(datagram)
            return
        for delay in self.fate(datagram):
            self.reactor.callLater(delay, self._deliver, endpoint, data, dst)

    def program_send(self, name: str, data: bytes, dst: Address) -> None:
        """
        The program that got C{name}'s socket talks (never dropped).
        """
        endpoint = self.endpoints[name]
        delay = self.latency[self.label_of(dst)]
        self.reactor.callLater(delay, self._deliver, endpoint, data, dst)

    def _deliver(self, sender: Endpoint, data: bytes, dst: Address) -> None:
        source = sender.source_for(dst)
        server = self.servers.get(dst)
        if server is not None:
            answer = server(data, source)
            if answer is not None:
                delay = self.latency["wan"]
                self.reactor.callLater(delay, sender.arrive, answer, dst)
            return
        relayed = self.relays.get(dst)
        if relayed is not None:
            # A relay port: on to the other side, from the other side's port.
            target, port = relayed
            self.reactor.callLater(self.latency["wan"], self.endpoints[target].arrive, data, port)
            return
        route = self.routes.get(dst)
        if route is not None:
            route[0].arrive(data, source)

    def run(self, seconds: float) -> None:
        """
        Let C{seconds} pass, running every timer at its own time.
        """
        clock = self.reactor
        target = clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            clock.advance(max(0.0, min(due) - clock.seconds()))
        clock.advance(target - clock.seconds())

    def dismantle(self) -> None:
        """
        Drop every reference to the tunnels, so that the garbage collector
        finds (and reports) their unhandled failures within this test.
        """
        self.endpoints.clear()
        self.routes.clear()
        self.servers.clear()
        self.reactor.calls.clear()

    def sent_by(self, name: str) -> list[Datagram]:
        return [d for d in self.log if d.sender == name]


def make_role(kwargs: dict[str, Any]) -> Role:
    """
    The role the C{role} keyword names, from the keywords that describe it.
    """
    if kwargs.pop("role") == "initiator":
        return Initiator(kwargs.pop("introduce"))
    return Responder(
        kwargs.pop("peer_key"),
        kwargs.pop("remote_candidates"),
        nonce=os.urandom(16),
        holds_first_checks=kwargs.pop("wait_for_peer", False),
        trace=kwargs.pop("trace", None),
    )


def remotes(tunnel: Tunnel) -> dict[Address, pairs.Pair]:
    return {p.address: p for p in tunnel.core.pairs}


def key_of(tunnel: Tunnel) -> bytes | None:
    signer = tunnel.core.signer
    return None if signer is None else signer.key


def nonce_of(tunnel: Tunnel) -> bytes:
    return tunnel.core.role.nonce  # type: ignore[attr-defined, no-any-return]


class Intro:
    """
    The initiator's introduction through the rendezvous, answered by hand;
    C{forward} plays the rendezvous passing the candidates to the peer.
    """

    def __init__(self) -> None:
        self.candidates: list[Candidate] | None = None
        self.deferred: Deferred[Introduced] | None = None
        self.cancelled = False
        self.forward: Callable[[list[Candidate]], None] = lambda candidates: None

    def introduce(self, tunnel_id: bytes, candidates: list[Candidate]) -> Deferred[Introduced]:
        def cancel(d: Deferred[Introduced]) -> None:
            self.cancelled = True

        self.candidates = candidates
        self.deferred = Deferred(cancel)
        self.forward(candidates)
        return self.deferred


def outcome(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


class Pair:
    """
    An initiator and a responder being introduced, and what became of them.
    """

    def __init__(self, net: Net) -> None:
        self.net = net
        self.intro = Intro()
        self.a_key, self.b_key = PrivateKey.generate(), PrivateKey.generate()
        self.tunnel_id = new_tunnel_id()
        self.progress: list[dict[str, Any]] = []
        self.a_result: list[HandOff | Failure] = []
        self.b_result: list[HandOff | Failure] = []
        self._a: Tunnel | None = None
        self._b: Tunnel | None = None

    @property
    def a(self) -> Tunnel:
        assert self._a is not None
        return self._a

    @property
    def b(self) -> Tunnel:
        assert self._b is not None, "the responder was not introduced"
        return self._b

    @property
    def ea(self) -> Endpoint:
        return self.a.sockets[0].endpoint  # type: ignore[attr-defined, no-any-return]

    @property
    def eb(self) -> Endpoint:
        return self.b.sockets[0].endpoint  # type: ignore[attr-defined, no-any-return]

    def hand_off(self, which: str) -> HandOff:
        results = self.a_result if which == "a" else self.b_result
        assert results, f"{which} has not finished"
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        assert isinstance(result, HandOff)
        return result

    def failure(self, which: str) -> TunnelFailed:
        (result,) = self.a_result if which == "a" else self.b_result
        assert isinstance(result, Failure), result
        assert isinstance(result.value, TunnelFailed)
        return result.value


def make_pair(
    net: Net,
    *,
    a: dict[str, Any] | None = None,
    b: dict[str, Any] | None = None,
    intro_delay: float | None = INTRO_DELAY,
    relay: bool = False,
) -> Pair:
    """
    Start the initiator; when it asks for the introduction, start the
    responder with its candidates (as the rendezvous would), whose own
    candidates reach the initiator C{intro_delay} after it gathered them
    (never, if C{None}).
    """
    pair = Pair(net)
    a_relay, b_relay = [], []
    if relay:
        net.relays[RELAY_A] = ("b", RELAY_B)
        net.relays[RELAY_B] = ("a", RELAY_A)
        a_relay = [Candidate(CandidateKind.RELAY, *RELAY_A)]
        b_relay = [Candidate(CandidateKind.RELAY, *RELAY_B)]

    def introduced(candidates: list[Candidate]) -> None:
        pair._b = net.make(
            "b",
            **{"host": B_HOST, **(b or {})},
            role="responder",
            peer="alice",
            service="chat",
            tunnel_id=pair.tunnel_id,
            own_key=pair.b_key,
            peer_key=pair.a_key.public_key(),
            remote_candidates=candidates + b_relay,
        )
        pair.b.result.addBoth(pair.b_result.append)
        pair.b.core.role.answer.addCallbacks(answer, lambda f: None)

    def answer(candidates: list[Candidate]) -> None:
        assert pair.intro.deferred is not None
        if intro_delay is not None:
            reply = (candidates + a_relay, pair.b_key.public_key(), nonce_of(pair.b))
            net.reactor.callLater(intro_delay, pair.intro.deferred.callback, reply)

    pair.intro.forward = introduced
    pair._a = net.make(
        "a",
        **{"host": A_HOST, **(a or {})},
        role="initiator",
        peer="bob",
        service="chat",
        tunnel_id=pair.tunnel_id,
        own_key=pair.a_key,
        introduce=pair.intro,
        progress=pair.progress.append,
    )
    pair.a.result.addBoth(pair.a_result.append)
    return pair


def assert_clean_hand_off(
    pair: Pair, a_to: Address | None = None, b_to: Address | None = None
) -> None:
    """
    Both handed off, to each other (by default their host addresses), once;
    nothing punchd sent afterwards, nothing of punchd's reached a program,
    and no timer or reader is left behind.
    """
    pair.net.run(5.0)
    a_to = a_to or pair.eb.address
    b_to = b_to or pair.ea.address
    a, b = pair.hand_off("a"), pair.hand_off("b")
    assert pair.ea.releases == [a_to]
    assert pair.eb.releases == [b_to]
    assert a.sock.remote == a_to  # type: ignore[attr-defined]
    assert b.sock.remote == b_to  # type: ignore[attr-defined]
    assert a.info["remote"] == wire.format_address(a_to)
    assert b.info["remote"] == wire.format_address(b_to)
    assert pair.net.after_release == [], [(d.sender, d.kind()) for d in pair.net.after_release]
    assert pair.ea.inbox == [] and pair.eb.inbox == []
    assert pair.net.reactor.getDelayedCalls() == []
    assert pair.net.reactor.readers == set()
    assert pair.a.machine.describe() == pair.b.machine.describe() == "handed off"


@pytest.fixture(autouse=True)
def no_logged_failures() -> Iterator[list[LogEvent]]:
    """
    The glue logs (rather than raises) errors while handling a datagram;
    any such error fails the test.
    """
    with capturedLogs() as events:
        yield events  # type: ignore[misc]
        gc.collect()  # "Unhandled error in Deferred" is logged when one is collected
    failures = [e for e in events if "log_failure" in e]
    assert not failures, failures[0]["log_failure"].getTraceback()


@pytest.fixture
def net() -> Iterator[Net]:
    network = Net()
    yield network
    network.dismantle()


# -- the happy path ----------------------------------------------------------


def test_happy_path(net: Net) -> None:
    pair = make_pair(net)
    assert pair.b.machine.describe() == "checking"  # the responder probes at once
    assert pair.a.machine.describe() == "introducing"
    net.run(1.0)
    a, b = pair.hand_off("a"), pair.hand_off("b")
    a_port, b_port = pair.ea.address[1], pair.eb.address[1]
    assert a.info["remote"] == f"{B_HOST}:{b_port}"
    assert b.info["remote"] == f"{A_HOST}:{a_port}"
    assert a.info["local"] == f"{A_HOST}:{a_port}"  # as the responder saw it
    assert b.info["local"] == f"{B_HOST}:{b_port}"
    assert a.info["id"] == b.info["id"] == pair.a.tunnel_id.hex()
    assert (a.info["peer"], a.info["role"]) == ("bob", "initiator")
    assert (b.info["peer"], b.info["role"]) == ("alice", "responder")
    assert a.info["service"] == b.info["service"] == "chat"
    assert a.info["path"] == b.info["path"] == "direct"
    assert a.info["candidates"] == {"local": "host", "remote": "host"}
    assert b.info["candidates"] == {"local": "host", "remote": "host"}
    assert a.info["rtt_ms"] == pytest.approx(2 * LATENCY * 1000)
    # The responder's first check waited at the initiator for the introduction.
    assert b.info["rtt_ms"] == pytest.approx((INTRO_DELAY + LATENCY) * 1000)
    assert pair.ea.released_at is not None and pair.eb.released_at is not None
    assert a.info["setup_ms"] == round(pair.ea.released_at * 1000, 3)
    assert b.info["setup_ms"] == round(pair.eb.released_at * 1000, 3)
    assert 0 < a.info["setup_ms"] < 100
    events = [e["event"] for e in pair.progress]
    assert events == ["gathered", "introduced", "probing", "nominating"]
    assert_clean_hand_off(pair)


def test_the_responder_hands_off_on_confirm(net: Net) -> None:
    pair = make_pair(net)
    net.run(1.0)
    confirms = [d for d in net.sent_by("a") if d.kind() == "confirm"]
    assert len(confirms) == 3
    arrival = confirms[-1].sent_at + LATENCY
    # All copies are in together, so only a short tail for duplicates remains.
    assert pair.eb.released_at == pytest.approx(arrival + LINGER_MIN)
    assert pair.eb.released_at < arrival + QUIET / 10
    assert_clean_hand_off(pair)


# -- loss, duplicates, reordering ----------------------------------------------


NAT = ("203.0.113.7", 5555)

#: Where the tunnels are: both on one LAN; or the initiator behind a NAT
#: (host address unreachable) and the responder on a public address.
TOPOLOGIES: dict[str, dict[str, dict[str, Any]]] = {
    "lan": {},
    "nat": {"a": {"public": NAT, "reachable": False}, "b": {"on": "wan"}},
}


def expected_remotes(pair: Pair, topology: str) -> tuple[Address, Address]:
    if topology == "nat":
        return pair.eb.address, NAT
    return pair.eb.address, pair.ea.address


def happy_exchange_length(topology: str) -> int:
    """
    How many datagrams the two tunnels send on a lossless network.
    """
    net = Net()
    pair = make_pair(net, **TOPOLOGIES[topology])
    net.run(1.0)
    assert pair.ea.releases and pair.eb.releases
    return len(net.log)


EXCHANGES = {topology: happy_exchange_length(topology) for topology in TOPOLOGIES}


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_the_exchange_is_short(topology: str) -> None:
    assert 6 <= EXCHANGES[topology] <= 20


@pytest.mark.parametrize(
    ("topology", "lost"), [(t, i) for t, n in EXCHANGES.items() for i in range(n)]
)
def test_loss_of_any_single_message(net: Net, topology: str, lost: int) -> None:
    fates: list[Datagram] = []

    def fate(datagram: Datagram) -> list[float]:
        fates.append(datagram)
        return [] if datagram.index == lost else net.deliver_once(datagram)

    net.fate = fate
    pair = make_pair(net, **TOPOLOGIES[topology])
    net.run(3.0)
    assert len(fates) > lost
    assert pair.a_result and pair.b_result, f"stuck after losing {fates[lost].kind()}"
    assert_clean_hand_off(pair, *expected_remotes(pair, topology))


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_duplicated_datagrams(net: Net, topology: str) -> None:
    net.fate = lambda d: [LATENCY, LATENCY + 0.001, LATENCY + 0.003]
    pair = make_pair(net, **TOPOLOGIES[topology])
    net.run(1.0)
    assert_clean_hand_off(pair, *expected_remotes(pair, topology))


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("seed", range(6))
def test_reordered_delivery(net: Net, topology: str, seed: int) -> None:
    chance = random.Random(seed)
    arrivals: list[tuple[str, float, float]] = []

    def fate(datagram: Datagram) -> list[float]:
        delay = chance.uniform(0.001, 0.012)
        arrivals.append((datagram.sender, datagram.sent_at, datagram.sent_at + delay))
        return [delay]

    net.fate = fate
    pair = make_pair(net, **TOPOLOGIES[topology])
    net.run(2.0)
    overtaken = [
        (first, second)
        for first in arrivals
        for second in arrivals
        if first[0] == second[0] and first[1] <= second[1] and first[2] > second[2]
    ]
    assert overtaken, "nothing was reordered"
    assert_clean_hand_off(pair, *expected_remotes(pair, topology))


def test_checks_before_the_introduction_are_not_lost(net: Net) -> None:
    """
    The responder probes before the initiator knows its key: those checks
    are kept and answered once it does, and do not demote the responder's
    signalled host candidate to peer-reflexive.
    """
    pair = make_pair(net, intro_delay=0.08)
    net.run(0.07)
    early = [d for d in net.sent_by("b") if d.kind() == "check"]
    assert early and not [d for d in net.sent_by("a") if d.kind() == "answer"]
    net.run(0.015)
    answers = [d for d in net.sent_by("a") if d.kind() == "answer"]
    assert answers and answers[0].sent_at == pytest.approx(0.08)
    assert_clean_hand_off(pair)
    assert pair.hand_off("a").info["candidates"]["remote"] == "host"


# -- paths -------------------------------------------------------------------


def test_peer_reflexive_learning(net: Net) -> None:
    """
    The initiator is behind a NAT: its host candidate is unreachable and its
    checks come from an address the responder was never told about.
    """
    pair = make_pair(net, **TOPOLOGIES["nat"])
    net.run(2.0)
    b = pair.hand_off("b")
    assert pair.eb.releases == [NAT]
    assert b.info["remote"] == "203.0.113.7:5555"
    assert b.info["candidates"]["remote"] == "prflx"
    assert remotes(pair.b)[NAT].remote.kind == CandidateKind.PRFLX
    a = pair.hand_off("a")
    assert a.info["local"] == "203.0.113.7:5555"
    assert a.info["candidates"] == {"local": "prflx", "remote": "host"}
    assert_clean_hand_off(pair, *expected_remotes(pair, "nat"))


def grace_pair(net: Net, lan: float, wan: float) -> Pair:
    """
    Hosts on one LAN, both with a public address; the responder learns its
    own (srflx) from a STUN server and offers both.
    """
    net.latency = {"lan": lan, "wan": wan}
    net.stun_server(RENDEZVOUS)
    return make_pair(
        net,
        a={"public": ("198.51.100.10", None)},
        b={"public": ("198.51.100.20", None), "rendezvous": RENDEZVOUS},
    )


def first_answer_to_a(pair: Pair) -> Datagram:
    net = pair.net
    answers = [d for d in net.sent_by("b") if d.kind() == "answer"]
    return min(answers, key=lambda d: d.sent_at + net.latency[net.label_of(d.dst)])


def test_nomination_grace_prefers_host_over_srflx_that_answered_first(net: Net) -> None:
    """
    The responder's srflx pair (WAN, 5 ms) answers before its host pair
    (LAN, 6 ms), but the host pair answers within the grace period: it wins.
    """
    pair = grace_pair(net, lan=0.006, wan=0.005)
    net.run(1.0)
    srflx = pair.eb.addresses["wan"]
    assert remotes(pair.a)[srflx].remote.kind == CandidateKind.SRFLX
    assert remotes(pair.a)[srflx].answered and remotes(pair.a)[pair.eb.address].answered
    assert first_answer_to_a(pair).dst == pair.ea.addresses["wan"]  # srflx answered first
    a = pair.hand_off("a")
    assert a.info["remote"] == wire.format_address(pair.eb.address)
    assert a.info["candidates"]["remote"] == "host"
    assert_clean_hand_off(pair)


def test_srflx_wins_when_the_host_pair_is_too_slow(net: Net) -> None:
    """
    When the host pair answers long after the srflx pair, the initiator does
    not wait for it.
    """
    pair = grace_pair(net, lan=0.04, wan=0.002)
    net.run(1.0)
    assert first_answer_to_a(pair).dst == pair.ea.addresses["wan"]
    a = pair.hand_off("a")
    assert a.info["remote"] == wire.format_address(pair.eb.addresses["wan"])
    assert a.info["candidates"]["remote"] == "srflx"
    assert pair.ea.released_at is not None and pair.ea.released_at < 0.08
    assert_clean_hand_off(pair, a_to=pair.eb.addresses["wan"], b_to=pair.ea.addresses["wan"])


# -- the responder's hand-off --------------------------------------------------


def drop_confirms(net: Net) -> None:
    net.fate = lambda d: [] if d.kind() == "confirm" else net.deliver_once(d)


def test_responder_hands_off_after_the_quiet_period_when_confirm_is_lost(net: Net) -> None:
    drop_confirms(net)
    pair = make_pair(net)
    net.run(QUIET + 1.0)
    nominations = [d for d in net.sent_by("a") if d.kind() == "nominate"]
    assert len(nominations) == 1
    assert pair.eb.released_at == pytest.approx(nominations[-1].sent_at + LATENCY + QUIET)
    assert_clean_hand_off(pair)


def test_responder_hands_off_when_the_program_speaks_and_keeps_its_words(net: Net) -> None:
    drop_confirms(net)
    pair = make_pair(net)
    net.run(FINAL_WORD_WAIT + 0.1)
    assert pair.ea.releases and not pair.eb.releases
    assert pair.b.machine.describe() == "awaiting confirmation"
    net.program_send("a", b"hello from alice's program", pair.eb.address)
    net.run(LATENCY)
    assert pair.eb.releases == [pair.ea.address]
    assert pair.eb.released_at == pytest.approx(FINAL_WORD_WAIT + 0.1 + LATENCY)
    assert pair.eb.inbox == [(b"hello from alice's program", pair.ea.address)]
    assert all(data != b"hello from alice's program" for data, _ in pair.eb.consumed)
    assert_clean_hand_off_but_for_inbox(pair)


def test_the_initiator_hands_off_once_the_responder_is_done(net: Net) -> None:
    """
    The responder's last Confirm says it answers no more checks: the
    initiator hands off a short tail after it, and not before.
    """
    pair = make_pair(net)
    net.run(1.0)
    last = [d for d in net.sent_by("b") if d.kind() == "confirm"]
    assert len(last) == 3
    assert pair.eb.released_at is not None and pair.ea.released_at is not None
    assert last[-1].sent_at <= pair.eb.released_at
    assert pair.ea.released_at == pytest.approx(last[0].sent_at + LATENCY + LINGER_MIN)
    assert_clean_hand_off(pair)


def assert_clean_hand_off_but_for_inbox(pair: Pair) -> None:
    pair.net.run(5.0)
    assert pair.hand_off("b").sock.remote == pair.ea.address  # type: ignore[attr-defined]
    assert pair.net.after_release == []
    assert pair.net.reactor.getDelayedCalls() == []


def test_responder_hands_off_at_its_deadline_while_awaiting_confirmation(net: Net) -> None:
    drop_confirms(net)
    pair = make_pair(net, b={"timeout": 0.5})
    net.run(0.5)
    assert pair.eb.released_at == pytest.approx(0.5)
    assert pair.hand_off("b").sock.remote == pair.ea.address  # type: ignore[attr-defined]
    assert_clean_hand_off(pair)


def test_program_data_from_elsewhere_does_not_hand_off(net: Net) -> None:
    drop_confirms(net)
    pair = make_pair(net)
    net.run(0.5)
    pair.eb.arrive(b"noise", ("198.51.100.99", 4444))
    assert not pair.eb.releases
    assert pair.b.machine.describe() == "awaiting confirmation"
    # Connected to the nominated remote at once: the kernel drops the rest.
    assert pair.eb.connected == pair.ea.address
    assert (b"noise", ("198.51.100.99", 4444)) not in pair.eb.queue + pair.eb.consumed


def confirm(pair: Pair, key: bytes) -> bytes:
    return wire.signed(
        Method.CONFIRM,
        MessageClass.INDICATION,
        stun.new_transaction_id(),
        [(Attr.USERNAME, f"{pair.a.core.id_hex}:a".encode())],
        key,
    )


def test_only_an_authentic_confirm_from_the_nominated_address_confirms(net: Net) -> None:
    drop_confirms(net)
    pair = make_pair(net)
    net.run(0.5)
    key = derive_tunnel_key(pair.a_key, pair.b_key.public_key(), pair.tunnel_id, nonce_of(pair.b))
    elsewhere = ("198.51.100.99", 4444)
    pair.eb.arrive(confirm(pair, key), elsewhere)
    pair.eb.arrive(confirm(pair, bytes(32)), elsewhere)
    net.run(0.3)
    assert not pair.eb.releases
    assert pair.b.machine.describe() == "awaiting confirmation"
    # From the nominated address, what is not punchd's is the program's.
    forged = confirm(pair, bytes(32))
    pair.eb.arrive(forged, pair.ea.address)
    assert pair.eb.releases == [pair.ea.address]
    assert pair.eb.inbox == [(forged, pair.ea.address)]


# -- failures ----------------------------------------------------------------


def test_deadline_when_every_check_is_lost(net: Net) -> None:
    net.fate = lambda d: []
    pair = make_pair(net, a={"timeout": 5.0}, b={"timeout": 6.0})
    net.run(4.99)
    assert not pair.a_result
    net.run(0.01)
    error = pair.failure("a")
    assert error.code == "unreachable"
    b_port = pair.eb.address[1]
    assert "no check got through either way" in error.message
    assert f"host {B_HOST}:{b_port}: " in error.message
    checks = len([d for d in net.sent_by("a") if d.dst == pair.eb.address])
    assert checks > 5 and f"{checks} checks, silent" in error.message
    assert pair.a.sockets[0].sock is None and pair.a.sockets[0].real.fileno() == -1  # type: ignore[attr-defined]
    net.run(1.0)
    error_b = pair.failure("b")
    assert error_b.code == "unreachable"
    assert f"host {A_HOST}:{pair.ea.address[1]}: " in error_b.message
    assert net.reactor.getDelayedCalls() == [] and net.reactor.readers == set()
    sent = len(net.log)
    net.run(30.0)
    assert len(net.log) == sent


def test_deadline_when_only_one_way_works(net: Net) -> None:
    """
    The responder hears the initiator but its answers and checks are lost:
    its failure says the checks reached it.
    """
    net.fate = lambda d: net.deliver_once(d) if d.sender == "a" else []
    pair = make_pair(net, a={"timeout": 5.0}, b={"timeout": 5.0})
    net.run(5.0)
    assert "silent" in pair.failure("a").message
    error = pair.failure("b")
    assert error.code == "unreachable"
    assert "the peer's checks reached us" in error.message
    assert "heard from" in error.message


def test_deadline_during_introduction(net: Net) -> None:
    pair = make_pair(net, intro_delay=None, a={"timeout": 3.0})
    net.run(2.99)
    assert not pair.a_result
    net.run(0.01)
    error = pair.failure("a")
    assert (error.code, error.message) == ("timeout", "bob did not answer in time")
    assert pair.intro.cancelled
    assert pair.a.sockets[0].sock is None
    assert [d for d in net.sent_by("a") if d.kind() != "answer"] == []


def test_deadline_while_gathering(net: Net) -> None:
    intro = Intro()
    tunnel = net.make(
        "a",
        A_HOST,
        role="initiator",
        peer="bob",
        service="chat",
        tunnel_id=new_tunnel_id(),
        own_key=PrivateKey.generate(),
        introduce=intro,
        rendezvous=RENDEZVOUS,  # silent: no server there
        timeout=0.5,
    )
    results = outcome(tunnel.result)
    net.run(0.5)
    (failure,) = results
    assert isinstance(failure, Failure) and failure.value.code == "timeout"
    assert intro.candidates is None
    assert tunnel.sockets[0].sock is None


def test_a_failed_initiator_leaves_no_unhandled_error() -> None:
    """
    Nobody waits on an initiator's gathered candidates: failing must not
    leave an unhandled failure there for the garbage collector to log.
    """
    with capturedLogs() as events:
        net = Net()
        pair = make_pair(net, intro_delay=None, a={"timeout": 1.0})
        net.run(1.0)
        assert pair.failure("a").code == "timeout"
        net.dismantle()
        del pair, net
        gc.collect()
    assert [e for e in events if "log_failure" in e] == []


def test_cancel(net: Net) -> None:
    pair = make_pair(net, intro_delay=None)
    net.run(0.2)
    pair.a.result.cancel()
    error = pair.failure("a")
    assert error.code == "cancelled"
    assert pair.intro.cancelled
    assert pair.a.sockets[0].sock is None
    assert pair.a.sockets[0].real.fileno() == -1  # type: ignore[attr-defined]
    assert pair.a.sockets[0] not in net.reactor.readers
    pair.b.machine.cancel()
    assert pair.failure("b").code == "cancelled"
    assert pair.b.sockets[0].sock is None
    assert net.reactor.getDelayedCalls() == [] and net.reactor.readers == set()
    sent = len(net.log)
    net.run(30.0)
    assert len(net.log) == sent


def test_cancel_after_hand_off_changes_nothing(net: Net) -> None:
    pair = make_pair(net)
    net.run(1.0)
    pair.a.machine.cancel()
    assert pair.a.machine.describe() == "handed off"
    assert isinstance(pair.a_result[0], HandOff)


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            TunnelFailed("no-listener", "nothing on bob listens for service chat"),
            "no-listener",
            "nothing on bob listens for service chat",
        ),
        (TunnelFailed("rejected", "bob said no"), "rejected", "bob said no"),
        (RequestTimedOut("no answer after 5 sends"), "timeout", None),
    ],
)
def test_refused_introduction(net: Net, error: Exception, code: str, message: str | None) -> None:
    pair = make_pair(net, intro_delay=None)
    net.run(0.05)
    assert pair.intro.deferred is not None
    pair.intro.deferred.errback(error)
    failure = pair.failure("a")
    assert failure.code == code
    if message is not None:
        assert failure.message == message
    else:
        assert "no answer after 5 sends" in failure.message
    assert pair.a.sockets[0].sock is None
    assert pair.a.machine.describe() == "failed"


# -- authentication of checks --------------------------------------------------


STRANGER = ("198.51.100.66", 6666)


def check_from(pair: Pair, *, key: bytes | None, username: bytes | None) -> bytes:
    attributes = [(Attr.PRIORITY, stun.encode_u32(1))]
    if username is not None:
        attributes.insert(0, (Attr.USERNAME, username))
    return stun.build(
        Method.BINDING,
        MessageClass.REQUEST,
        stun.new_transaction_id(),
        attributes,
        integrity_sha256=key,
        fingerprint=True,
    )


@pytest.mark.parametrize(
    "case", ["valid", "bad integrity", "unsigned", "wrong tunnel", "wrong role", "no username"]
)
def test_checks_must_authenticate(net: Net, case: str) -> None:
    pair = make_pair(net, intro_delay=None)
    key = derive_tunnel_key(pair.a_key, pair.b_key.public_key(), pair.a.tunnel_id, nonce_of(pair.b))
    username = f"{pair.a.core.id_hex}:a".encode()
    data = {
        "valid": lambda: check_from(pair, key=key, username=username),
        "bad integrity": lambda: check_from(
            pair,
            key=derive_tunnel_key(
                PrivateKey.generate(), pair.b_key.public_key(), pair.a.tunnel_id, nonce_of(pair.b)
            ),
            username=username,
        ),
        "unsigned": lambda: check_from(pair, key=None, username=username),
        "wrong tunnel": lambda: check_from(
            pair, key=key, username=f"{new_tunnel_id().hex()}:a".encode()
        ),
        "wrong role": lambda: check_from(
            pair, key=key, username=f"{pair.a.core.id_hex}:b".encode()
        ),
        "no username": lambda: check_from(pair, key=key, username=None),
    }[case]()
    pair.eb.arrive(data, STRANGER)
    answers = [d for d in net.log if d.dst == STRANGER and d.kind() == "answer"]
    if case == "valid":
        (answer,) = answers
        message = answer.message()
        assert message is not None and message.cls == MessageClass.SUCCESS
        assert (
            stun.decode_xor_address(
                message.get(Attr.XOR_MAPPED_ADDRESS) or b"", message.transaction_id
            )
            == STRANGER
        )
        assert STRANGER in remotes(pair.b)
    else:
        assert answers == []
        assert STRANGER not in remotes(pair.b)
    assert pair.b.machine.describe() == "checking"


def test_answers_must_authenticate(net: Net) -> None:
    """
    An answer to one of our checks counts only under the tunnel key.
    """
    net.fate = lambda d: [] if d.sender == "b" else net.deliver_once(d)
    pair = make_pair(net)
    net.run(0.05)
    check = next(d for d in net.sent_by("a") if d.kind() == "check")
    message = check.message()
    assert message is not None
    forged = stun.build(
        Method.BINDING,
        MessageClass.SUCCESS,
        message.transaction_id,
        [(Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(A_HOST, 1, message.transaction_id))],
        integrity_sha256=bytes(32),
        fingerprint=True,
    )
    pair.ea.arrive(forged, check.dst)
    assert not remotes(pair.a)[check.dst].answered
    assert pair.a.machine.describe() == "checking"


# -- gathering ---------------------------------------------------------------


def test_server_reflexive_gathering(net: Net) -> None:
    net.stun_server(RENDEZVOUS)
    pair = make_pair(
        net,
        a={"public": ("198.51.100.10", 40000), "rendezvous": RENDEZVOUS},
        b={"public": ("198.51.100.20", 50000), "rendezvous": RENDEZVOUS},
    )
    assert pair.intro.candidates is None  # still asking the rendezvous
    net.run(2 * LATENCY)
    a_port = pair.ea.address[1]
    assert pair.intro.candidates == [
        Candidate(CandidateKind.HOST, A_HOST, a_port),
        Candidate(CandidateKind.SRFLX, "198.51.100.10", 40000),
    ]
    assert pair.progress[0] == {
        "event": "gathered",
        "candidates": [f"host {A_HOST}:{a_port}", "srflx 198.51.100.10:40000"],
    }
    net.run(1.0)
    assert_clean_hand_off(pair)


class Tracer:
    """The responder's traceroute toward the peer's NAT, answered by hand."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.cancelled = False
        self.deferred: Deferred[int | None] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[int | None]) -> None:
        self.cancelled = True

    def __call__(self, target: str) -> Deferred[int | None]:
        self.targets.append(target)
        return self.deferred


def waiting_responder(net: Net, tracer: Tracer) -> Pair:
    net.stun_server(RENDEZVOUS)
    return make_pair(
        net,
        a={"public": ("198.51.100.10", 40000), "rendezvous": RENDEZVOUS},
        b={
            "public": ("198.51.100.20", 50000),
            "rendezvous": RENDEZVOUS,
            "wait_for_peer": True,
            "trace": tracer,
        },
    )


@pytest.mark.parametrize(("router", "primer"), [(3, 3), (6, 5), (1, None), (None, None)])
def test_a_responder_told_to_wait_primes_its_nat_before_it_answers(
    net: Net, router: int | None, primer: int | None
) -> None:
    tracer = Tracer()
    pair = waiting_responder(net, tracer)
    net.run(0.1)
    assert tracer.targets == ["198.51.100.10"]  # the initiator's NAT
    answer = pair.b.core.role.answer
    assert not answer.called and net.primers == []
    primed_before_answer: list[list[Any]] = []
    answer.addCallback(lambda _: primed_before_answer.append(list(net.primers)))
    tracer.deferred.callback(router)
    # A primer to the initiator's public address only, dying at that router.
    expected = [] if primer is None else [("b", ("198.51.100.10", 40000), primer)]
    assert primed_before_answer == [expected]
    net.run(1.0)
    assert_clean_hand_off(pair)
    assert net.primers == expected


def test_only_the_traced_address_is_primed(net: Net) -> None:
    tracer = Tracer()
    pair = waiting_responder(net, tracer)
    # The initiator names a second public address (say, a port mapping on
    # another uplink): the trace says nothing of the path there.
    forward = pair.intro.forward
    elsewhere = Candidate(CandidateKind.MAPPED, "198.51.100.99", 41000)
    pair.intro.forward = lambda candidates: forward([*candidates, elsewhere])
    net.run(0.1)
    assert tracer.targets == ["198.51.100.10"]
    tracer.deferred.callback(4)
    assert net.primers == [("b", ("198.51.100.10", 40000), 3)]
    assert ("198.51.100.99", 41000) in remotes(pair.b)
    net.run(1.0)
    assert_clean_hand_off(pair)


def test_a_responder_that_gives_up_while_tracing_cancels_the_trace(net: Net) -> None:
    tracer = Tracer()
    pair = waiting_responder(net, tracer)
    net.run(0.1)
    pair.b.result.cancel()
    assert pair.failure("b").code == "cancelled"
    assert tracer.cancelled
    assert net.primers == []
    pair.a.result.cancel()
    assert net.reactor.getDelayedCalls() == [] and net.reactor.readers == set()


GATHER_KEY = b"k" * 32


@pytest.mark.parametrize("signed_by", [GATHER_KEY, b"x" * 32, None])
def test_signed_gathering_takes_only_an_answer_under_our_key(
    net: Net, signed_by: bytes | None
) -> None:
    """
    The agent's gather is signed with its rendezvous key, and only an answer
    signed with that key yields a server-reflexive candidate.
    """

    def rendezvous(data: bytes, source: Address) -> bytes | None:
        request = stun.parse(data)
        assert request.get(Attr.USERNAME) == b"alice"
        assert stun.verify_integrity_sha256(request, GATHER_KEY)
        if signed_by is None:
            return stun.binding_response(data, *source)
        return build_gather_answer(request.transaction_id, source, signed_by)

    net.servers[RENDEZVOUS] = rendezvous
    intro = Intro()
    tunnel = net.make(
        "a",
        A_HOST,
        public=("198.51.100.10", 40000),
        role="initiator",
        peer="bob",
        service="chat",
        tunnel_id=new_tunnel_id(),
        own_key=PrivateKey.generate(),
        introduce=intro,
        gatherer=SignedGather(RENDEZVOUS, "alice", GATHER_KEY),
    )
    results = outcome(tunnel.result)
    net.run(GATHER_BACKOFF.total() + 0.01)
    host = Candidate(CandidateKind.HOST, A_HOST, tunnel.sockets[0].local[1])
    srflx = Candidate(CandidateKind.SRFLX, "198.51.100.10", 40000)
    assert intro.candidates == ([host, srflx] if signed_by == GATHER_KEY else [host])
    tunnel.machine.cancel()
    assert isinstance(results[0], Failure)


def test_silent_rendezvous_gathers_host_candidates_only(net: Net) -> None:
    intro = Intro()
    tunnel = net.make(
        "a",
        A_HOST,
        role="initiator",
        peer="bob",
        service="chat",
        tunnel_id=new_tunnel_id(),
        own_key=PrivateKey.generate(),
        introduce=intro,
        rendezvous=RENDEZVOUS,
    )
    results = outcome(tunnel.result)
    net.run(GATHER_BACKOFF.total() - 0.01)
    assert intro.candidates is None
    assert len([d for d in net.log if d.dst == RENDEZVOUS]) == GATHER_BACKOFF.attempts
    net.run(0.01)
    assert intro.candidates == [Candidate(CandidateKind.HOST, A_HOST, tunnel.sockets[0].local[1])]
    tunnel.machine.cancel()
    assert isinstance(results[0], Failure)


# -- the real socket -----------------------------------------------------------


#: Linux's C{IP_RECVTTL}, which Python's socket module does not name.
IP_RECVTTL = 12


@pytest.fixture
def on_loopback() -> Iterator[tuple[TunnelSocket, socket.socket]]:
    """
    A tunnel socket on loopback that passes nothing on (what it reads, it
    drops), and a peer socket bound beside it.
    """
    reactor = FakeReactor()
    sock = TunnelSocket(reactor, lambda d, s: None, lambda d, s: False, bind=("127.0.0.1", 0))  # type: ignore[arg-type]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.1", 0))
        yield sock, peer
    finally:
        peer.close()
        sock.close()


def test_a_primer_leaves_with_its_ttl_and_later_datagrams_with_the_usual_one(
    on_loopback: tuple[TunnelSocket, socket.socket],
) -> None:
    sock, peer = on_loopback
    peer.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    peer.settimeout(5.0)
    usual = peer.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)

    def ttl_of_next() -> int:
        _, ancdata, _, _ = peer.recvmsg(64, 64)
        [(level, kind, value)] = ancdata
        assert (level, kind) == (socket.IPPROTO_IP, socket.IP_TTL)
        return int.from_bytes(value, "little")

    sock.send_primer(b"primer", peer.getsockname(), 3)
    sock.send(b"check", peer.getsockname())
    assert [ttl_of_next(), ttl_of_next()] == [3, usual]


def test_tunnel_socket_peeks_and_release_keeps_the_programs_data() -> None:
    """
    Over loopback: while peeking, the program's first datagram stays queued,
    and release() consumes the agent's own stragglers but not that datagram.
    """
    reactor = FakeReactor()
    received: list[bytes] = []
    sock = TunnelSocket(
        reactor,  # type: ignore[arg-type]
        lambda data, source: received.append(data),
        lambda data, source: not data.startswith(b"ours"),
        bind=("127.0.0.1", 0),
    )
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.1", 0))
        remote = peer.getsockname()
        sock.start_reading()
        assert reactor.readers == {sock}
        peer.sendto(b"ours 1", sock.local)
        wait_readable(sock)
        sock.doRead()
        assert received == [b"ours 1"]
        sock.connect(remote)
        sock.peeking = True
        peer.sendto(b"ours 2", sock.local)
        peer.sendto(b"program data", sock.local)
        peer.sendto(b"more program data", sock.local)
        wait_readable(sock)
        sock.doRead()
        assert received == [b"ours 1", b"ours 2"]
        assert reactor.readers == set()  # stopped reading at the program's datagram
        handed = sock.release(remote, lambda data, source: data.startswith(b"ours"))
        try:
            assert sock.sock is None
            handed.settimeout(1.0)
            assert handed.recv(2048) == b"program data"
            assert handed.recv(2048) == b"more program data"
            assert handed.getpeername() == remote
        finally:
            handed.close()
    finally:
        peer.close()
        sock.close()


def test_tunnel_socket_release_consumes_queued_stragglers(
    on_loopback: tuple[TunnelSocket, socket.socket],
) -> None:
    sock, peer = on_loopback
    peer.sendto(b"ours 1", sock.local)
    peer.sendto(b"ours 2", sock.local)
    wait_readable(sock)
    sock.connect(peer.getsockname())
    handed = sock.release(peer.getsockname(), lambda data, source: data.startswith(b"ours"))
    try:
        handed.setblocking(False)
        with pytest.raises(BlockingIOError):
            handed.recv(2048)
        peer.sendto(b"program data", sock.local)
        handed.settimeout(1.0)
        assert handed.recv(2048) == b"program data"
    finally:
        handed.close()


def test_nothing_from_elsewhere_reaches_the_program_after_connect(
    on_loopback: tuple[TunnelSocket, socket.socket],
) -> None:
    """
    A stranger floods the tunnel socket before and after the remote is
    chosen: what came before the connect is consumed, however much of it
    there is, and nothing from the stranger arrives after it.
    """
    sock, peer = on_loopback
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.bind(("127.0.0.1", 0))
        for i in range(200):  # a flood queued before the remote was chosen
            stranger.sendto(b"injected %d" % i, sock.local)
        wait_readable(sock)
        sock.connect(peer.getsockname())
        for i in range(50):
            stranger.sendto(b"injected late %d" % i, sock.local)
        peer.sendto(b"ours", sock.local)
        peer.sendto(b"program data", sock.local)
        handed = sock.release(peer.getsockname(), lambda data, source: data.startswith(b"ours"))
        try:
            handed.settimeout(1.0)
            assert handed.recv(2048) == b"program data"
            stranger.sendto(b"injected after", sock.local)
            peer.sendto(b"end", sock.local)
            assert handed.recv(2048) == b"end"
        finally:
            handed.close()
    finally:
        stranger.close()


def wait_readable(sock: TunnelSocket) -> None:
    assert sock.sock is not None
    readable, _, _ = select.select([sock.sock], [], [], 1.0)
    assert readable


def test_an_abandoned_tunnel_is_not_handed_to_the_responders_program(net: Net) -> None:
    """
    The initiator nominated, but the responder's answers never reach it, and
    its program gives up: its ABANDON stops the responder, which would
    otherwise hand its program a tunnel with nobody at the other end.
    """

    def fate(datagram: Datagram) -> list[float]:
        nominated = any(d.kind() == "nominate" for d in net.sent_by("a"))
        return [] if datagram.sender == "b" and nominated else [LATENCY]

    net.fate = fate
    pair = make_pair(net)
    net.run(0.5)
    assert pair.b.machine.describe() == "awaiting confirmation"
    pair.a.result.cancel()
    assert pair.failure("a").code == "cancelled"
    assert [d.kind() for d in net.sent_by("a")][-2:] == ["abandon", "abandon"]
    net.run(5.0)
    assert pair.failure("b").code == "cancelled"
    assert pair.eb.releases == []
    assert net.reactor.getDelayedCalls() == [] and net.reactor.readers == set()


def test_the_initiator_moves_on_when_the_responder_gives_up(net: Net) -> None:
    """
    A responder that fails tells the initiator, which stops probing at once
    (as unreachable, so that a second round may follow) instead of waiting
    for its own deadline.
    """
    pair = make_pair(net)
    net.run(0.02)
    assert key_of(pair.a) is not None and pair.a.machine.describe() in ("checking", "nominating")
    pair.b.machine.cancel()
    net.run(0.1)
    error = pair.failure("a")
    assert error.code == "unreachable" and "the peer gave up" in error.message


def test_an_unsigned_answer_from_the_rendezvous_address_answers_no_check(net: Net) -> None:
    """
    Only the gathering request is plain STUN; a check's answer needs the
    tunnel key and must come from where the check went, whatever its source
    claims to be (here: the rendezvous' address, spoofed).
    """
    net.stun_server(RENDEZVOUS)
    net.fate = lambda d: [] if d.sender == "b" and d.dst != RENDEZVOUS else [LATENCY]
    pair = make_pair(
        net,
        a={"rendezvous": RENDEZVOUS},
        b={"public": ("198.51.100.20", 50000), "rendezvous": RENDEZVOUS},
    )
    net.run(0.2)
    checks = [d for d in net.sent_by("a") if d.kind() == "check"]
    assert checks
    for check in checks:
        message = check.message()
        assert message is not None
        forged = stun.build(
            Method.BINDING,
            MessageClass.SUCCESS,
            message.transaction_id,
            [(Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address(A_HOST, 1, message.transaction_id))],
            fingerprint=True,
        )
        pair.ea.arrive(forged, RENDEZVOUS)
    assert not any(r.answered for r in remotes(pair.a).values())
    assert pair.a.machine.describe() == "checking"


def test_a_replayed_introduction_gets_a_fresh_tunnel_key(net: Net) -> None:
    """
    The responder draws a nonce per introduction: a replayed Incoming (same
    tunnel id, same initiator) cannot bring the old tunnel's checks and
    nomination back to life.
    """
    pair = make_pair(net)
    net.run(1.0)
    old = next(d for d in net.sent_by("a") if d.kind() == "nominate")
    replayed = net.make(
        "c",
        "192.0.2.30",
        role="responder",
        peer="alice",
        service="chat",
        tunnel_id=pair.tunnel_id,
        own_key=pair.b_key,
        peer_key=pair.a_key.public_key(),
        remote_candidates=[],
    )
    results = outcome(replayed.result)
    assert key_of(replayed) is not None and key_of(replayed) != key_of(pair.b)
    attacker = ("198.51.100.66", 6666)
    replayed.sockets[0].endpoint.arrive(old.data, attacker)  # type: ignore[attr-defined]
    net.run(0.5)
    assert attacker not in remotes(replayed)
    assert replayed.machine.describe() != "awaiting confirmation"
    replayed.machine.cancel()
    assert isinstance(results[0], Failure)


# -- the relay -------------------------------------------------------------------


def test_the_relay_carries_a_tunnel_no_direct_pair_can(net: Net) -> None:
    """
    Both behind NATs that admit nobody: only the relay's pair answers, and
    it is nominated once the direct pairs had their chance.
    """
    pair = make_pair(
        net,
        relay=True,
        a={"reachable": False, "public": ("198.51.100.10", None)},
        b={"reachable": False, "public": ("198.51.100.20", None)},
    )
    net.run(3.0)
    a, b = pair.hand_off("a"), pair.hand_off("b")
    assert (a.info["path"], b.info["path"]) == ("relay", "relay")
    assert a.info["relay"] == wire.format_address(RELAY_A)
    assert a.info["candidates"] == {"local": "relay", "remote": "relay"}
    nominated = next(d for d in net.sent_by("a") if d.kind() == "nominate")
    assert nominated.dst == RELAY_A
    first_answer = min(d.sent_at for d in net.sent_by("b") if d.kind() == "answer")
    # Patience: the relay's pair waited for a better one before it was chosen.
    assert nominated.sent_at >= first_answer + CandidateKind.RELAY.patience  # type: ignore[operator]
    assert_clean_hand_off(pair, RELAY_A, RELAY_B)


def test_a_direct_pair_beats_the_relay_that_answered_first(net: Net) -> None:
    net.latency = {"lan": 0.08, "wan": LATENCY}
    pair = make_pair(net, relay=True)
    net.run(3.0)
    a = pair.hand_off("a")
    assert a.info["path"] == "direct"
    relay_answered = [d for d in net.log if d.kind() == "answer" and d.dst == RELAY_B]
    assert relay_answered, "the relay pair should have answered first"
    nominated = next(d for d in net.sent_by("a") if d.kind() == "nominate")
    # No waiting out the relay's patience once a direct pair answered.
    assert nominated.sent_at < relay_answered[0].sent_at + 0.3
    assert_clean_hand_off(pair)
