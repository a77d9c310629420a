"""
Agents' TLS streams, where UDP is blocked (docs/protocol.rst, "TLS").

Each frame (L{punchd.framing}) is what a UDP datagram would have been: a
STUN message goes to the rendezvous as from the stream's TCP peer address,
a relayed datagram to the relay as to the relay port it names; whatever
either sends back to that address comes back on the stream.

Anyone can connect, so nothing here waits on a peer without a deadline or
holds more than a bounded amount for it: a connection must finish its
handshake and send an accepted agent request (or relay bind) within
C{auth_timeout}, and complete a frame at least every C{idle_timeout};
connections are capped per source and in all; at most one frame is held
while it arrives (L{Deframer}); anything that is not a frame of ours closes
the connection.  When the transport's send buffer is full, relayed
datagrams towards the stream are dropped (as a full UDP buffer drops them)
and the stream is not read until it drains, so that replies to what the
peer keeps sending cannot pile up either.
"""

from __future__ import annotations

import errno
import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from punchd import wire
from punchd.framing import MAX_FRAME, Deframer, FrameError, Signalling, parse_frame, stun_frame
from punchd.framing import relayed_frame as _relayed_frame
from punchd.rendezvous.limits import SourceLimiter

if TYPE_CHECKING:
    from punchd.relay import RelayService
    from punchd.rendezvous.server import RendezvousProtocol

__all__ = ["StreamFactory", "StreamLimits", "StreamProtocol", "TLSStreamFactory", "source_key"]

log = Logger()

Address = tuple[str, int]
#: The largest STUN message a stream may carry: what the UDP port reads.
MAX_SIGNALLING = 2048
#: The largest datagram a relayed frame holds (its header is 3 bytes).
MAX_RELAYED = MAX_FRAME - 3
#: Bytes of signalling a backed-up stream may be sent before it is closed.
MAX_BACKLOG = 64 * 1024
#: New connections per second from one source, in bursts of twice that: a
#: handshake costs the server far more than the client.
CONNECT_RATE = 4.0


