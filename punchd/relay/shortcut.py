"""
The forwarding fast path: once both sides of an allocation are bound, each
relay port gets a second socket on the same port, connected to its bound
address, and what it reads goes out unchanged from the other side's.

The kernel does the filtering: a connected UDP socket gets exactly the
datagrams of its 4-tuple, and everything else (strangers, binds from
elsewhere) still reaches the relay port's own socket and the slow path
that counts it.
Reads are batched in one loop per readiness event with plain C{recv} and
C{send} (no address to parse or build), counters are added once per batch,
and idleness is one flag per batch that the once-a-second sweep clears.
A system without SO_REUSEPORT, or any socket error while setting up, keeps
the allocation on the slow path, which forwards the same datagrams.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger
from twisted.python.failure import Failure

from punchd.relay.messages import BIND_TYPE
from punchd.relay.ports import MAX_DATAGRAM

if TYPE_CHECKING:
    from punchd.relay.allocation import Address, Allocation, RelayPort

__all__ = ["BATCH", "Shortcut", "open_shortcuts"]

log = Logger()

#: Datagrams read per readiness event at most, so that other sockets get
#: their turn under load.
BATCH = 256


def connected_socket(listening: socket.socket, remote: Address) -> socket.socket:
    """
    A non-blocking socket on C{listening}'s address, connected to C{remote}.

    The two share the port only while the second binds: SO_REUSEPORT is
    set on both for the bind and cleared right after, so no other socket
    (of this user: the kernel allows no other) can join the port later.
    The kernel still gives each datagram to the best match, the connected
    socket for its 4-tuple's.
    """
    sock = socket.socket(listening.family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if listening.family == socket.AF_INET6:
            v6only = listening.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        _share(listening, sock, True)
        try:
            sock.bind(listening.getsockname())
        finally:
            _share(listening, sock, False)
        sock.connect(remote)
    except OSError:
        sock.close()
        raise
    return sock


def _share(listening: socket.socket, sock: socket.socket, on: bool) -> None:
    option = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        raise OSError(errno.ENOPROTOOPT, "no SO_REUSEPORT")
    for s in (listening, sock):
        s.setsockopt(socket.SOL_SOCKET, option, int(on))


def open_shortcuts(allocation: Allocation, reactor: IReactorFDSet) -> list[Shortcut]:
    """
    Both sides' shortcuts, reading; none when the system cannot have them.
    """
    sockets: list[socket.socket] = []
    try:
        for side in allocation.sides:
            if side.socket is None or side.bound is None:
                return []
            sockets.append(connected_socket(side.socket, side.bound))
    except OSError as e:
        for sock in sockets:
            sock.close()
        allocation.sides[0].counters["shortcut-unavailable"] += 1
        log.info("relay fast path unavailable, forwarding the slow way: {error}", error=e)
        return []
    ours, theirs = (Shortcut(side, sock, reactor) for side, sock in zip(allocation.sides, sockets))
    ours.send, theirs.send = theirs.sock.send, ours.sock.send
    for shortcut in (ours, theirs):
        shortcut.start()
    return [ours, theirs]


class Shortcut:
    """
    One side's connected socket: reads what that side's bound address sends
    to its relay port and sends it from the other side's connected socket.
    """

    def __init__(self, port: RelayPort, sock: socket.socket, reactor: IReactorFDSet) -> None:
        assert port.bound is not None
        self.port = port
        self.remote: Address = port.bound
        self.sock = sock
        self.send = sock.send  # the other side's, once both exist
        self._reactor = reactor
        self._fileno = sock.fileno()
        self.stopped = False

    def start(self) -> None:
        """
        Take over what arrived before the connect: anything may have, from
        anyone, between the bind and the connect, so it takes the slow path.
        """
        while True:
            try:
                data, source = self.sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                break
            self.port.datagramReceived(data, source[:2])
        self._reactor.addReader(self)  # type: ignore[arg-type]

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._reactor.removeReader(self)  # type: ignore[arg-type]
            self.sock.close()

    # IReadDescriptor

    def fileno(self) -> int:
        return -1 if self.stopped else self._fileno

    def logPrefix(self) -> str:
        return "RelayShortcut"

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor gives up on a socket with a pending error (an ICMP
        unreachable for a datagram this socket sent): clear it and go on.
        """
        if self.stopped:
            return
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:  # otherwise the reactor is shutting down
            self.port.counters[f"send-error-{code}"] += 1
            self._reactor.addReader(self)  # type: ignore[arg-type]

    def doRead(self) -> None:
        recv, send, port = self.sock.recv, self.send, self.port
        bucket = port.allocation.bucket
        forwarded = size = 0
        for _ in range(BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as e:  # an ICMP error for a datagram sent earlier
                self._error(e)
                continue
            if data[:2] == BIND_TYPE:
                port.datagramReceived(data, self.remote)
                if self.stopped:  # a release
                    break
            elif bucket is not None and not bucket.take(len(data)):
                port.counters["dropped-rate"] += 1
                port.allocation.active = True
            else:
                try:
                    send(data)
                except OSError as e:  # a full buffer: UDP may drop, the ends retransmit
                    self._error(e)
                    continue
                forwarded += 1
                size += len(data)
        if forwarded:
            counters = port.counters
            counters["forwarded"] += forwarded
            counters["forwarded-bytes"] += size
            port.allocation.active = True

    def _error(self, e: OSError) -> None:
        self.port.counters[f"send-error-{e.errno or errno.EIO}"] += 1
