"""
The agent's TLS stream to the rendezvous, against a real TLS server on
loopback with certificates made here: a good certificate carries frames
both ways; a wrong CA or host name is refused in words; and a relay-tls
tunnel's program end is pumped to and from the stream.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from netlab.certs import LabCertificates, make_certificates
from punchd.agent.stream import RendezvousStream, StreamRefused, connect_stream, trust_root
from punchd.agent.stream_relay import StreamChannel
from punchd.framing import Deframer, Relayed, Signalling, parse_frame, relayed_frame, stun_frame
from tests.agent import wait_until

MESSAGE = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
RELAY = ("127.0.0.1", 50000)


class FrameServer(Protocol):
    """Echoes signalling frames; answers relayed frames on the same port, reversed."""

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen
        self.deframer = Deframer()

    def connectionLost(self, reason: Any = None) -> None:
        self.seen.append("closed")

    def dataReceived(self, data: bytes) -> None:
        for payload in self.deframer.feed(data):
            frame = parse_frame(payload)
            self.seen.append(frame)
            assert self.transport is not None
            if isinstance(frame, Relayed):
                self.transport.write(relayed_frame(frame.port, frame.datagram[::-1]))
            else:
                self.transport.write(stun_frame(frame.message))


@pytest.fixture
def certificates(tmp_path: Path) -> LabCertificates:
    return make_certificates(tmp_path, ["127.0.0.1", "rendezvous.test"])


@pytest.fixture
def server(certificates: LabCertificates) -> Iterator[tuple[int, list[Any]]]:
    seen: list[Any] = []
    pem = certificates.certificate.read_text() + certificates.private_key.read_text()
    options = ssl.PrivateCertificate.loadPEM(pem).options()
    port = reactor.listenSSL(  # type: ignore[attr-defined]
        0, Factory.forProtocol(lambda: FrameServer(seen)), options, interface="127.0.0.1"
    )
    yield port.getHost().port, seen
    port.stopListening()


def connect(
    port: int, ca: Path, host: str = "127.0.0.1", lost: list[str] | None = None
) -> tuple[Deferred[RendezvousStream], list[bytes]]:
    signalling: list[bytes] = []
    losses = lost if lost is not None else []
    d = connect_stream(reactor, (host, port), trust_root(str(ca)), signalling.append, losses.append)
    return d, signalling


async def wait_for(condition: Callable[[], object], what: str) -> None:
    await wait_until(condition, 10.0, what)


@pytest_twisted.ensureDeferred
async def test_a_checked_stream_carries_signalling_both_ways(
    server: tuple[int, list[Any]], certificates: LabCertificates
) -> None:
    port, seen = server
    lost: list[str] = []
    d, signalling = connect(port, certificates.ca, lost=lost)
    stream = await d
    assert stream.open
    stream.send_signalling(MESSAGE)
    await wait_for(lambda: signalling, "the echo")
    assert signalling == [MESSAGE] and seen == [Signalling(MESSAGE)]
    stream.close()
    # The server sees the connection end: nothing of it lingers.
    await wait_for(lambda: "closed" in seen, "the server to see the close")
    assert lost == [], "closing it ourselves is not a loss"


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_another_ca_is_refused_in_words(
    server: tuple[int, list[Any]], tmp_path: Path
) -> None:
    other = make_certificates(tmp_path / "other", ["127.0.0.1"], ca_name="someone else")
    d, _ = connect(server[0], other.ca)
    with pytest.raises(StreamRefused) as refused:
        await d
    text = str(refused.value)
    assert "certificate was refused" in text and "rendezvous_ca" in text, text
    assert f"127.0.0.1:{server[0]}" in text


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_host_name_is_refused_in_words(
    tmp_path: Path,
) -> None:
    elsewhere = make_certificates(tmp_path, ["rendezvous.elsewhere.test"])
    pem = elsewhere.certificate.read_text() + elsewhere.private_key.read_text()
    listening = reactor.listenSSL(  # type: ignore[attr-defined]
        0,
        Factory.forProtocol(lambda: FrameServer([])),
        ssl.PrivateCertificate.loadPEM(pem).options(),
        interface="127.0.0.1",
    )
    try:
        d, _ = connect(listening.getHost().port, elsewhere.ca)
        with pytest.raises(StreamRefused) as refused:
            await d
    finally:
        await listening.stopListening()
    assert "not for that host name" in str(refused.value), str(refused.value)


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_a_clear_failure(certificates: LabCertificates) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    d, _ = connect(free, certificates.ca)
    with pytest.raises(StreamRefused) as refused:
        await d
    assert f"TLS to the rendezvous 127.0.0.1:{free} failed" in str(refused.value)


def test_a_ca_file_without_certificates_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        trust_root(str(empty))


@pytest_twisted.ensureDeferred
async def test_a_relay_tls_tunnel_pumps_the_program_end(
    server: tuple[int, list[Any]], certificates: LabCertificates
) -> None:
    port, seen = server
    lost: list[str] = []
    d, _ = connect(port, certificates.ca, lost=lost)
    stream = await d
    checks: list[bytes] = []
    channel = StreamChannel(
        reactor,  # type: ignore[arg-type]
        reactor,  # type: ignore[arg-type]
        stream,
        RELAY,
        lambda data, source: checks.append(data),
        lambda data, source: data.startswith(b"program"),
    )
    channel.start_reading()
    # Before the hand-off: the tunnel's own datagrams reach the tunnel.
    channel.send(b"check", RELAY)
    await wait_for(lambda: checks, "the check's echo")
    assert checks == [b"kcehc"] and seen[-1] == Relayed(RELAY[1], b"check")
    # Near the hand-off the program's first words are held for it.
    channel.peeking = True
    channel.send(b"margorp", RELAY)  # comes back as b"program"
    await wait_for(lambda: len(seen) == 2, "the program's first words")
    await deferLater(reactor, 0.05, lambda: None)
    assert checks == [b"kcehc"]
    program = channel.release(RELAY, lambda data, source: False)
    try:
        assert program.family == socket.AF_UNIX and program.type == socket.SOCK_DGRAM
        program.settimeout(5)
        assert program.recv(100) == b"program"
        for i in range(100):
            # The agent's end queues a few datagrams (net.unix.max_dgram_qlen):
            # let the pump read them, as a blocking program would wait.
            program.send(b"datagram %d" % i)
            if i % 5 == 4:
                await deferLater(reactor, 0.001, lambda: None)
        got: list[bytes] = []

        def read_all() -> bool:
            program.setblocking(False)
            try:
                while True:
                    got.append(program.recv(100))
            except BlockingIOError:
                pass
            return len(got) == 100

        await wait_for(read_all, "100 datagrams back")
        assert got == [(b"datagram %d" % i)[::-1] for i in range(100)]
    finally:
        program.close()
    # The program closed its end: the next datagram for it ends the pump.
    stream.transport.write(relayed_frame(RELAY[1], b"late"))  # type: ignore[union-attr]
    await wait_for(lambda: RELAY[1] not in stream.channels, "the pump to close")
    stream.close()


class Silent(Protocol):
    """A TCP server that never answers the TLS handshake."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def connectionMade(self) -> None:
        self.seen.append("open")

    def connectionLost(self, reason: Any = None) -> None:
        self.seen.append("closed")


@pytest_twisted.ensureDeferred
async def test_an_attempt_given_up_mid_handshake_leaves_no_connection(
    certificates: LabCertificates,
) -> None:
    seen: list[str] = []
    listening = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(lambda: Silent(seen)), interface="127.0.0.1"
    )
    try:
        d, _ = connect(listening.getHost().port, certificates.ca)
        await wait_for(lambda: "open" in seen, "the TCP connection")
        d.cancel()
        with pytest.raises((CancelledError, StreamRefused)):
            await d
        await wait_for(lambda: "closed" in seen, "the server to see the connection end")
    finally:
        await listening.stopListening()
