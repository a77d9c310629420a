"""
How far a datagram can go toward a peer without reaching the peer's NAT.

A NAT that accepts unsolicited datagrams on its WAN side lets the first one
from the peer claim the local host's mapping (docs/architecture.rst, "Two
open-input NATs").  A datagram whose TTL runs out on a router before the
peer's NAT opens our own NAT toward the peer and never touches the peer's:
a primer.  L{trace} finds such a router with a traceroute from a throwaway
socket: one datagram per TTL, each to its own port of the peer's public
address (so that each ICMP error names its TTL), the errors read from the
socket's error queue (C{IP_RECVERR}: no privileges needed).

A router that says "time exceeded" for a datagram to the NAT's own address
is before that NAT on the datagram's path: the NAT takes such a datagram
for itself, it never forwards it.  A silent or rate-limited router only
makes the primer die earlier.  The NAT's own answer ("port unreachable")
is not needed, which matters: a NAT sends about one a second toward an
address, and the peer's early checks may have spent it.  Routers that
spread flows over paths of different lengths could route the primer (its
own ports) differently: it dies a hop short of the farthest router when the
path is long enough for that (L{primer_ttl}).

The initiator names the address, so L{Tracer} traces only addresses that
can be a NAT's public one, off our own networks, a few at a time, and
remembers what it found for a while.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd.agent.tunnel_socket import TRANSIENT

log = Logger()

#: Linux's C{IP_RECVERR} (not in Python's socket module everywhere).
IP_RECVERR = 11
#: C{struct sock_extended_err}: errno, origin, type, code, pad, info, data.
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED = 11
#: Farther than any peer we would prime toward.
MAX_TTL = 20
#: How often the error queue is read.
POLL = 0.01
#: Silence for twice the latest answer's time plus this long, counted from
#: the start, means nothing more is coming (the peer's NAT drops what it
#: did not ask for).
QUIET = 0.05
#: The longest a trace may take.
DEADLINE = 0.5
#: The least a primer's TTL can be: hop 1 is our own NAT (or so we assume:
#: a router inside the LAN, or a carrier NAT of ours, only makes a primer
#: die before it opened anything), which a datagram must cross to make a
#: mapping.
MIN_PRIMER_TTL = 2
#: A primer dies a hop short of the farthest router when that still leaves
#: it this far out.
MARGIN_FROM = 3
#: Traces one agent runs at once; more introductions go without a primer.
MAX_TRACES = 4
#: How long, and for how many addresses, a trace's finding is kept.
REMEMBER = 60.0
MAX_REMEMBERED = 256
#: Addresses no NAT on the way to a peer has as its public one.
NOT_PUBLIC = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
ROUTES = Path("/proc/net/route")


class ErrorQueueSocket(Protocol):
    "What a trace needs of its socket."

    def setblocking(self, flag: bool, /) -> None: ...
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...
    def sendto(self, data: bytes, address: tuple[str, int], /) -> int: ...
    def recvmsg(
        self, size: int, ancsize: int, flags: int, /
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int, object]: ...
    def close(self) -> None: ...


def _udp_socket() -> ErrorQueueSocket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def parse_icmp_error(ancdata: Iterable[tuple[int, int, bytes]]) -> tuple[int, str] | None:
    """
    The ICMP type and the offender's address of one C{MSG_ERRQUEUE} read's
    control data, or None when it holds no ICMP error about IPv4.
    """
    for level, kind, data in ancdata:
        if level != socket.IPPROTO_IP or kind != IP_RECVERR:
            continue
        if len(data) < _EXTENDED_ERR.size + 8:
            continue
        _, origin, icmp_type, _, _, _, _ = _EXTENDED_ERR.unpack_from(data)
        (family,) = struct.unpack_from("=H", data, _EXTENDED_ERR.size)
        if origin != _ORIGIN_ICMP or family != socket.AF_INET:
            continue
        offset = _EXTENDED_ERR.size + 4
        return icmp_type, socket.inet_ntoa(data[offset : offset + 4])
    return None


def primer_ttl(router: int | None) -> int | None:
    """
    The TTL of a primer when the farthest router that answered is C{router}
    hops away: a hop short of it if that is still L{MARGIN_FROM} hops out,
    that router's otherwise, or None when that router is our own NAT
    (nothing routes between the two NATs) or none answered.
    """
    if router is None or router < MIN_PRIMER_TTL:
        return None
    return router - 1 if router - 1 >= MARGIN_FROM else router


def could_be_public(target: str) -> bool:
    """
    Whether C{target} can be the public IPv4 address of a NAT: not a
    private, shared, loopback, link-local, multicast or reserved one.
    """
    try:
        address = ipaddress.ip_address(target)
    except ValueError:
        return False
    return address.version == 4 and not any(address in net for net in NOT_PUBLIC)


def on_link(target: str, routes: Path = ROUTES) -> bool:
    """
    Whether C{target} is on a network of ours (a route without a gateway):
    no router between, nothing to learn, and a neighbour not to poke.
    Unknown routes count as on-link.
    """
    try:
        lines = routes.read_text().splitlines()[1:]
        address = int(ipaddress.IPv4Address(target))
    except (OSError, ValueError):
        return True
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, mask = (
                int.from_bytes(bytes.fromhex(fields[i]), "little") for i in (1, 2, 7)
            )
        except ValueError:
            continue
        if gateway == 0 and mask != 0 and address & mask == destination:
            return True
    return False


def trace(
    clock: IReactorTime,
    target: str,
    open_socket: Callable[[], ErrorQueueSocket] = _udp_socket,
    first_port: Callable[[], int] = lambda: random.randrange(20000, 65535 - MAX_TTL),
) -> Deferred[int | None]:
    """
    How many hops away the farthest router toward C{target} (IPv4) that
    answered is, or None if none did.  Never fails; cancelling closes the
    socket.
    """
    try:
        if ipaddress.ip_address(target).version != 4:
            return succeed(None)
        return _Trace(clock, target, open_socket(), first_port()).done
    except (ValueError, OSError) as e:
        log.debug("no trace toward {target}: {error}", target=target, error=str(e))
        return succeed(None)


class Tracer:
    """
    The agent's traces: only toward addresses worth one (L{could_be_public},
    not L{on_link}), L{MAX_TRACES} at once, each finding kept L{REMEMBER}
    seconds.  An address not traced reads as "no router" (no primer).
    """

    def __init__(
        self,
        clock: IReactorTime,
        start: Callable[[IReactorTime, str], Deferred[int | None]] = trace,
        on_link: Callable[[str], bool] = on_link,
    ) -> None:
        self._clock = clock
        self._start = start
        self._on_link = on_link
        self._running = 0
        self._found: dict[str, tuple[float, int | None]] = {}

    def __call__(self, target: str) -> Deferred[int | None]:
        if not could_be_public(target) or self._on_link(target):
            return succeed(None)
        found = self._found.get(target)
        if found is not None and self._clock.seconds() - found[0] < REMEMBER:
            return succeed(found[1])
        if self._running >= MAX_TRACES:
            log.debug("no trace toward {target}: {n} running", target=target, n=self._running)
            return succeed(None)
        self._running += 1
        started = self._clock.seconds()

        def done(result: int | Failure | None) -> int | Failure | None:
            self._running -= 1
            if not isinstance(result, Failure):
                self._remember(target, result)
                log.debug(
                    "traced {target}: farthest router {router}, {ms:.0f} ms",
                    target=target,
                    router=result,
                    ms=(self._clock.seconds() - started) * 1000,
                )
            return result

        return self._start(self._clock, target).addBoth(done)

    def _remember(self, target: str, router: int | None) -> None:
        self._found.pop(target, None)
        self._found[target] = (self._clock.seconds(), router)
        while len(self._found) > MAX_REMEMBERED:
            del self._found[next(iter(self._found))]


def _send(sock: ErrorQueueSocket, address: tuple[str, int]) -> None:
    """
    Send an empty datagram.  An ICMP error already in (with C{IP_RECVERR})
    fails the next send once, unsent: send again.
    """
    for _ in range(MAX_TTL + 1):
        try:
            sock.sendto(b"", address)
            return
        except OSError as e:
            if e.errno not in TRANSIENT:
                raise
    raise OSError(errno.EIO, "every send reported an earlier ICMP error")


class _Trace:
    """One traceroute; its socket lives exactly as long as it runs."""

    def __init__(self, clock: IReactorTime, target: str, sock: ErrorQueueSocket, base: int) -> None:
        self.clock = clock
        self.target = target
        self.done: Deferred[int | None] = Deferred(lambda _: self._close())
        self.started = clock.seconds()
        self.last_heard = 0.0
        #: TTLs whose datagram a router dropped, saying so.
        self.routers: set[int] = set()
        #: The least TTL that reached the target itself.
        self.reached: int | None = None
        # Ports base+1 .. base+MAX_TTL name the TTLs.
        self.base = base
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            for ttl in range(1, MAX_TTL + 1):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
                _send(sock, (target, base + ttl))
        except OSError:
            sock.close()
            raise
        self.sock: ErrorQueueSocket | None = sock
        self.poll: IDelayedCall = clock.callLater(POLL, self._read)

    def _read(self) -> None:
        """
        Take in what the error queue holds; end the trace when nothing more
        is worth waiting for, or else look again later.
        """
        try:
            self._drain()
            elapsed = self.clock.seconds() - self.started
            quiet = elapsed > 2 * self.last_heard + QUIET
            every_router = self.reached is not None and self.routers >= set(range(1, self.reached))
            if not (every_router or quiet or elapsed >= DEADLINE):
                self.poll = self.clock.callLater(POLL, self._read)
                return
            before = [ttl for ttl in self.routers if self.reached is None or ttl < self.reached]
            result = max(before, default=None)
        except Exception:
            log.failure("trace toward {target} failed", target=self.target)
            result = None
        self._close()
        self.done.callback(result)

    def _drain(self) -> None:
        assert self.sock is not None
        while True:
            try:
                _, ancdata, _, address = self.sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    log.debug("trace error queue: {error}", error=str(e))
                return
            error = parse_icmp_error(ancdata)
            port = address[1] if isinstance(address, tuple) and len(address) >= 2 else 0
            ttl = port - self.base if isinstance(port, int) else 0
            if error is None or not 1 <= ttl <= MAX_TTL:
                continue
            self.last_heard = self.clock.seconds() - self.started
            if error[0] == ICMP_TIME_EXCEEDED and error[1] != self.target:
                self.routers.add(ttl)
            elif error[1] == self.target and (self.reached is None or ttl < self.reached):
                self.reached = ttl

    def _close(self) -> None:
        "Stop looking and close the socket (the end, or a cancel)."
        if self.poll.active():
            self.poll.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
