"""
One request to the gateway over UDP, retransmitted, until an acceptable
answer or a deadline: the thin Twisted glue under the PCP, NAT-PMP and SSDP
codecs.

Each exchange has a socket of its own, bound to the local address that
routes to the gateway, and closes it when it ends, however it ends.  Only
datagrams from the gateway's address and port are looked at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol

T = TypeVar("T")

#: When the request goes out, in seconds from the start (RFC 6887 starts at 250 ms).
RESEND = (0.0, 0.25, 0.5)
DEADLINE = 0.9


class _Exchange(DatagramProtocol, Generic[T]):
    noisy = False

    def __init__(
        self,
        reactor: Any,
        server: tuple[str, int],
        request: bytes,
        accept: Callable[[bytes], T | None],
        resend: Sequence[float],
        deadline: float,
    ) -> None:
        self._reactor = reactor
        self._server = server
        self._request = request
        self._accept = accept
        self.done: Deferred[T | None] = Deferred(lambda d: self._finish(None))
        self._timers: list[IDelayedCall] = [reactor.callLater(at, self._send) for at in resend] + [
            reactor.callLater(deadline, self._finish, None)
        ]

    def _send(self) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(self._request, self._server)
        except OSError:
            self._finish(None)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if (addr[0], addr[1]) != self._server:
            return
        try:
            answer = self._accept(datagram)
        except Exception:
            answer = None
        if answer is not None:
            self._finish(answer)

    def connectionRefused(self) -> None:
        # Connected sockets only; ours is not, but an ICMP error means "no".
        self._finish(None)

    def _finish(self, answer: T | None) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        if self.transport is not None:
            self.transport.stopListening()
        if not self.done.called:
            self.done.callback(answer)


def ask(
    reactor: Any,
    local: str,
    server: tuple[str, int],
    request: bytes,
    accept: Callable[[bytes], T | None],
    *,
    resend: Sequence[float] = RESEND,
    deadline: float = DEADLINE,
) -> Deferred[T | None]:
    """
    Send C{request} to C{server} from a fresh socket on C{local} at the
    times in C{resend}; the first answer C{accept} turns into something, or
    None at C{deadline} (or if the socket cannot be had).  Never fails;
    cancelling it gives None and closes the socket.
    """
    exchange: _Exchange[T] = _Exchange(reactor, server, request, accept, resend, deadline)
    try:
        reactor.listenUDP(0, exchange, interface=local)
    except Exception:
        exchange._finish(None)
    return exchange.done