@dataclass(frozen=True)
class StreamLimits:
    """
    The TLS port's settings (C{tls_*} in rendezvous.toml).
    """

    auth_timeout: float = 10.0
    idle_timeout: float = 120.0
    max_per_source: int = 16
    max_connections: int = 1024
    #: Connections yet to authenticate, at most: past it the oldest of them
    #: makes room, so that strangers cannot crowd agents out (a quarter of
    #: C{max_connections} unless told).
    max_strangers: int | None = None

    @property
    def strangers(self) -> int:
        if self.max_strangers is not None:
            return self.max_strangers
        return max(1, self.max_connections // 4)


def source_key(host: str) -> str:
    """
    What the per-source cap counts by: the IPv4 address, or the IPv6 /64
    (one subscriber's share, which holds more addresses than anyone needs).
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address)
    return str(ip)


@implementer(IPushProducer)
class StreamProtocol(Protocol):
    """
    One agent's TLS connection (the TLS layer below it is Twisted's).

    @ivar address: the TCP peer address, which stands for the agent's UDP
        source address everywhere in the rendezvous and the relay.
    @ivar names: agents whose accepted requests came on this stream.
    """

    def __init__(self, factory: StreamFactory, address: Address, source: str) -> None:
        self.streams = factory
        self.address = address
        self.source = source
        self.names: set[str] = set()
        self.authenticated = False
        self._deframer = Deframer(MAX_FRAME)
        self._counters = factory.rendezvous.counters
        self._paused = False
        #: Bytes of signalling written while backed up.
        self._backlog = 0
        self._closing = False
        self._aborted = False
        self._last = 0.0
        self._deadline: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        streams = self.streams
        clock, limits = streams.clock, streams.limits
        self._last = clock.seconds()
        self._deadline = clock.callLater(limits.auth_timeout, self._timed_out, "auth-timeout")
        self._idle = clock.callLater(limits.idle_timeout, self._idle_check)
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        if ITCPTransport.providedBy(self.transport):
            try:
                # A peer that vanished (no FIN) is found even with no frame due.
                self.transport.setTcpKeepAlive(True)
                # Datagrams are not held back for a full segment: TLS already
                # batches what one reactor turn writes.
                self.transport.setTcpNoDelay(True)
            except OSError:
                pass
        streams.rendezvous.attach_stream(self.address, self)

    # -- frames in ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            payloads = self._deframer.feed(data)
            if payloads:
                self._last = self.streams.clock.seconds()
            for payload in payloads:
                self._frame(payload)
                if self._closing:
                    return
        except FrameError:
            self._close("frame-error")

    def _frame(self, payload: bytes) -> None:
        frame = parse_frame(payload)
        if isinstance(frame, Signalling):
            if len(payload) > MAX_SIGNALLING:
                self._counters["tls-dropped-oversize"] += 1
                return
            # Counts and logs its own errors: nothing escapes it.
            rendezvous = self.streams.rendezvous
            rendezvous.via = self
            try:
                rendezvous.datagramReceived(payload, self.address)
            finally:
                rendezvous.via = None
            return
        relay = self.streams.relay
        if relay is None:
            self._counters["tls-dropped-no-relay"] += 1
            return
        try:
            relay.stream_received(self, frame.port, frame.datagram)
        except Exception:
            self._counters["internal-error"] += 1
            log.failure("unexpected error relaying from {source}", source=self.address[0])

    # -- what the rendezvous and the relay send ---------------------------

    def accepted(self, name: str) -> None:
        """
        An accepted request of agent C{name} (or its relay bind) came on
        this stream: the authentication deadline is met.
        """
        self.names.add(name)
        if not self.authenticated:
            self.authenticated = True
            self.streams.authenticated(self)
            self._counters["tls-authenticated"] += 1
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def send_signalling(self, message: bytes) -> None:
        """
        A STUN message for the agent.  While the stream is backed up, its
        own answers are bounded (it is not read), but introductions from
        other agents are not: past L{MAX_BACKLOG} bytes written since it
        backed up, the connection is closed (its agent registers again).
        """
        if self._closing or self.transport is None:
            return
        frame = stun_frame(message)
        if self._paused:
            self._backlog += len(frame)
            if self._backlog > MAX_BACKLOG:
                self._close("backed-up")
                return
        self.transport.write(frame)

    def send_relayed(self, port: int, datagram: bytes) -> None:
        """
        A datagram from the relay port C{port}; C{OSError} (ENOBUFS) when the
        transport is backed up, as a full UDP send buffer would say.
        """
        if self._paused or self._closing or self.transport is None:
            raise OSError(errno.ENOBUFS, "TLS stream backed up")
        if len(datagram) > MAX_RELAYED:
            raise OSError(errno.EMSGSIZE, "datagram too large for a frame")
        self.transport.write(_relayed_frame(port, datagram))

    # -- IPushProducer: the transport's send buffer ------------------------

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._counters["tls-backed-up"] += 1
            cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._backlog = 0
            if not self._closing:
                cast(IPushProducer, self.transport).resumeProducing()

    def stopProducing(self) -> None:
        self._closing = True

    # -- deadlines and closing -------------------------------------------------

    def _idle_check(self) -> None:
        clock = self.streams.clock
        left = self._last + self.streams.limits.idle_timeout - clock.seconds()
        if left > 0:
            self._idle = clock.callLater(left, self._idle_check)
        else:
            self._idle = None
            self._timed_out("idle")

    def _timed_out(self, why: str) -> None:
        if why == "auth-timeout":
            self._deadline = None
        self._close(why)

    def _close(self, why: str) -> None:
        """
        Drop the connection now (no waiting for a peer that may not read).
        """
        if self._aborted:
            return
        self._closing = self._aborted = True
        self._counters[f"tls-closed-{why}"] += 1
        log.debug(
            "TLS connection from {address} closed: {why}",
            address=wire.format_address(self.address),
            why=why,
        )
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def abort(self) -> None:
        self._close("stopped")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._aborted:
            # Every connection ends in exactly one tls-closed-REASON count.
            self._counters[
                "tls-closed-tls-error" if reason.check(SSL.Error) else "tls-closed-peer"
            ] += 1
        self._closing = True
        for call in (self._deadline, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._idle = None
        self.streams.closed(self)


class StreamFactory(Factory):
    """
    Makes the TLS port's streams, within the connection caps, and tells the
    rendezvous and the relay when one goes.
    """

    noisy = False

    def __init__(
        self,
        rendezvous: RendezvousProtocol,
        clock: IReactorTime,
        limits: StreamLimits,
        relay: RelayService | None = None,
    ) -> None:
        self.rendezvous = rendezvous
        self.clock = clock
        self.limits = limits
        self.relay = relay
        self.open: set[StreamProtocol] = set()
        self._per_source: Counter[str] = Counter()
        #: Connections yet to authenticate, oldest first: a quarter of the
        #: cap at most, so that strangers cannot crowd agents out.
        self._strangers: dict[StreamProtocol, None] = {}
        self._attempts = SourceLimiter(CONNECT_RATE, 2 * CONNECT_RATE, clock.seconds)

    def buildProtocol(self, addr: IAddress | None) -> StreamProtocol | None:
        counters = self.rendezvous.counters
        host, port = getattr(addr, "host", ""), getattr(addr, "port", 0)
        key = source_key(host)
        if not self._attempts.allow(key):
            counters["tls-refused-rate"] += 1
            return None
        if len(self._strangers) >= self.limits.strangers:
            # The oldest connection that has not authenticated makes room.
            oldest = next(iter(self._strangers))
            del self._strangers[oldest]
            oldest._close("crowded-out")
        if len(self.open) >= self.limits.max_connections:
            counters["tls-refused-full"] += 1
            return None
        if self._per_source[key] >= self.limits.max_per_source:
            counters["tls-refused-per-source"] += 1
            return None
        counters["tls-accepted"] += 1
        stream = StreamProtocol(self, (host, port), key)
        self.open.add(stream)
        self._strangers[stream] = None
        self._per_source[key] += 1
        return stream

    def authenticated(self, stream: StreamProtocol) -> None:
        self._strangers.pop(stream, None)

    def closed(self, stream: StreamProtocol) -> None:
        self._strangers.pop(stream, None)
        if stream not in self.open:
            return
        self.open.discard(stream)
        self._per_source[stream.source] -= 1
        if self._per_source[stream.source] <= 0:
            del self._per_source[stream.source]
        self.rendezvous.detach_stream(stream)
        if self.relay is not None:
            self.relay.stream_closed(stream)

    def close_all(self) -> None:
        for stream in list(self.open):
            stream.abort()


class TLSStreamFactory(TLSMemoryBIOFactory):
    """
    TLS around L{StreamFactory}, refusing (closing at once, before any
    handshake) a connection over the caps: Twisted's wrapper would wrap the
    None that means so.
    """

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        wrapped: Any = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        protocol: TLSMemoryBIOProtocol = self.protocol(self, wrapped)
        return protocol
