"""
The real rendezvous process (C{python -m twisted rendezvous}) on loopback:
standard STUN clients get their address from it, real agents register and
see each other, forgeries and a flood of junk change nothing.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from aioice import stun as aioice_stun
from twisted.logger import eventFromJSON, formatEvent

from netlab.deployment import Deployment
from punchd import client, stun, wire
from punchd.gather import build_gather_request
from punchd.keys import PrivateKey, derive_rendezvous_key
from punchd.stun import Attr, MessageClass, Method

COOKIE = 0x2112A442
FUZZ_DATAGRAMS = 100_000


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """
    alice, bob and mallory (another network) running; carol and dave listed
    but not started: carol is the name forgers claim, dave joins after the flood.
    """
    with Deployment(tmp_path_factory.mktemp("live"), keepalive=2.0, binding_rate=0) as d:
        d.add_agent("alice")
        d.add_agent("bob")
        d.add_agent("carol")
        d.add_agent("dave")
        d.add_agent("mallory", network="elsewhere")
        d.start_rendezvous()
        for name in ("alice", "bob", "mallory"):
            d.start_agent(name, wait=0)
        for name in ("alice", "bob", "mallory"):
            d.wait_registered(name)
        yield d


def server_of(d: Deployment) -> tuple[str, int]:
    return (d.rendezvous_host, d.rendezvous_port)


def peer_names(d: Deployment, name: str) -> list[str]:
    return [p["name"] for p in client.peers(socket_path=d.agents[name].socket_path)]


def log_messages(d: Deployment) -> list[str]:
    """
    The rendezvous' log as text, one line per event, whether C{twist} wrote
    it as text or as JSON.
    """
    messages = []
    for line in d.rendezvous_log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                event = eventFromJSON(line)
            except ValueError:
                messages.append(line)
                continue
            level = event.get("log_level")
            text = f"[#{level.name if level else '?'}] {formatEvent(event)}"
            messages.append(text + (" Traceback" if "log_failure" in event else ""))
        else:
            messages.append(line)
    return messages


def registered_in_log(d: Deployment) -> set[str]:
    found = (re.search(r"\bagent (\S+) registered from", m) for m in log_messages(d))
    return {match.group(1) for match in found if match}


def failures_in_log(d: Deployment) -> list[str]:
    marks = ("Traceback", "unexpected error", "#critical]", "#error]", "Unhandled")
    return [m for m in log_messages(d) if any(mark in m for mark in marks)]


def udp_socket(timeout: float = 2.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    return sock


# -- a plain RFC 5389 client, written from the RFC and not from punchd's codec --


def raw_binding_request(transaction_id: bytes, fingerprint: bool) -> bytes:
    header = struct.pack("!HHI12s", 0x0001, 8 if fingerprint else 0, COOKIE, transaction_id)
    if not fingerprint:
        return header
    crc = zlib.crc32(header) ^ 0x5354554E
    return header + struct.pack("!HHI", 0x8028, 4, crc)


def raw_mapped_address(response: bytes, transaction_id: bytes) -> tuple[str, int]:
    """
    XOR-MAPPED-ADDRESS of a Binding success response, checking what a
    careful client checks.
    """
    msg_type, length, cookie, tid = struct.unpack("!HHI12s", response[:20])
    assert (msg_type, cookie, tid) == (0x0101, COOKIE, transaction_id)
    assert length == len(response) - 20
    pos = 20
    while pos + 4 <= len(response):
        attr_type, attr_length = struct.unpack("!HH", response[pos : pos + 4])
        value = response[pos + 4 : pos + 4 + attr_length]
        if attr_type == 0x0020:
            family, xport = struct.unpack("!xBH", value[:4])
            assert family == 1
            address = struct.unpack("!I", value[4:8])[0] ^ COOKIE
            return socket.inet_ntoa(struct.pack("!I", address)), xport ^ (COOKIE >> 16)
        pos += 4 + (attr_length + 3) // 4 * 4
    raise AssertionError("no XOR-MAPPED-ADDRESS")


def raw_binding(server: tuple[str, int], fingerprint: bool = False) -> None:
    """
    One Binding exchange from a fresh socket; asserts the mapped address is it.
    """
    with udp_socket() as sock:
        tid = os.urandom(12)
        for _ in range(3):  # UDP: a flooded server may drop one
            sock.sendto(raw_binding_request(tid, fingerprint), server)
            try:
                response, source = sock.recvfrom(2048)
            except TimeoutError:
                continue
            assert source == server
            assert raw_mapped_address(response, tid) == sock.getsockname()
            if fingerprint:
                crc = zlib.crc32(response[:-8]) ^ 0x5354554E
                assert response[-8:] == struct.pack("!HHI", 0x8028, 4, crc)
            else:
                assert len(response) == 32
            return
    raise AssertionError("no Binding answer")


def test_raw_rfc5389_client_gets_its_address(live: Deployment) -> None:
    raw_binding(server_of(live), fingerprint=False)
    raw_binding(server_of(live), fingerprint=True)


# -- turnutils_stunclient (coturn) ---------------------------------------------


class LoopbackSniffer:
    """
    The UDP datagrams sent to one port on C{lo}, with their source ports:
    the only way to learn which port a client process used.  Needs CAP_NET_RAW.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.sock.bind(("lo", 0x0800))
        self.sock.setblocking(False)

    def datagrams(self) -> list[tuple[int, bytes]]:
        found = []
        for _ in range(100_000):
            try:
                packet = self.sock.recv(65535)
            except BlockingIOError:
                break
            ihl = (packet[0] & 0x0F) * 4
            if packet[9] != socket.IPPROTO_UDP:
                continue
            source_port, destination_port = struct.unpack("!HH", packet[ihl : ihl + 4])
            if destination_port == self.port:
                found.append((source_port, packet[ihl + 8 :]))
        return found

    def close(self) -> None:
        self.sock.close()


