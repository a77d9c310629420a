"""
NAT behaviour discovery (C{punchctl netcheck}): what this host's network
lets tunnels do, found from one fresh socket.

The socket sends the agent's signed gather (L{punchd.gather}) to the
rendezvous's main port and then to its alternate port: an answer at all
means UDP gets out; the address seen is our public address; the same
address from both ports means the NAT keeps one mapping per socket
("cone"), two addresses that it maps per destination ("symmetric", the
hard kind).  Meanwhile the port mapper asks the gateway which mapping
protocols it offers.  The report says in one sentence what this means for
tunnels.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd.agent.portmap import PortMapper
from punchd.gather import build_gather_request, parse_gather_answer
from punchd.wire import format_address

log = Logger()

Address = tuple[str, int]

#: When a gather goes out again, from the first send; the last is the deadline.
GATHER_RESEND = (0.0, 0.3, 0.8, 1.5)
GATHER_DEADLINE = 2.5
RESOLVE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Gathered:
    """One family's answers: the mapping from each port, and the round trip."""

    main: Address | None
    alternate: Address | None
    rtt_ms: float | None


@dataclass(frozen=True)
class NetReport:
    """
    What netcheck found.  C{mapping_varies_by_destination} is None when it
    could not be told (no alternate port, or no answer from it).
    """

    udp: bool
    ipv4: str | None
    ipv6: str | None
    mapping_varies_by_destination: bool | None
    port_mapping: list[str]
    rendezvous_rtt_ms: float | None
    nat: bool | None = None
    #: The agent reaches its rendezvous over TLS (UDP to it is blocked).
    over_tls: bool = False
    checked_at: float = 0.0
    local_addresses: list[str] = field(default_factory=list, repr=False)

    @property
    def summary(self) -> str:
        """One sentence: what this network means for tunnels."""
        if not self.udp and self.over_tls:
            return (
                "UDP blocked, using TLS: tunnels go through the relay over TLS"
                " unless a peer can reach this host directly"
            )
        if not self.udp:
            return "UDP to the rendezvous is blocked: no direct tunnels, relay only"
        if self.nat is False:
            return "direct to most peers (no NAT: public address on this host)"
        if self.mapping_varies_by_destination:
            if self.port_mapping:
                return (
                    "direct to most peers through the gateway's port mapping"
                    f" ({self.port_mapping[0]}), although the NAT maps per destination"
                )
            return "direct only to easy NATs, relay otherwise (the NAT maps per destination)"
        if self.mapping_varies_by_destination is None:
            return (
                "direct to most peers, probably (the rendezvous has no alternate"
                " port, so a NAT that maps per destination would go unnoticed)"
            )
        return "direct to most peers (the NAT keeps one mapping per socket)"

    def to_json(self) -> dict[str, Any]:
        report = asdict(self)
        report.pop("local_addresses")
        report["summary"] = self.summary
        return report


class _Socket(DatagramProtocol):
    """Passes datagrams on to whichever exchange is waiting."""

    noisy = False

    def __init__(self) -> None:
        self.listener: Callable[[bytes, Address], None] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.listener is not None:
            self.listener(datagram, (addr[0], addr[1]))


def _gather_from(
    reactor: Any, sock: _Socket, server: Address, name: str, key: bytes
) -> Deferred[tuple[Address, float] | None]:
    """
    One signed gather from C{sock} to C{server}: the mapped address and the
    round trip of the first answer, or None by the deadline.
    """
    transaction_id, request = build_gather_request(name, key)
    started = reactor.seconds()
    timers: list[Any] = []

    def stop() -> None:
        for timer in timers:
            if timer.active():
                timer.cancel()
        sock.listener = None

    done: Deferred[tuple[Address, float] | None] = Deferred(lambda d: stop())

    def finish(result: tuple[Address, float] | None) -> None:
        stop()
        if not done.called:
            done.callback(result)

    def send() -> None:
        try:
            if sock.transport is not None:
                sock.transport.write(request, server)
        except OSError:
            finish(None)

    def received(datagram: bytes, source: Address) -> None:
        if source != server:
            return
        mapped = parse_gather_answer(datagram, key, transaction_id)
        if mapped is not None:
            finish((mapped, (reactor.seconds() - started) * 1000.0))

    sock.listener = received
    timers.extend(reactor.callLater(at, send) for at in GATHER_RESEND)
    timers.append(reactor.callLater(GATHER_DEADLINE, finish, None))
    return done


def gather_both(
    reactor: Any, server: Address, alternate_port: int, name: str, key: bytes
) -> Deferred[Gathered]:
    """
    From one fresh socket: a gather to C{server}, then (when there is an
    alternate port) one to its alternate port.  The socket is closed after.
    """
    sock = _Socket()
    interface = "::" if ":" in server[0] else "0.0.0.0"
    try:
        port = reactor.listenUDP(0, sock, interface=interface)
    except Exception as e:
        log.info("netcheck: no socket: {error}", error=str(e))
        return succeed(Gathered(None, None, None))

    def first(answer: tuple[Address, float] | None) -> Deferred[Gathered] | Gathered:
        if answer is None or not alternate_port:
            return Gathered(None if answer is None else answer[0], None, _rtt(answer))
        second = _gather_from(reactor, sock, (server[0], alternate_port), name, key)
        return second.addCallback(lambda other: Gathered(answer[0], _first(other), _rtt(answer)))

    def close(result: Gathered | Failure) -> Gathered | Failure:
        port.stopListening()  # cancelled too: the socket never outlives the check
        return result

    d: Deferred[Gathered] = _gather_from(reactor, sock, server, name, key).addCallback(first)
    return d.addBoth(close)


