"""
The tunnel's own UDP socket, read so that the program's data is never eaten.

Twisted's UDP port reads every datagram it can; near the hand-off we must
instead look at a datagram first (MSG_PEEK) and leave it queued when it is
the peer program's first words, so that it reaches our program intact.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

MAX_DATAGRAM = 2048
READS_PER_CALL = 64
#: A receive buffer's worth of datagrams, and then some.
MAX_DRAIN = 65536
#: Errors a UDP socket reports once for an earlier send's ICMP answer.
TRANSIENT = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


class TunnelSocket:
    """
    A non-blocking datagram socket registered with the reactor as a reader.

    C{keep(data, source)} says whether a datagram must stay queued for the
    program (it is only asked while C{peeking}); C{received(data, source)}
    gets every datagram the agent consumes.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        received: Callable[[bytes, tuple[str, int]], None],
        keep: Callable[[bytes, tuple[str, int]], bool],
        bind: tuple[str, int] | None = None,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> None:
        self._reactor = reactor
        self._received = received
        self._keep = keep
        self.peeking = False
        self.family = family
        self.sock: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            if family == socket.AF_INET6:
                # IPv4 has its own socket: keep this one to IPv6 proper.
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.bind(bind or (("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)))
        except OSError:
            self.sock.close()
            raise
        self.local = self.sock.getsockname()[:2]
        self._reading = False

    # IReadDescriptor
    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def logPrefix(self) -> str:
        return "TunnelSocket"

    def connectionLost(self, reason: Failure) -> None:
        self.stop_reading()

    def doRead(self) -> None:
        for _ in range(READS_PER_CALL):
            if self.sock is None or not self._reading:
                return
            try:
                if self.peeking:
                    data, source = self.sock.recvfrom(MAX_DATAGRAM, socket.MSG_PEEK)
                    if self._keep(data, source[:2]):
                        self.stop_reading()
                        return
                data, source = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in TRANSIENT:
                    continue
                log.debug("tunnel socket read failed: {error}", error=e)
                return
            self._received(data, source[:2])

    def start_reading(self) -> None:
        if self.sock is not None and not self._reading:
            self._reading = True
            self._reactor.addReader(self)  # type: ignore[arg-type]

    def stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)  # type: ignore[arg-type]

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(data, address)
        except OSError as e:
            log.debug("tunnel send to {address} failed: {error}", address=address, error=e)

    def send_primer(self, data: bytes, address: tuple[str, int], ttl: int) -> None:
        """
        Send with C{ttl} (L{punchd.agent.hops}), for this datagram only: the
        TTL rides along as ancillary data, the socket keeps its own.
        """
        if self.sock is None:
            return
        ancillary = [(socket.IPPROTO_IP, socket.IP_TTL, struct.pack("i", ttl))]
        try:
            self.sock.sendmsg([data], ancillary, 0, address)
        except OSError as e:
            log.debug("primer to {address} failed: {error}", address=address, error=e)

    def connect(self, remote: tuple[str, int]) -> None:
        """
        From now on the kernel delivers only C{remote}'s datagrams here.
        Whatever came from elsewhere arrived before this moment, so it sits
        ahead of anything the peer's program will send, and reading consumes
        it first.
        """
        assert self.sock is not None
        self.sock.connect(remote)

    def release(
        self, remote: tuple[str, int], ours: Callable[[bytes, tuple[str, int]], bool]
    ) -> socket.socket:
        """
        Stop reading, consume what is still queued for the agent (its own
        stragglers, and anything from elsewhere that arrived before
        L{connect}), and give the socket away: the caller owns it from now
        on.  The first datagram of the peer's program stays queued.
        """
        self.stop_reading()
        sock = self.sock
        assert sock is not None
        self.sock = None
        for _ in range(MAX_DRAIN):
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM, socket.MSG_PEEK)
            except OSError as e:
                if e.errno in TRANSIENT:  # an ICMP error, reported once
                    continue
                break  # EAGAIN: nothing left
            if source[:2] == remote and not ours(data, source[:2]):
                break
            try:
                sock.recv(MAX_DATAGRAM)
            except OSError:
                break
        return sock

    def close(self) -> None:
        self.stop_reading()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __repr__(self) -> str:
        return f"<TunnelSocket {self.local!r}>"
