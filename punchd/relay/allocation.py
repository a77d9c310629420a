"""
One relayed tunnel: two relay ports, one per side, each forwarding what
its side's bound address sends to the other side's bound address.

Once both sides are bound, the fast path (L{punchd.relay.shortcut}) reads
the bound addresses' datagrams on sockets of their own.  Until then, and
wherever the fast path is unavailable, a relay port forwards a datagram
from its bound address that does not start like a bind at once from the
peer's socket; everything else takes the slow path through the service
(binds, drops and their counters).
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol

from punchd.relay.messages import BIND_TYPE

__all__ = ["Allocation", "RelayPort", "StreamSide", "TokenBucket"]

Address = tuple[str, int]
#: The smallest burst: one full-size Ethernet datagram always fits.
MIN_BURST = 1500.0


class TokenBucket:
    """
    C{rate} bytes per second, in bursts of up to one second's worth.
    """

    def __init__(self, rate: float, now: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(rate, MIN_BURST)
        self._now = now
        self._tokens = self.burst
        self._stamp = now()

    def take(self, size: int) -> bool:
        now = self._now()
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens < size:
            self._tokens = tokens
            return False
        self._tokens = tokens - size
        return True


class SlowPath(Protocol):
    """
    What a relay port hands the datagrams it does not forward at once.
    """

    counters: Counter[str]

    def received(self, port: RelayPort, data: bytes, source: Address) -> None: ...


class StreamSide(Protocol):
    """
    An agent's TLS stream, as the relay sees it: a side bound by it gets
    the datagrams for it as frames (L{punchd.rendezvous.stream}).
    """

    #: The stream's TCP peer address: the side's bound address.
    address: Address

    def send_relayed(self, port: int, datagram: bytes) -> None: ...

    def accepted(self, name: str) -> None: ...


class Stoppable(Protocol):
    """
    What an allocation stops when it is freed (its fast path).
    """

    def stop(self) -> None: ...


class RelayPort(DatagramProtocol):
    """
    One side's relay port.  C{bound} is the address that side's agent bound
    (None before); C{peer} is the other side's port.
    """

    noisy = False

    def __init__(self, allocation: Allocation, side: int, name: str, slow: SlowPath) -> None:
        self.allocation = allocation
        self.side = side
        self.name = name
        self.port = 0
        self.bound: Address | None = None
        self.peer: RelayPort | None = None
        #: The TLS stream that bound this side, if one did.
        self.stream: StreamSide | None = None
        self.listening: IListeningPort | None = None
        self._slow = slow
        self.counters = slow.counters
        #: The port's socket, when the transport is a real one.
        self.socket: socket.socket | None = None
        self.send: Callable[[bytes, Address], Any] = self._write

    def startProtocol(self) -> None:
        # The socket itself: the transport's address checks would cost as
        # much as the system call on every forwarded datagram.
        sock = getattr(self.transport, "socket", None)
        if isinstance(sock, socket.socket):
            self.socket = sock
            self.send = sock.sendto

    def _write(self, data: bytes, address: Address) -> None:
        assert self.transport is not None
        self.transport.write(data, address)  # type: ignore[attr-defined]

    def bind_stream(self, stream: StreamSide) -> None:
        """
        This side was bound by C{stream}: what it gets goes there, framed.
        """
        self.stream = stream
        self.send = self._to_stream

    def _to_stream(self, data: bytes, address: Address) -> None:
        assert self.stream is not None
        self.stream.send_relayed(self.port, data)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        # A UDP datagram never comes from a side a stream bound, whatever its address.
        if addr == self.bound and data[:2] != BIND_TYPE and self.stream is None:
            self.forward(data)
        else:
            self._slow.received(self, data, addr)

    def forward(self, data: bytes) -> None:
        """
        Send C{data}, which came from this side's bound address, on to the
        other side's bound address from the other side's port.
        """
        peer = self.peer
        assert peer is not None  # ports come in pairs
        target = peer.bound
        counters = self.counters
        if target is None:
            counters["dropped-peer-unbound"] += 1
            return
        allocation = self.allocation
        allocation.active = True
        if allocation.bucket is not None and not allocation.bucket.take(len(data)):
            counters["dropped-rate"] += 1
            return
        try:
            peer.send(data, target)
        except OSError as e:
            # A full send buffer: UDP may drop, the ends retransmit.
            counters[f"send-error-{e.errno}"] += 1
            return
        counters["forwarded"] += 1
        counters["forwarded-bytes"] += len(data)


class Allocation:
    """
    The two ports of one relayed tunnel and what its timers need to know.
    """

    def __init__(
        self,
        tunnel_id: bytes,
        initiator: str,
        responder: str,
        slow: SlowPath,
        created: float,
        bucket: TokenBucket | None,
    ) -> None:
        self.tunnel_id = tunnel_id
        self.sides = (
            RelayPort(self, 0, initiator, slow),
            RelayPort(self, 1, responder, slow),
        )
        self.sides[0].peer, self.sides[1].peer = self.sides[1], self.sides[0]
        self.created = created
        self.last_active = created
        #: Set by every forwarded datagram, cleared by the idle sweep.
        self.active = False
        self.bucket = bucket
        self.freed = False
        #: The fast path's sockets, once both sides are bound.
        self.shortcuts: list[Stoppable] = []

    @property
    def names(self) -> tuple[str, str]:
        return (self.sides[0].name, self.sides[1].name)

    @property
    def ports(self) -> tuple[int, int]:
        return (self.sides[0].port, self.sides[1].port)

    @property
    def forwarding(self) -> bool:
        return all(side.bound is not None for side in self.sides)

    def close(self) -> None:
        """
        Stop both ports; a datagram still read in the same reactor turn
        finds no bound address and is dropped.
        """
        self.freed = True
        for shortcut in self.shortcuts:
            shortcut.stop()
        self.shortcuts = []
        for side in self.sides:
            side.bound = None
            side.stream = None
            listening, side.listening = side.listening, None
            if listening is not None:
                listening.stopListening()