def _rtt(answer: tuple[Address, float] | None) -> float | None:
    return None if answer is None else round(answer[1], 1)


def _first(answer: tuple[Address, float] | None) -> Address | None:
    return None if answer is None else answer[0]


def resolve_ipv6(host: str, port: int) -> Deferred[Address | None]:
    """
    The rendezvous's IPv6 address when C{host} is a name that has one.
    """
    try:
        ipaddress.ip_address(host)
        return succeed(None)
    except ValueError:
        pass

    def lookup() -> Address | None:
        found = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM)
        return (str(found[0][4][0]), port) if found else None

    d: Deferred[Address | None] = deferToThread(lookup)
    return d.addErrback(lambda _: None)


def _local(address: str, addresses: Sequence[str]) -> bool:
    """Whether this host has C{address} (loopback counts: no NAT on it)."""
    return address in addresses or ipaddress.ip_address(address).is_loopback


def _global_ipv6(addresses: Sequence[str]) -> bool:
    return any(":" in a and ipaddress.IPv6Address(a.split("%")[0]).is_global for a in addresses)


class NetChecker:
    """
    The agent's netcheck: run on demand (L{check}) and again whenever the
    registration sees our mapped address move (L{moved}).  Checks asked for
    while one runs share its result.
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        key: bytes,
        *,
        resolve: Callable[[], Deferred[Address]],
        rendezvous_host: str,
        alternate_port: Callable[[], int],
        mapper: PortMapper | None,
        addresses: Callable[[], list[str]],
        over_tls: Callable[[], bool] = lambda: False,
    ) -> None:
        self._over_tls = over_tls
        self._reactor = reactor
        self._name = name
        self._key = key
        self._resolve = resolve
        self._host = rendezvous_host
        self._alternate_port = alternate_port
        self._mapper = mapper
        self._addresses = addresses
        self._waiters: list[Deferred[NetReport]] = []
        self.last: NetReport | None = None

    def moved(self, old: Address | None, new: Address) -> None:
        """
        The registration's mapped address changed (or was first learned):
        the network may be another one, so look again.
        """
        if old is not None:
            log.info(
                "netcheck: mapped address moved from {old} to {new}; checking again",
                old=format_address(old),
                new=format_address(new),
            )
        self.check()

    def check(self) -> Deferred[NetReport]:
        """
        A fresh report (never fails: what cannot be learned is None/False).
        """
        waiter: Deferred[NetReport] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._run().addCallback(self._done)
        return waiter

    def _done(self, report: NetReport) -> None:
        self.last = report
        log.info("netcheck: {summary}", summary=report.summary)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(report)

    def _run(self) -> Deferred[NetReport]:
        addresses = self._addresses()

        def gather(server: Address | None) -> Deferred[NetReport]:
            nothing = Gathered(None, None, None)
            main: Deferred[Gathered] = succeed(nothing)
            other: Deferred[Gathered] = succeed(nothing)
            if server is not None:
                port = self._alternate_port()
                main = gather_both(self._reactor, server, port, self._name, self._key)
                if ":" not in server[0] and _global_ipv6(addresses):
                    other = resolve_ipv6(self._host, server[1]).addCallback(self._gather_v6)

            def built(results: list[tuple[bool, Any]]) -> NetReport:
                first, second, ports = (value for _, value in results)
                report = _report([first, second], ports or [], addresses, self._reactor.seconds())
                return replace(report, over_tls=self._over_tls())

            waits: list[Deferred[Any]] = [main, other, self._offered(server)]
            return DeferredList(waits).addCallback(built)

        resolved: Deferred[Address | None] = self._resolve().addErrback(lambda _: None)
        return resolved.addCallback(gather)

    def _offered(self, server: Address | None) -> Deferred[list[str]]:
        """
        What the gateway offers; not asked when the rendezvous is on this
        host (loopback: no gateway in between, and nothing to ask outside).
        """
        if self._mapper is None or server is None:
            return succeed([])
        if ipaddress.ip_address(server[0].split("%")[0]).is_loopback:
            return succeed([])
        return self._mapper.offered()

    def _gather_v6(self, server: Address | None) -> Deferred[Gathered] | Gathered:
        if server is None:
            return Gathered(None, None, None)
        return gather_both(self._reactor, server, self._alternate_port(), self._name, self._key)


def _report(
    gathered: list[Gathered], ports: list[str], addresses: list[str], now: float
) -> NetReport:
    main, other = gathered
    found = [g for g in (main, other) if g.main is not None]
    ipv4 = next((g.main[0] for g in found if g.main and ":" not in g.main[0]), None)
    ipv6 = next((g.main[0] for g in found if g.main and ":" in g.main[0]), None)
    varies = None
    if main.main is not None and main.alternate is not None:
        varies = main.main != main.alternate
    public = ipv4 or ipv6
    return NetReport(
        udp=bool(found),
        ipv4=ipv4,
        ipv6=ipv6,
        mapping_varies_by_destination=varies,
        port_mapping=list(ports),
        rendezvous_rtt_ms=main.rtt_ms if main.rtt_ms is not None else other.rtt_ms,
        nat=None if public is None else not _local(public, addresses),
        checked_at=round(now, 3),
        local_addresses=list(addresses),
    )
