"""
The agent's TLS connection to the rendezvous, for networks that let no UDP
out (docs/protocol.rst, "TLS").

The same signed STUN messages the agent sends over UDP travel here as RFC
4571 frames (L{punchd.framing}); relayed datagrams of tunnels that go
through the relay over TLS travel as frames of their own, one channel per
relay port.  The certificate and host name are checked with
service-identity (Twisted's C{optionsForClientTLS}) against the system's CA
store or the private CA of C{rendezvous_ca}.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from punchd.framing import Deframer, FrameError, Relayed, parse_frame, relayed_frame, stun_frame

__all__ = ["RendezvousStream", "StreamRefused", "connect_stream", "trust_root"]

log = Logger()

#: Seconds for TCP and the TLS handshake together.
CONNECT_TIMEOUT = 10.0


class StreamRefused(Exception):
    """
    No TLS connection to the rendezvous; C{str()} says why, in words.
    """


def trust_root(ca: str) -> Any:
    """
    The CAs a rendezvous certificate must chain to: the system's store, or
    every certificate in the PEM file C{ca}.
    """
    if not ca:
        return ssl.platformTrust()
    pem = Path(ca).read_bytes()
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN" in block]
    if not blocks:
        raise ValueError(f"{ca} holds no PEM certificate")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


def explain(reason: Failure, where: str) -> str:
    """
    A TLS or TCP failure as a log line an operator can act on.
    """
    error = reason.value
    text = str(error)
    if "VerificationError" in type(error).__name__ or "VerificationError" in text:
        return f"TLS to the rendezvous {where}: its certificate is not for that host name ({text})"
    if "certificate verify failed" in text:
        detail = text.split("certificate verify failed", 1)[1].strip(" ,')]\"")
        return (
            f"TLS to the rendezvous {where}: its certificate was refused"
            f" (certificate verify failed{': ' + detail if detail else ''});"
            " check rendezvous_ca"
        )
    return f"TLS to the rendezvous {where} failed: {reason.getErrorMessage()}"


@implementer(IHandshakeListener, IPushProducer)
class RendezvousStream(Protocol):
    """
    One TLS connection to the rendezvous: signalling frames go to
    C{on_signalling}; relayed frames to the channel of their relay port.

    As the transport's producer it learns when its send buffer is full:
    channels then stop reading their programs (L{paused}, L{on_resume}),
    and relayed datagrams that still come are dropped, as UDP would.
    """

    def __init__(
        self,
        on_signalling: Callable[[bytes], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._on_signalling = on_signalling
        self._on_lost = on_lost
        self._deframer = Deframer()
        self.channels: dict[int, Callable[[bytes], None]] = {}
        self.on_resume: list[Callable[[], None]] = []
        #: Called when the connection ends (the pumps of relay-tls tunnels).
        self.on_close: list[Callable[[], None]] = []
        self.counters: Counter[str] = Counter()
        self.paused = False
        self.up: Deferred[RendezvousStream] = Deferred()
        self.where = "?"
        self._open = False

    # -- the connection ------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        self._open = True
        self.up.callback(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        for close in list(self.on_close):
            close()
        self.channels.clear()
        self.on_resume.clear()
        self.on_close.clear()
        if not self.up.called:
            self.up.errback(StreamRefused(explain(reason, self.where)))
        elif self._open:
            self._open = False
            self._on_lost(f"the TLS connection to {self.where} was lost")

    def close(self) -> None:
        """
        Close now: a registered producer would otherwise hold TLS's close
        back until it unregistered, and nothing here needs to be flushed.
        """
        self._open = False
        transport = self.transport
        if transport is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
            transport.abortConnection()  # type: ignore[attr-defined]

    @property
    def open(self) -> bool:
        return self._open

    # -- frames in ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            payloads = self._deframer.feed(data)
            for payload in payloads:
                self._frame(payload)
        except FrameError as e:
            log.warn("the rendezvous sent garbage over TLS ({error}); reconnecting", error=e)
            self.close()

    def _frame(self, payload: bytes) -> None:
        frame = parse_frame(payload)
        if isinstance(frame, Relayed):
            channel = self.channels.get(frame.port)
            if channel is None:
                self.counters["dropped-no-channel"] += 1
            else:
                channel(frame.datagram)
        else:
            self._on_signalling(frame.message)

    # -- frames out --------------------------------------------------------------

    def send_signalling(self, message: bytes) -> None:
        if self._open and self.transport is not None:
            self.transport.write(stun_frame(message))

    def send_relayed(self, port: int, datagram: bytes) -> bool:
        """
        Send one datagram through relay port C{port}; False when it was
        dropped (the connection is closed or its buffer is full).
        """
        if not self._open or self.transport is None or self.paused:
            self.counters["dropped-stream-full" if self._open else "dropped-closed"] += 1
            return False
        self.transport.write(relayed_frame(port, datagram))
        return True

    # -- IPushProducer -------------------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        for resume in list(self.on_resume):
            resume()

    def stopProducing(self) -> None:
        self.paused = True


def connect_stream(
    reactor: Any,
    address: tuple[str, int],
    trust: Any,
    on_signalling: Callable[[bytes], None],
    on_lost: Callable[[str], None],
) -> Deferred[RendezvousStream]:
    """
    Connect to the rendezvous' TLS port at C{address} (a host name or an
    IP address, which the certificate must name); fire with the stream once
    the handshake has verified it, or fail with L{StreamRefused}.
    """
    host, port = address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    stream = RendezvousStream(on_signalling, on_lost)
    stream.where = where
    options = ssl.optionsForClientTLS(host, trustRoot=trust)
    endpoint = wrapClientTLS(options, HostnameEndpoint(reactor, host, port, CONNECT_TIMEOUT))

    def give_up() -> None:
        # Whatever stage it is at (name lookup, TCP, TLS): no connection
        # may outlive the attempt nobody waits for any more.
        connecting.cancel()
        stream.close()

    stream.up = Deferred(lambda d: give_up())

    def unreachable(failure: Failure) -> None:
        if not stream.up.called:
            stream.up.errback(StreamRefused(explain(failure, where)))

    connecting = connectProtocol(endpoint, stream)
    connecting.addErrback(unreachable)

    def timed_out() -> None:
        if not stream.up.called:
            stream.up.errback(
                StreamRefused(f"TLS to the rendezvous {where} failed: no answer in 10 s")
            )
        give_up()

    timer = reactor.callLater(CONNECT_TIMEOUT, timed_out)

    def settled(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    return stream.up.addBoth(settled)