def stunclient() -> str:
    path = shutil.which("turnutils_stunclient")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("turnutils_stunclient is missing: .ci/run installs coturn")
        pytest.skip("turnutils_stunclient not installed (Debian package coturn)")
    return path


def test_coturn_stunclient_gets_its_address(live: Deployment) -> None:
    command = stunclient()
    try:
        sniffer: LoopbackSniffer | None = LoopbackSniffer(live.rendezvous_port)
    except PermissionError:
        sniffer = None  # without CAP_NET_RAW only the host part can be checked
    try:
        result = subprocess.run(
            [command, "-p", str(live.rendezvous_port), "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        sent = sniffer.datagrams() if sniffer is not None else []
    finally:
        if sniffer is not None:
            sniffer.close()
    assert result.returncode == 0, result.stdout + result.stderr
    mapped = re.findall(r"UDP reflexive addr: ([0-9.]+):(\d+)", result.stdout)
    assert mapped, result.stdout
    for host, port in mapped:
        assert host == "127.0.0.1"
        assert 1024 <= int(port) <= 65535
        if sniffer is not None:
            bindings = {src for src, payload in sent if payload[:2] == b"\x00\x01"}
            assert int(port) in bindings, (port, bindings)


# -- aioice ----------------------------------------------------------------------


class AioiceClient(asyncio.DatagramProtocol):
    """
    Just enough of a STUN endpoint for aioice's own Transaction to run on.
    """

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.transactions: dict[bytes, aioice_stun.Transaction] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = aioice_stun.parse_message(data)  # raises on a bad FINGERPRINT
        transaction = self.transactions.get(message.transaction_id)
        if transaction is not None:
            transaction.response_received(message, addr)

    def send_stun(self, message: aioice_stun.Message, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(bytes(message), addr)


async def aioice_binding(server: tuple[str, int], fingerprint: bool) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        AioiceClient, local_addr=("127.0.0.1", 0)
    )
    try:
        request = aioice_stun.Message(
            message_method=aioice_stun.Method.BINDING, message_class=aioice_stun.Class.REQUEST
        )
        if fingerprint:
            request.add_fingerprint()
        transaction = aioice_stun.Transaction(request, server, protocol, retransmissions=4)
        protocol.transactions[request.transaction_id] = transaction
        response, source = await asyncio.wait_for(transaction.run(), 15)
        assert source == server
        assert ("FINGERPRINT" in response.attributes) is fingerprint
        return response.attributes["XOR-MAPPED-ADDRESS"], transport.get_extra_info("sockname")
    finally:
        transport.close()


@pytest.mark.parametrize("fingerprint", [False, True])
def test_aioice_gets_its_address(live: Deployment, fingerprint: bool) -> None:
    mapped, local = asyncio.run(aioice_binding(server_of(live), fingerprint))
    assert tuple(mapped) == tuple(local[:2])


# -- real agents -------------------------------------------------------------------


def test_agents_of_one_network_see_each_other(live: Deployment) -> None:
    alice, bob = peer_names(live, "alice"), peer_names(live, "bob")
    assert "bob" in alice and "alice" not in alice
    assert "alice" in bob and "bob" not in bob
    for names in (alice, bob):
        assert "mallory" not in names
    assert peer_names(live, "mallory") == []


@dataclass
class RawAgent:
    """
    A hand-driven agent on its own socket, to forge what a real one would send.
    """

    name: str
    private: PrivateKey
    server: tuple[str, int]
    server_key: Any
    sequence: int = 10**15

    def __post_init__(self) -> None:
        self.sock = udp_socket()
        self.key = derive_rendezvous_key(self.private, self.server_key, self.name)

    def send(self, method: int, nonce: bytes | None) -> tuple[bytes, list[bytes]]:
        """
        The request sent and every reply that came within the socket timeout.
        """
        self.sequence += 1
        attributes = [
            (Attr.USERNAME, self.name.encode("ascii")),
            (Attr.SEQUENCE, stun.encode_u64(self.sequence)),
            (Attr.LIFETIME, stun.encode_u32(10)),
        ]
        attributes.append((Attr.NONCE, nonce if nonce is not None else bytes(20)))
        request = wire.signed(
            method, MessageClass.REQUEST, stun.new_transaction_id(), attributes, self.key
        )
        self.sock.sendto(request, self.server)
        replies = []
        # Generous for the first answer (a loaded machine), short for any more.
        for timeout in (2.0, 0.3, 0.3, 0.3):
            self.sock.settimeout(timeout)
            try:
                replies.append(self.sock.recv(2048))
            except TimeoutError:
                break
        return request, replies

    def close(self) -> None:
        self.sock.close()


def test_forged_registration_is_refused_and_leaves_no_trace(live: Deployment) -> None:
    server_key = live.rendezvous_key.public_key()
    forger = RawAgent("carol", PrivateKey.generate(), server_of(live), server_key)
    try:
        for nonce in (None, os.urandom(20)):
            request, replies = forger.send(Method.REGISTER, nonce)
            for reply in replies:
                assert len(reply) <= len(request)
                message = stun.parse(reply)
                assert message.cls == MessageClass.ERROR
                assert wire.error_of(message)[0] == 401
                assert not stun.verify_integrity_sha256(message, forger.key)
    finally:
        forger.close()
    assert "carol" not in peer_names(live, "alice")
    assert "carol" not in peer_names(live, "bob")
    logged = registered_in_log(live)
    assert {"alice", "bob"} <= logged  # the log does record registrations...
    assert "carol" not in logged  # ...and has none for the forger
    # Its only trace is the (rate-limited) line an admin needs to spot it.
    about_carol = [m for m in log_messages(live) if "carol" in m]
    assert about_carol and all("refused a request" in m for m in about_carol)
    # The same client with carol's real key is let in: the refusal was the key's doing.
    honest = RawAgent("carol", live.agents["carol"].key, server_of(live), server_key)
    try:
        _, replies = honest.send(Method.PEERS, None)
        [reply] = replies
        message = stun.parse(reply)
        assert stun.verify_integrity_sha256(message, honest.key)
        assert wire.error_of(message)[0] == 438
    finally:
        honest.close()


# -- a flood of junk ------------------------------------------------------------------


def junk(rng: random.Random, count: int) -> list[bytes]:
    """
    Datagrams that are wrong in the ways a parser gets wrong: random bytes,
    truncations, lying lengths, attribute overruns, broken fingerprints,
    punchd methods with bad integrity, unsolicited answers.
    """
    names = [b"alice", b"bob", b"carol", b"dave", b"mallory", b"eve", b"\xff\xfe"]
    methods = [Method.REGISTER, Method.PEERS, Method.CONNECT, Method.INCOMING, 0x806, 0xFFF]

    def signed_junk() -> bytes:
        attributes = [
            (Attr.USERNAME, rng.choice(names)),
            (Attr.SEQUENCE, rng.randbytes(rng.choice((8, 8, 3)))),
            (Attr.NONCE, rng.randbytes(20)),
        ]
        for _ in range(rng.randrange(4)):
            attributes.append((rng.choice(list(Attr)), rng.randbytes(rng.randrange(40))))
        attributes = [(t, v) for t, v in attributes if t not in (0x0008, 0x001C, 0x8028)]
        return stun.build(
            rng.choice(methods),
            MessageClass(rng.randrange(4)),
            rng.randbytes(12),
            attributes,
            integrity_sha256=rng.randbytes(32),
            fingerprint=rng.random() < 0.9,
        )

    def binding_bad_fingerprint() -> bytes:
        tid = rng.randbytes(12)
        good = stun.build(Method.BINDING, MessageClass.REQUEST, tid, fingerprint=True)
        return good[:-4] + bytes(b ^ rng.randrange(1, 256) for b in good[-4:])

    def lying_length() -> bytes:
        body = rng.randbytes(rng.randrange(0, 200))
        length = rng.choice((len(body) + 4, max(0, len(body) - 4), rng.randrange(65536)))
        msg_type = rng.choice(
            (0x0001, 0x0111, 0x0801, 0x0802, 0x0803, 0x0114, rng.randrange(1 << 14))
        )
        return struct.pack("!HHI12s", msg_type, length, COOKIE, rng.randbytes(12)) + body

    def overrun() -> bytes:
        value = rng.randbytes(rng.randrange(0, 24))
        claimed = len(value) + rng.randrange(1, 500)
        attr = struct.pack("!HH", rng.choice((0x0006, 0x0020, 0x4D05, 0x8028)), claimed) + value
        attr += b"\x00" * (-len(attr) & 3)
        msg_type = rng.choice((0x0001, 0x0801, 0x0802, 0x0803))
        return struct.pack("!HHI12s", msg_type, len(attr), COOKIE, rng.randbytes(12)) + attr

    def truncated() -> bytes:
        whole = signed_junk() if rng.random() < 0.5 else binding_bad_fingerprint()
        return whole[: rng.randrange(len(whole))]

    def random_bytes() -> bytes:
        data = rng.randbytes(rng.randrange(0, 600))
        return (b"\x00\x01" + data[2:]) if rng.random() < 0.3 else data

    makers = [signed_junk, binding_bad_fingerprint, lying_length, overrun, truncated, random_bytes]
    return [rng.choice(makers)() for _ in range(count)]


def flood(server: tuple[str, int], datagrams: list[bytes], deadline: float) -> None:
    """
    Send everything from a few sockets, pausing after each batch until a
    Binding probe comes back (so that the server parses the junk instead of
    the kernel dropping it), but never longer than C{deadline} allows.
    """
    senders = [udp_socket() for _ in range(4)]
    probe = udp_socket(timeout=0.2)
    batch = 150
    try:
        for start in range(0, len(datagrams), batch):
            for i, datagram in enumerate(datagrams[start : start + batch]):
                try:
                    senders[i % len(senders)].sendto(datagram, server)
                except OSError:
                    pass  # ENOBUFS and the like: the flood goes on
            if time.monotonic() < deadline:
                tid = os.urandom(12)
                probe.sendto(raw_binding_request(tid, False), server)
                for _ in range(5):
                    try:
                        if probe.recv(2048)[8:20] == tid:
                            break
                    except TimeoutError:
                        break
    finally:
        for sock in [*senders, probe]:
            sock.close()


def test_server_survives_a_flood_of_junk(live: Deployment) -> None:
    started = time.monotonic()
    datagrams = junk(random.Random(20240611), FUZZ_DATAGRAMS)
    assert len(datagrams) == FUZZ_DATAGRAMS
    flood(server_of(live), datagrams, deadline=started + 20)
    process = live.rendezvous_process
    assert process is not None and process.poll() is None
    raw_binding(server_of(live), fingerprint=False)
    raw_binding(server_of(live), fingerprint=True)
    messages = log_messages(live)
    assert any("rendezvous listening" in m for m in messages)  # the right log, and read
    assert failures_in_log(live) == []
    # A new agent registers, and the old ones still do and see it.
    live.start_agent("dave")
    for name in ("alice", "bob"):
        live.wait_registered(name)
        assert "dave" in peer_names(live, name)
    assert "alice" in peer_names(live, "dave")
    assert peer_names(live, "mallory") == []


# -- reply sizes --------------------------------------------------------------------


def unauthenticated_requests(d: Deployment) -> list[bytes]:
    """
    What a sender whose address nothing proves can send: Binding with
    unknown comprehension-required attributes of every small size, forged
    and nonce-less agent requests, gathers.
    """
    requests = []
    for size in range(0, 17):
        for fingerprint in (False, True):
            requests.append(
                stun.build(
                    Method.BINDING,
                    MessageClass.REQUEST,
                    stun.new_transaction_id(),
                    [(0x7F01, b"x" * size)],
                    fingerprint=fingerprint,
                )
            )
    server_key = d.rendezvous_key.public_key()
    for name, private in (("carol", PrivateKey.generate()), ("carol", d.agents["carol"].key)):
        key = derive_rendezvous_key(private, server_key, name)
        for method in (Method.REGISTER, Method.PEERS, Method.CONNECT):
            for nonce in ([], [(Attr.NONCE, bytes(20))]):
                attributes = [(Attr.USERNAME, name.encode()), (Attr.SEQUENCE, bytes(8)), *nonce]
                tid = stun.new_transaction_id()
                requests.append(wire.signed(method, MessageClass.REQUEST, tid, attributes, key))
        requests.append(build_gather_request(name, key)[1])
    return requests


def test_no_reply_but_the_binding_success_is_larger_than_its_request(live: Deployment) -> None:
    requests = {request[8:20]: request for request in unauthenticated_requests(live)}
    replies = []
    with udp_socket(timeout=1.0) as sock:
        for request in requests.values():
            sock.sendto(request, server_of(live))
        while True:
            try:
                replies.append(sock.recv(2048))
            except TimeoutError:
                break
    for reply in replies:
        request = requests[reply[8:20]]
        if reply[:2] != b"\x01\x01" or stun.parse(reply).has(Attr.MESSAGE_INTEGRITY_SHA256):
            assert len(reply) <= len(request), (request.hex(), reply.hex())
    # Not vacuous: the server answered many of them (how many depends on the
    # 401/438 budget that earlier tests in this module spent).
    assert len(replies) >= 10
