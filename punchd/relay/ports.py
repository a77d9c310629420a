"""
Opening relay ports: a random free port of the configured range, tried
again elsewhere when the system has it in use, a bounded number of times.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol

__all__ = ["ATTEMPTS", "NoPort", "PortOpener", "open_in_range", "udp_opener"]

#: Ports tried for one relay port before the allocation is refused.
ATTEMPTS = 32
#: Relayed datagrams cross unchanged, so the largest UDP payload is read whole.
MAX_DATAGRAM = 65535

#: Listens on a port with a protocol, or raises CannotListenError.
PortOpener = Callable[[int, DatagramProtocol], IListeningPort]


class NoPort(Exception):
    """
    No port of the range could be opened.
    """


def udp_opener(reactor: object, interface: str) -> PortOpener:
    """
    Listen with the reactor on C{interface} ("" = all IPv4 interfaces).
    """

    def open_port(port: int, protocol: DatagramProtocol) -> IListeningPort:
        listen = reactor.listenUDP  # type: ignore[attr-defined]
        result: IListeningPort = listen(
            port, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM
        )
        return result

    return open_port


def open_in_range(
    opener: PortOpener,
    protocol: DatagramProtocol,
    low: int,
    high: int,
    in_use: Container[int],
    choose: Callable[[int, int], int] = random.randint,
) -> tuple[int, IListeningPort]:
    """
    (port, listening port) for C{protocol} on a port of C{low}-C{high} that
    is not C{in_use} by the relay already: from a random start, the next
    one the system grants.  L{NoPort} when all are ours or taken, or after
    L{ATTEMPTS} ports that the system refused (in use by someone else).
    """
    size = high - low + 1
    start = choose(low, high) - low
    refused = 0
    for i in range(size):
        port = low + (start + i) % size
        if port in in_use:
            continue
        try:
            return port, opener(port, protocol)
        except CannotListenError:
            refused += 1
            if refused >= ATTEMPTS:
                break
    raise NoPort(f"no free UDP port in {low}-{high} ({refused} refused by the system)")
