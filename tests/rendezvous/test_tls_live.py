"""
The real rendezvous process with its TLS port on loopback: a plain Python
TLS client (the ssl module, trusting the test CA) registers as a real agent
over the stream, lists its peers, and relays a thousand datagrams each way
with a UDP agent through a relay allocation; closing the connection frees
the allocation and takes the agent offline.  A certificate that is not the
key's stops the daemon in one line.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netlab import certs as test_certs
from netlab import child_env
from netlab.deployment import TWIST, Deployment, free_udp_port
from punchd import stun, wire
from punchd.framing import Deframer, Relayed, Signalling, parse_frame, relayed_frame, stun_frame
from punchd.keys import PrivateKey, derive_rendezvous_key
from punchd.relay import build_bind, parse_bind_answer
from punchd.stun import Attr, MessageClass, Method
from tests import wait_for
from tests.rendezvous import accepted
from tests.rendezvous.test_live import failures_in_log

DEADLINE = 30.0
COUNT = 1000


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Signer:
    """
    An agent's signed requests, numbered as the agent numbers them.
    """

    def __init__(self, name: str, private: PrivateKey, server: PrivateKey) -> None:
        self.name = name
        self.key = derive_rendezvous_key(private, server.public_key(), name)
        self.sequence = time.time_ns() // 1000
        self.nonce = bytes(20)

    def request(self, method: int, attributes: Sequence[tuple[int, bytes]]) -> tuple[bytes, bytes]:
        self.sequence += 1
        tid = stun.new_transaction_id()
        header = [
            (Attr.USERNAME, self.name.encode("ascii")),
            (Attr.SEQUENCE, stun.encode_u64(self.sequence)),
            (Attr.NONCE, self.nonce),
        ]
        return tid, wire.signed(method, MessageClass.REQUEST, tid, [*header, *attributes], self.key)

    def check(self, data: bytes, tid: bytes) -> stun.Message | None:
        """
        The answer to C{tid}, signed for us; None for anything else.
        """
        message = stun.parse(data)
        if message.transaction_id != tid:
            return None
        assert stun.verify_integrity_sha256(message, self.key)
        return message

    def ask(self, method: int, attributes: Sequence[tuple[int, bytes]]) -> stun.Message:
        """
        The signed answer, after taking a 438's nonce as the agent does.
        """
        for _ in range(2):
            tid, request = self.request(method, attributes)
            answer = self.exchange(request, tid)
            if answer.cls == MessageClass.ERROR and wire.error_of(answer)[0] == 438:
                nonce = answer.get(Attr.NONCE)
                assert nonce is not None
                self.nonce = nonce
                continue
            return answer
        raise AssertionError("no answer but 438s")

    def exchange(self, request: bytes, tid: bytes) -> stun.Message:
        "Send C{request}; its answer (the transport's own part)."
        raise NotImplementedError


class TLSAgent(Signer):
    """
    An agent on a TLS stream, written with the ssl module and punchd.framing only.
    """

    def __init__(
        self, name: str, private: PrivateKey, server: PrivateKey, port: int, ca: Path
    ) -> None:
        super().__init__(name, private, server)
        context = ssl.create_default_context(cafile=str(ca))
        raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._deframer = Deframer()
        self._frames: list[Signalling | Relayed] = []

    def frame(self) -> Signalling | Relayed:
        while not self._frames:
            data = self.sock.recv(65536)
            assert data, "the rendezvous closed the stream"
            self._frames += [parse_frame(p) for p in self._deframer.feed(data)]
        return self._frames.pop(0)

    def exchange(self, request: bytes, tid: bytes) -> stun.Message:
        self.sock.sendall(stun_frame(request))
        while True:
            frame = self.frame()
            assert isinstance(frame, Signalling)
            answer = self.check(frame.message, tid)
            if answer is not None:
                return answer

    def relayed(self) -> Relayed:
        frame = self.frame()
        assert isinstance(frame, Relayed)
        return frame


class UDPAgent(Signer):
    def __init__(self, name: str, private: PrivateKey, server: PrivateKey, port: int) -> None:
        super().__init__(name, private, server)
        self.server = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(DEADLINE)

    def exchange(self, request: bytes, tid: bytes) -> stun.Message:
        self.sock.sendto(request, self.server)
        while True:
            answer = self.check(self.sock.recv(2048), tid)
            if answer is not None:
                return answer


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


@pytest.fixture
def certificates(tmp_path: Path) -> test_certs.LabCertificates:
    return test_certs.make_certificates(tmp_path / "certs", ["127.0.0.1"])


@pytest.fixture
def tls_live(tmp_path: Path, certificates: test_certs.LabCertificates) -> Iterator[Deployment]:
    tls_port, metrics_port = free_tcp_port(), free_tcp_port()
    low = min(free_udp_port(), 64000)
    extra = (
        f"tls_port = {tls_port}\n"
        f'tls_certificate = "{certificates.certificate}"\n'
        f'tls_private_key = "{certificates.private_key}"\n'
        f'metrics = "127.0.0.1:{metrics_port}"\n'
        f'relay_ports = "{low}-{low + 1000}"\n'
    )
    with Deployment(tmp_path / "d", binding_rate=0, rendezvous_extra=extra) as d:
        d.tls_port = tls_port  # type: ignore[attr-defined]
        d.metrics_port = metrics_port  # type: ignore[attr-defined]
        d.add_agent("alice")
        d.add_agent("bob")
        d.start_rendezvous()
        yield d
        assert failures_in_log(d) == []


def test_an_agent_over_tls_registers_lists_peers_and_relays_with_a_udp_agent(
    tls_live: Deployment, certificates: test_certs.LabCertificates
) -> None:
    d = tls_live
    server = d.rendezvous_key
    alice = TLSAgent("alice", d.agents["alice"].key, server, d.tls_port, certificates.ca)  # type: ignore[attr-defined]
    bob = UDPAgent("bob", d.agents["bob"].key, server, d.rendezvous_port)
    lifetime = [(Attr.LIFETIME, stun.encode_u32(60))]

    # Register and list peers over the stream: signed answers, the TCP address seen.
    registered = alice.ask(Method.REGISTER, lifetime)
    assert registered.cls == MessageClass.SUCCESS
    assert wire.mapped_address(registered) == alice.address
    assert bob.ask(Method.REGISTER, lifetime).cls == MessageClass.SUCCESS
    peers = alice.ask(Method.PEERS, [])
    assert [v.decode() for v in peers.get_all(Attr.PEER)] == ["bob"]

    # alice asks for bob with a relay; bob accepts over UDP.
    tunnel = os.urandom(16)
    connect_tid, connect = alice.request(
        Method.CONNECT,
        [
            (Attr.PEER, b"bob"),
            (Attr.SERVICE, b"echo"),
            (Attr.TUNNEL_ID, tunnel),
            (Attr.RELAY, b""),
        ],
    )
    alice.sock.sendall(stun_frame(connect))
    incoming = stun.parse(bob.sock.recv(2048))
    assert (incoming.method, incoming.cls) == (Method.INCOMING, MessageClass.REQUEST)
    assert stun.verify_integrity_sha256(incoming, bob.key)
    bob_port = stun.decode_u32(incoming.get(Attr.RELAY_PORT) or b"")
    bob.sock.sendto(accepted(incoming, bob.key), bob.server)
    frame = alice.frame()
    assert isinstance(frame, Signalling)
    answer = alice.check(frame.message, connect_tid)
    assert answer is not None and answer.cls == MessageClass.SUCCESS
    alice_port = stun.decode_u32(answer.get(Attr.RELAY_PORT) or b"")

    # Both bind: alice with a Relayed frame, bob with a datagram.
    _, bind = build_bind("alice", alice.key, tunnel)
    alice.sock.sendall(relayed_frame(alice_port, bind))
    bound = alice.relayed()
    assert bound.port == alice_port
    assert parse_bind_answer(bound.datagram, alice.key) == alice.address
    _, bind = build_bind("bob", bob.key, tunnel)
    bob.sock.sendto(bind, ("127.0.0.1", bob_port))
    assert parse_bind_answer(bob.sock.recv(2048), bob.key) == bob.sock.getsockname()

    # A thousand datagrams each way, unchanged and in order.
    to_bob = [b"a%04d" % i + os.urandom(i % 200) for i in range(COUNT)]
    to_alice = [b"b%04d" % i + os.urandom(i % 300) for i in range(COUNT)]
    got_bob: list[bytes] = []
    got_alice: list[bytes] = []
    for start in range(0, COUNT, 50):  # paced: loopback UDP buffers are small
        alice.sock.sendall(
            b"".join(relayed_frame(alice_port, m) for m in to_bob[start : start + 50])
        )
        for m in to_alice[start : start + 50]:
            bob.sock.sendto(m, ("127.0.0.1", bob_port))
        got_bob += [bob.sock.recv(65535) for _ in range(50)]
        for _ in range(50):
            frame = alice.relayed()
            assert frame.port == alice_port
            got_alice.append(frame.datagram)
    assert got_bob == to_bob and got_alice == to_alice

    seen = metrics(d.metrics_port)  # type: ignore[attr-defined]
    assert seen["punchd_relay_datagrams_total{}"] == 2 * COUNT
    assert seen["punchd_tls_connections_open{}"] == 1
    assert seen["punchd_tls_events_total{event=authenticated}"] == 1

    # The stream closes: its allocation is freed and alice is offline.
    alice.sock.close()

    def gone() -> bool:
        seen = metrics(d.metrics_port)  # type: ignore[attr-defined]
        return (
            seen.get("punchd_relay_freed_total{why=stream_closed}") == 1
            and seen["punchd_tls_connections_open{}"] == 0
        )

    wait_for(gone, DEADLINE, "the stream's allocation to be freed")
    assert bob.ask(Method.PEERS, []).get_all(Attr.PEER) == []


def test_a_tls_client_that_never_authenticates_is_dropped(
    tmp_path: Path, certificates: test_certs.LabCertificates
) -> None:
    tls_port = free_tcp_port()
    extra = (
        f"tls_port = {tls_port}\n"
        f'tls_certificate = "{certificates.certificate}"\n'
        f'tls_private_key = "{certificates.private_key}"\n'
        "tls_auth_timeout = 1.0\n"
    )
    with Deployment(tmp_path / "d", rendezvous_extra=extra) as d:
        d.start_rendezvous()
        context = ssl.create_default_context(cafile=str(certificates.ca))
        with socket.create_connection(("127.0.0.1", tls_port), timeout=DEADLINE) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                # An anonymous Binding is answered, but does not count.
                request = stun.build(
                    Method.BINDING, MessageClass.REQUEST, stun.new_transaction_id(), []
                )
                sock.sendall(stun_frame(request))
                length = struct.unpack("!H", sock.recv(2))[0]
                assert stun.parse(sock.recv(length)).cls == MessageClass.SUCCESS
                started = time.monotonic()
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass  # closed without close_notify: the server aborts
                assert time.monotonic() - started < DEADLINE
        # A bare TCP connection that never says a word goes the same way,
        # and one that speaks something else than TLS goes at once.
        for hello in (b"", b"GET / HTTP/1.0\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", tls_port), timeout=DEADLINE) as raw:
                raw.sendall(hello)
                try:
                    while raw.recv(4096):
                        pass  # a TLS alert, perhaps
                except ConnectionResetError:
                    pass
        assert failures_in_log(d) == []


def test_a_key_that_is_not_the_certificates_stops_the_daemon_in_one_line(
    tmp_path: Path, certificates: test_certs.LabCertificates
) -> None:
    other = test_certs.make_certificates(tmp_path / "other", ["127.0.0.1"])
    extra = (
        f"tls_port = {free_tcp_port()}\n"
        f'tls_certificate = "{certificates.certificate}"\n'
        f'tls_private_key = "{other.private_key}"\n'
    )
    Deployment(tmp_path / "d", rendezvous_extra=extra)  # writes the config files
    argv = [*TWIST, "rendezvous", "--config", "rendezvous.toml"]
    done = subprocess.run(
        argv, cwd=tmp_path / "d", capture_output=True, text=True, timeout=60, env=child_env()
    )
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "not the key of the certificate" in lines[0]
    assert str(other.private_key) in lines[0]
