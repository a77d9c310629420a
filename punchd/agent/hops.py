"""
How far a datagram can go toward a peer without reaching the peer's NAT.

A NAT that accepts unsolicited datagrams on its WAN side lets the first one
from the peer claim the local host's mapping (docs/architecture.rst, "Two
open-input NATs").  A datagram whose TTL runs out on the last router before
the peer's NAT opens our own NAT toward the peer and never touches the
peer's: a primer.  L{trace} finds that router with a traceroute from a
throwaway socket: one datagram per TTL, each to its own port of the peer's
public address (so that each ICMP error names its TTL), the errors read
from the socket's error queue (C{IP_RECVERR}: no privileges needed).

The farthest router that says "time exceeded" is before the peer's NAT
whatever else happens: a datagram for the NAT's own address is delivered
there, never forwarded past it.  A silent or rate-limited router only
makes the primer die earlier.  The NAT's own answer ("port unreachable")
is not needed, which matters: a NAT limits those to about one a second
toward an address, and the peer's early checks may have spent it.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
import struct
from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

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
#: Having heard nothing new for this long past twice the latest answer,
#: nothing more is coming (the peer's NAT drops what it did not ask for).
QUIET = 0.05
#: The longest a trace may take.
DEADLINE = 0.5
#: The least a primer's TTL can be: hop 1 is our own NAT, which a datagram
#: must cross to make a mapping.
MIN_PRIMER_TTL = 2
#: What a send reports for an earlier datagram's ICMP error.
ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


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
    The TTL of a primer that dies at the router C{router} hops away, or
    None when that router is our own NAT (nothing routes between the two
    NATs) or none answered.
    """
    if router is None or router < MIN_PRIMER_TTL:
        return None
    return router


def trace(clock: IReactorTime, target: str) -> Deferred[int | None]:
    """
    How many hops away the farthest router toward C{target} (IPv4) that
    answered is, or None if none did.  Never fails; cancelling closes the
    socket.
    """
    try:
        if ipaddress.ip_address(target).version != 4:
            return succeed(None)
        return _Trace(clock, target).done
    except (ValueError, OSError) as e:
        log.debug("no trace toward {target}: {error}", target=target, error=str(e))
        return succeed(None)


def _send(sock: socket.socket, address: tuple[str, int]) -> None:
    """
    Send an empty datagram.  An ICMP error already in (with C{IP_RECVERR})
    fails the next send once, unsent: send again.
    """
    for _ in range(MAX_TTL + 1):
        try:
            sock.sendto(b"", address)
            return
        except OSError as e:
            if e.errno not in ICMP_ERRNOS:
                raise
    raise OSError(errno.EIO, "every send reported an earlier ICMP error")


class _Trace:
    """One traceroute; its socket lives exactly as long as it runs."""

    def __init__(self, clock: IReactorTime, target: str) -> None:
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
        self.base = random.randrange(20000, 65535 - MAX_TTL)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            for ttl in range(1, MAX_TTL + 1):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
                _send(sock, (target, self.base + ttl))
        except OSError:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self.poll = clock.callLater(POLL, self._read)

    def _read(self) -> None:
        assert self.sock is not None
        now = self.clock.seconds()
        while True:
            try:
                _, ancdata, _, address = self.sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    log.debug("trace error queue: {error}", error=str(e))
                break
            error = parse_icmp_error(ancdata)
            ttl = address[1] - self.base if isinstance(address, tuple) else 0
            if error is None or not 1 <= ttl <= MAX_TTL:
                continue
            self.last_heard = now - self.started
            if error[0] == ICMP_TIME_EXCEEDED and error[1] != self.target:
                self.routers.add(ttl)
            elif error[1] == self.target and (self.reached is None or ttl < self.reached):
                self.reached = ttl
        elapsed = now - self.started
        quiet = elapsed > 2 * self.last_heard + QUIET
        every_router = self.reached is not None and self.routers >= set(range(1, self.reached))
        if every_router or quiet or elapsed >= DEADLINE:
            self._close()
            routers = [ttl for ttl in self.routers if self.reached is None or ttl < self.reached]
            self.done.callback(max(routers, default=None))
        else:
            self.poll = self.clock.callLater(POLL, self._read)

    def _close(self) -> None:
        if self.poll.active():
            self.poll.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
